// The CUDA conv layer's forward, bfloat16 and float16: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_CONV_FWD(c10::BFloat16);
SPLINET_CONV_FWD(c10::Half);
}  // namespace splinet
