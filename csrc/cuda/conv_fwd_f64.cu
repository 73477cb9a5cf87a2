// The CUDA conv layer's forward, float64: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_CONV_FWD(double);
}  // namespace splinet
