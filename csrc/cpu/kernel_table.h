// The CPU kernels of one instruction set, as a table of chunk functions. adam_kernel.h is compiled
// once per instruction set (adam_default.cpp, adam_avx2.cpp); adam_cpu.cpp picks a table at run
// time and spreads the chunks over threads.
#pragma once

#include "hyper.h"

#include <cstdint>

// On x86-64 a second variant is built from adam_avx2.cpp, which the build (setup.py, CMake)
// compiles with -mavx2 -mfma -mf16c; every other file is baseline code.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SOAP_KERNELS_CPU_AVX2 1
#else
#define SOAP_KERNELS_CPU_AVX2 0
#endif

namespace soap_kernels::cpu {

// Elements [begin, end) of one tensor of the list. Pointers are the tensors' data pointers.
using MomentUpdateChunkFn = void (*)(float* exp_avg, float* exp_avg_sq, const float* grad, float* direction,
    int64_t begin, int64_t end, const MomentHyper& hyper);
// param and grad point to elements of the table entry's dtype (float, BFloat16 or Half).
using AdamStepChunkFn = void (*)(void* param, const void* grad, float* exp_avg, float* exp_avg_sq,
    int64_t begin, int64_t end, float step_size, const AdamHyper& hyper);

struct KernelTable {
  const char* name;  // "DEFAULT" or "AVX2", reported by soap_kernels::cpu_kernel_variant
  MomentUpdateChunkFn moment_update;
  AdamStepChunkFn adam_step_float;
  AdamStepChunkFn adam_step_bfloat16;
  AdamStepChunkFn adam_step_half;
};

const KernelTable& kernels_default();
#if SOAP_KERNELS_CPU_AVX2
const KernelTable& kernels_avx2();
#endif

}  // namespace soap_kernels::cpu
