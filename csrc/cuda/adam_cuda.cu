// CUDA implementations of soap_kernels::moment_update and soap_kernels::adam_step.
//
// Multi-tensor launch (cuda/launch_table.h): one block per 16 Ki-element chunk of any tensor of
// the list, the tensor table in the kernel parameters. Within a chunk each thread moves kVec
// consecutive elements per step with one wide load/store per stream (16 B for fp32, 8 B for
// bf16/fp16) when every pointer of the tensor is aligned for it, and element-wise otherwise.
//
// Numerics: the element-wise math is written as torch's CUDA kernels write it (lerp in
// ATen/native/Lerp.h, `a * b` for mul_, `self + value * t1 * t2` for addcmul_, `a + alpha * b` for
// add_), so nvcc contracts the same products into FMAs; sqrt and division are IEEE (no fast
// math). Untested on a GPU in this repository's CI (the CUDA build is compile-checked only).
#include "adam.h"
#include "cuda/launch_table.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <vector>

namespace soap_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

// kVec elements of T, loaded and stored as one aligned access.
template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* ptr, float (&out)[kVec]) {
  const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(ptr);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    out[k] = static_cast<float>(pack.v[k]);
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const float (&in)[kVec]) {
  Pack<T> pack;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    pack.v[k] = static_cast<T>(in[k]);  // round to nearest even, as torch's casts
  }
  *reinterpret_cast<Pack<T>*>(ptr) = pack;
}

template <typename T>
__device__ __forceinline__ bool pack_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0;
}

// One element of the moment update; returns the direction. FLOPs ~10, see csrc/adam.h for bytes.
__device__ __forceinline__ float moment_step(float& m, float& v, float g, const MomentHyper& h) {
  // torch's lerp: the branch keeps the result exact at both ends of the weight's range.
  const float w = h.lerp_weight;
  m = h.lerp_weight_small ? m + w * (g - m) : g - (g - m) * (1.0f - w);
  const float v_scaled = v * h.beta2;
  v = v_scaled + h.one_minus_beta2 * g * g;
  return m / (::sqrtf(v) + h.eps);
}

// Moment update: reads exp_avg, exp_avg_sq, grad; writes exp_avg, exp_avg_sq, direction (24 B/elem).
__global__ void __launch_bounds__(kThreads)
    moment_update_kernel(const LaunchTable<4> table, const MomentHyper hyper) {
  const int slot = block_slot(table, blockIdx.x);
  auto* exp_avg = static_cast<float*>(table.ptr[0][slot]);
  auto* exp_avg_sq = static_cast<float*>(table.ptr[1][slot]);
  const auto* grad = static_cast<const float*>(table.ptr[2][slot]);
  auto* direction = static_cast<float*>(table.ptr[3][slot]);
  const ChunkRange range = block_range(table, slot, blockIdx.x);
  int64_t scalar_begin = range.begin;
  if (pack_aligned<float>(exp_avg) && pack_aligned<float>(exp_avg_sq) && pack_aligned<float>(grad) &&
      pack_aligned<float>(direction)) {
    // Chunks start at multiples of kChunk, so aligned bases give aligned packs.
    const int64_t vec_end = range.begin + (range.end - range.begin) / kVec * kVec;
    for (int64_t i = range.begin + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) {
      float m[kVec], v[kVec], g[kVec], d[kVec];
      load_pack(exp_avg + i, m);
      load_pack(exp_avg_sq + i, v);
      load_pack(grad + i, g);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        d[k] = moment_step(m[k], v[k], g[k], hyper);
      }
      store_pack(exp_avg + i, m);
      store_pack(exp_avg_sq + i, v);
      store_pack(direction + i, d);
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < range.end; i += kThreads) {
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    direction[i] = moment_step(m, v, grad[i], hyper);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

__device__ __forceinline__ float adam_param_step(float p, float d, float neg_step_size, const AdamHyper& h) {
  p = p + neg_step_size * d;  // torch's add_(d, alpha=-step_size)
  if (h.weight_decay) {
    p = p + h.neg_lr_weight_decay * p;  // SOAP's reference decays the updated parameter
  }
  return p;
}

// Adam: reads p, g, exp_avg, exp_avg_sq; writes p, exp_avg, exp_avg_sq.
// Bytes per element: 2*sizeof(param_t) + sizeof(param_t) + 16.
template <typename param_t>
__global__ void __launch_bounds__(kThreads)
    adam_step_kernel(const LaunchTable<4> table, const float* step_size_tensor, const AdamHyper hyper) {
  const int slot = block_slot(table, blockIdx.x);
  auto* param = static_cast<param_t*>(table.ptr[0][slot]);
  const auto* grad = static_cast<const param_t*>(table.ptr[1][slot]);
  auto* exp_avg = static_cast<float*>(table.ptr[2][slot]);
  auto* exp_avg_sq = static_cast<float*>(table.ptr[3][slot]);
  const float step_size =
      step_size_tensor != nullptr ? step_size_tensor[table.list_index[slot]] : table.step_size[slot];
  const float neg_step_size = -step_size;
  const ChunkRange range = block_range(table, slot, blockIdx.x);
  int64_t scalar_begin = range.begin;
  if (pack_aligned<param_t>(param) && pack_aligned<param_t>(grad) && pack_aligned<float>(exp_avg) &&
      pack_aligned<float>(exp_avg_sq)) {
    const int64_t vec_end = range.begin + (range.end - range.begin) / kVec * kVec;
    for (int64_t i = range.begin + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) {
      float p[kVec], g[kVec], m[kVec], v[kVec];
      load_pack(param + i, p);
      load_pack(grad + i, g);
      load_pack(exp_avg + i, m);
      load_pack(exp_avg_sq + i, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float d = moment_step(m[k], v[k], g[k], hyper.moment);
        p[k] = adam_param_step(p[k], d, neg_step_size, hyper);
      }
      store_pack(exp_avg + i, m);
      store_pack(exp_avg_sq + i, v);
      store_pack(param + i, p);
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < range.end; i += kThreads) {
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    const float d = moment_step(m, v, static_cast<float>(grad[i]), hyper.moment);
    param[i] = static_cast<param_t>(adam_param_step(static_cast<float>(param[i]), d, neg_step_size, hyper));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

void moment_update_cuda(at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList grad,
    at::TensorList direction, double beta1, double beta2, double eps) {
  check_moment_update_args(exp_avg, exp_avg_sq, grad, direction, c10::DeviceType::CUDA);
  const MomentHyper hyper = make_moment_hyper(beta1, beta2, eps);
  std::vector<TensorEntry<4>> tensors;
  for (size_t i = 0; i < exp_avg.size(); ++i) {
    tensors.push_back({{exp_avg[i].data_ptr(), exp_avg_sq[i].data_ptr(), const_cast<void*>(grad[i].const_data_ptr()),
                          direction[i].data_ptr()},
        exp_avg[i].numel(), 0.0f, static_cast<int32_t>(i)});
  }
  if (exp_avg.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(exp_avg[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_over_chunks<4>(tensors, [&](const LaunchTable<4>& table, unsigned int blocks) {
    moment_update_kernel<<<blocks, kThreads, 0, stream>>>(table, hyper);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One launch sequence per param dtype present in the list (the kernel is templated on it).
void adam_step_cuda_impl(at::TensorList param, at::TensorList grad, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    const std::vector<float>& step_sizes, const float* step_size_tensor, const AdamHyper& hyper) {
  if (param.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(param[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    std::vector<TensorEntry<4>> tensors;
    for (size_t i = 0; i < param.size(); ++i) {
      if (param[i].scalar_type() != dtype) {
        continue;
      }
      tensors.push_back({{param[i].data_ptr(), const_cast<void*>(grad[i].const_data_ptr()), exp_avg[i].data_ptr(),
                            exp_avg_sq[i].data_ptr()},
          param[i].numel(), step_sizes.empty() ? 0.0f : step_sizes[i], static_cast<int32_t>(i)});
    }
    if (tensors.empty()) {
      continue;
    }
    const auto launch = [&](const LaunchTable<4>& table, unsigned int blocks) {
      switch (dtype) {
        case at::kFloat:
          adam_step_kernel<float><<<blocks, kThreads, 0, stream>>>(table, step_size_tensor, hyper);
          break;
        case at::kBFloat16:
          adam_step_kernel<c10::BFloat16><<<blocks, kThreads, 0, stream>>>(table, step_size_tensor, hyper);
          break;
        default:
          adam_step_kernel<c10::Half><<<blocks, kThreads, 0, stream>>>(table, step_size_tensor, hyper);
          break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch_over_chunks<4>(tensors, launch);
  }
}

void adam_step_cuda(at::TensorList param, at::TensorList grad, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    c10::ArrayRef<double> step_size, double beta1, double beta2, double eps, double lr_weight_decay) {
  check_adam_step_args(param, grad, exp_avg, exp_avg_sq, c10::DeviceType::CUDA);
  const std::vector<float> step_sizes = check_step_sizes(step_size, param.size());
  const AdamHyper hyper = make_adam_hyper(beta1, beta2, eps, lr_weight_decay);
  adam_step_cuda_impl(param, grad, exp_avg, exp_avg_sq, step_sizes, nullptr, hyper);
}

void adam_step_tensor_cuda(at::TensorList param, at::TensorList grad, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, const at::Tensor& step_size, double beta1, double beta2, double eps,
    double lr_weight_decay) {
  check_adam_step_args(param, grad, exp_avg, exp_avg_sq, c10::DeviceType::CUDA);
  const c10::Device device = param.empty() ? step_size.device() : param[0].device();
  check_step_size_tensor(step_size, param.size(), device);
  const AdamHyper hyper = make_adam_hyper(beta1, beta2, eps, lr_weight_decay);
  adam_step_cuda_impl(param, grad, exp_avg, exp_avg_sq, {}, step_size.const_data_ptr<float>(), hyper);
}

}  // namespace
}  // namespace soap_kernels::cuda

TORCH_LIBRARY_IMPL(soap_kernels, CUDA, m) {
  m.impl("moment_update", &soap_kernels::cuda::moment_update_cuda);
  m.impl("adam_step", &soap_kernels::cuda::adam_step_cuda);
  m.impl("adam_step.tensor", &soap_kernels::cuda::adam_step_tensor_cuda);
}
