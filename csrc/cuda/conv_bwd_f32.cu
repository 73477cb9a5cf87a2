// The CUDA conv layer's backward, float32: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_CONV_BWD(float);
}  // namespace splinet
