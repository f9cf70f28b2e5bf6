// The CPU kernels for AVX2 + FMA + F16C, chosen at run time (adam_cpu.cpp) when torch's own kernels
// run at AVX2 or AVX512, so that fused multiply-adds happen exactly where torch's do.
//
// The build compiles this one file with -mavx2 -mfma -mf16c (the rule for *_avx2.cpp in setup.py
// and CMakeLists.txt) and links it last. Why last: inline functions of shared headers (c10, std)
// get one copy per object file and the linker keeps the first; linked last, the kept copy is the
// baseline one, so nothing outside this file's own at::vec::AVX2 namespace can run AVX2 code on a
// CPU without it. (Checked with nm on GCC 12: the object defines no weak symbols at all, and its only
// load-time code is <iostream>'s ios_base::Init from torch's headers, plain calls.) Keep this file
// free of static objects with constructors: those run at load time, on any CPU.
#include "cpu/kernel_table.h"

#if SOAP_KERNELS_CPU_AVX2

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "adam_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (setup.py and CMakeLists.txt do so)"
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/adam_kernel.h"

namespace soap_kernels::cpu {

const KernelTable& kernels_avx2() {
  // Constant-initialised (no guard, no code at load time).
  static constexpr KernelTable table{
      "AVX2",
      &AVX2::moment_update_chunk,
      &AVX2::adam_step_chunk<float>,
      &AVX2::adam_step_chunk<c10::BFloat16>,
      &AVX2::adam_step_chunk<c10::Half>,
  };
  return table;
}

}  // namespace soap_kernels::cpu

#endif  // SOAP_KERNELS_CPU_AVX2
