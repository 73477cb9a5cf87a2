// The CUDA dense layer's backward, float16: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_DENSE_BWD(c10::Half);
}  // namespace splinet
