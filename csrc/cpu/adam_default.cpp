// The CPU kernels for the baseline instruction set of the build (SSE2 on x86-64, NEON on arm64):
// always built, used when torch's own kernels run at their DEFAULT capability.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/adam_kernel.h"

namespace soap_kernels::cpu {

const KernelTable& kernels_default() {
  static constexpr KernelTable table{
      "DEFAULT",
      &DEFAULT::moment_update_chunk,
      &DEFAULT::adam_step_chunk<float>,
      &DEFAULT::adam_step_chunk<c10::BFloat16>,
      &DEFAULT::adam_step_chunk<c10::Half>,
  };
  return table;
}

}  // namespace soap_kernels::cpu
