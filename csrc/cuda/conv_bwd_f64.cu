// The CUDA conv layer's backward, float64: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_CONV_BWD(double);
}  // namespace splinet
