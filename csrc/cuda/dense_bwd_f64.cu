// The CUDA dense layer's backward, float64: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_DENSE_BWD(double);
}  // namespace splinet
