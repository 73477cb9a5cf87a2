// The CUDA dense layer's backward, bfloat16: one translation unit (see cuda_instances.h).
#include "cuda_instances.h"

namespace splinet {
SPLINET_DENSE_BWD(c10::BFloat16);
}  // namespace splinet
