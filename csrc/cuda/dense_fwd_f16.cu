// The CUDA dense layer's forward, float16: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_DENSE_FWD(c10::Half);
}  // namespace splinet
