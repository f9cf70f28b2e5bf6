// The vectorized CPU kernels of moment_update and adam_step, for one instruction set.
//
// Included by adam_default.cpp and adam_avx2.cpp after CPU_CAPABILITY (and, for AVX2,
// CPU_CAPABILITY_AVX2) is defined, so at::vec::Vectorized resolves to that instruction set and every
// symbol lands in a namespace of its own (at::vec's Note [CPU_CAPABILITY namespace]).
//
// Numerics: each step reproduces the torch op sequence it replaces, with torch's own rounding
// points. at::vec::fmadd is a fused multiply-add exactly where torch's kernels are fused (AVX2 and
// up) and a multiply then add in the baseline build, as torch's own DEFAULT kernels are:
//   lerp_(g, w)              fmadd(w, g-m, m) if |w| < 0.5 else fmadd(w-1, g-m, g)   (LerpKernel.cpp)
//   mul_(b2).addcmul_(g, g, value=c)   fmadd(c*g, g, v*b2)   (torch's AVX2/AVX512 builds contract
//                            `self + c*t1*t2` into this; the baseline build rounds the product first,
//                            as the baseline fmadd does)
//   m / v.sqrt().add_(eps)   m / (sqrt(v) + eps), all correctly rounded
//   p.add_(d, alpha=-s)      fmadd(d, -s, p)   (torch's vectorized add with alpha)
//   p.add_(p, alpha=-lr*wd)  fmadd(p, -lr*wd, p)
// Measured on this machine's torch 2.13 (AVX512, and ATEN_CPU_CAPABILITY=default): bitwise equal.
#pragma once

#include "cpu/kernel_table.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including adam_kernel.h"
#endif

namespace soap_kernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using FloatVec = at::vec::Vectorized<float>;
constexpr int64_t kFloatLanes = FloatVec::size();
// One block is two float vectors: one vector of a 16-bit type converts to exactly two float vectors.
constexpr int64_t kBlock = 2 * kFloatLanes;

// Loads/stores kBlock elements (or a shorter tail of n, zero-filled) of T as two float vectors.
template <typename T>
struct BlockIo {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  using LowVec = at::vec::Vectorized<T>;
  static_assert(LowVec::size() == kBlock, "a 16-bit vector must hold two float vectors");

  static void load(const T* ptr, int64_t n, FloatVec& lo, FloatVec& hi) {
    const LowVec x = n == kBlock ? LowVec::loadu(ptr) : LowVec::loadu(ptr, n);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(x);
  }
  // One rounding to T (round to nearest even), as Tensor.copy_ from fp32 rounds.
  static void store(T* ptr, int64_t n, const FloatVec& lo, const FloatVec& hi) {
    const LowVec x = at::vec::convert_from_float<T>(lo, hi);
    if (n == kBlock) {
      x.store(ptr);
    } else {
      x.store(ptr, static_cast<int>(n));
    }
  }
};

template <>
struct BlockIo<float> {
  static void load(const float* ptr, int64_t n, FloatVec& lo, FloatVec& hi) {
    if (n == kBlock) {
      lo = FloatVec::loadu(ptr);
      hi = FloatVec::loadu(ptr + kFloatLanes);
    } else {
      lo = FloatVec::loadu(ptr, static_cast<int64_t>(std::min(n, kFloatLanes)));
      hi = n > kFloatLanes ? FloatVec::loadu(ptr + kFloatLanes, n - kFloatLanes) : FloatVec(0.0f);
    }
  }
  static void store(float* ptr, int64_t n, const FloatVec& lo, const FloatVec& hi) {
    if (n == kBlock) {
      lo.store(ptr);
      hi.store(ptr + kFloatLanes);
    } else {
      lo.store(ptr, static_cast<int>(std::min(n, kFloatLanes)));
      if (n > kFloatLanes) {
        hi.store(ptr + kFloatLanes, static_cast<int>(n - kFloatLanes));
      }
    }
  }
};

// The moment update of one float vector; returns the direction m / (sqrt(v) + eps).
struct MomentMath {
  FloatVec weight, weight_minus_one, beta2, one_minus_beta2, eps;

  explicit MomentMath(const MomentHyper& h)
      : weight(h.lerp_weight),
        // torch forms w - 1 in fp32 from the fp32 weight; so do we.
        weight_minus_one(h.lerp_weight - 1.0f),
        beta2(h.beta2),
        one_minus_beta2(h.one_minus_beta2),
        eps(h.eps) {}

  template <bool kSmallWeight>
  FloatVec step(FloatVec& m, FloatVec& v, const FloatVec& g) const {
    const FloatVec diff = g - m;
    if constexpr (kSmallWeight) {
      m = at::vec::fmadd(weight, diff, m);
    } else {
      m = at::vec::fmadd(weight_minus_one, diff, g);
    }
    v = at::vec::fmadd(one_minus_beta2 * g, g, v * beta2);
    return m / (v.sqrt() + eps);
  }
};

// FLOPs per element: lerp 3, second moment 4, direction 3 (sqrt and div counted once).
// Bytes per element: 12 read (m, v, g) + 12 written (m, v, direction).
template <bool kSmallWeight>
void moment_update_chunk_impl(float* exp_avg, float* exp_avg_sq, const float* grad, float* direction,
    int64_t begin, int64_t end, const MomentHyper& hyper) {
  const MomentMath math(hyper);
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t n = std::min(kBlock, end - i);
    FloatVec m0, m1, v0, v1, g0, g1;
    BlockIo<float>::load(exp_avg + i, n, m0, m1);
    BlockIo<float>::load(exp_avg_sq + i, n, v0, v1);
    BlockIo<float>::load(grad + i, n, g0, g1);
    const FloatVec d0 = math.step<kSmallWeight>(m0, v0, g0);
    const FloatVec d1 = math.step<kSmallWeight>(m1, v1, g1);
    BlockIo<float>::store(exp_avg + i, n, m0, m1);
    BlockIo<float>::store(exp_avg_sq + i, n, v0, v1);
    BlockIo<float>::store(direction + i, n, d0, d1);
  }
}

void moment_update_chunk(float* exp_avg, float* exp_avg_sq, const float* grad, float* direction, int64_t begin,
    int64_t end, const MomentHyper& hyper) {
  if (hyper.lerp_weight_small) {
    moment_update_chunk_impl<true>(exp_avg, exp_avg_sq, grad, direction, begin, end, hyper);
  } else {
    moment_update_chunk_impl<false>(exp_avg, exp_avg_sq, grad, direction, begin, end, hyper);
  }
}

// Adam on one chunk; math in fp32, param_t in/out with one rounding. Bytes per element:
// 2*sizeof(param_t) (read+write p) + sizeof(param_t) (g) + 16 (read+write m, v).
template <typename param_t, bool kSmallWeight, bool kWeightDecay>
void adam_step_chunk_impl(param_t* param, const param_t* grad, float* exp_avg, float* exp_avg_sq, int64_t begin,
    int64_t end, float step_size, const AdamHyper& hyper) {
  const MomentMath math(hyper.moment);
  const FloatVec neg_step_size(-step_size);
  const FloatVec neg_lr_weight_decay(hyper.neg_lr_weight_decay);
  for (int64_t i = begin; i < end; i += kBlock) {
    const int64_t n = std::min(kBlock, end - i);
    FloatVec p0, p1, g0, g1, m0, m1, v0, v1;
    BlockIo<param_t>::load(param + i, n, p0, p1);
    BlockIo<param_t>::load(grad + i, n, g0, g1);
    BlockIo<float>::load(exp_avg + i, n, m0, m1);
    BlockIo<float>::load(exp_avg_sq + i, n, v0, v1);
    const FloatVec d0 = math.step<kSmallWeight>(m0, v0, g0);
    const FloatVec d1 = math.step<kSmallWeight>(m1, v1, g1);
    p0 = at::vec::fmadd(d0, neg_step_size, p0);
    p1 = at::vec::fmadd(d1, neg_step_size, p1);
    if constexpr (kWeightDecay) {
      // SOAP's reference decays the already-updated parameter.
      p0 = at::vec::fmadd(p0, neg_lr_weight_decay, p0);
      p1 = at::vec::fmadd(p1, neg_lr_weight_decay, p1);
    }
    BlockIo<float>::store(exp_avg + i, n, m0, m1);
    BlockIo<float>::store(exp_avg_sq + i, n, v0, v1);
    BlockIo<param_t>::store(param + i, n, p0, p1);
  }
}

template <typename param_t>
void adam_step_chunk(void* param, const void* grad, float* exp_avg, float* exp_avg_sq, int64_t begin, int64_t end,
    float step_size, const AdamHyper& hyper) {
  auto* p = static_cast<param_t*>(param);
  const auto* g = static_cast<const param_t*>(grad);
  const bool small = hyper.moment.lerp_weight_small;
  if (small && hyper.weight_decay) {
    adam_step_chunk_impl<param_t, true, true>(p, g, exp_avg, exp_avg_sq, begin, end, step_size, hyper);
  } else if (small) {
    adam_step_chunk_impl<param_t, true, false>(p, g, exp_avg, exp_avg_sq, begin, end, step_size, hyper);
  } else if (hyper.weight_decay) {
    adam_step_chunk_impl<param_t, false, true>(p, g, exp_avg, exp_avg_sq, begin, end, step_size, hyper);
  } else {
    adam_step_chunk_impl<param_t, false, false>(p, g, exp_avg, exp_avg_sq, begin, end, step_size, hyper);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace soap_kernels::cpu
