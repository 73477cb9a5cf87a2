// The CUDA dense layer's forward, float64: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_DENSE_FWD(double);
}  // namespace splinet
