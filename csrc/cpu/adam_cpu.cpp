// CPU implementations of soap_kernels::moment_update and soap_kernels::adam_step.
//
// Multi-tensor: every tensor of the list is cut into chunks of kChunk elements and one
// at::parallel_for spreads all chunks of all tensors over the threads, so a list of many small
// tensors and a list of a few large ones both keep every thread busy. The chunk kernels
// (adam_kernel.h) are picked once per process for the instruction set torch's own kernels use.
#include "adam.h"
#include "cpu/kernel_table.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

namespace soap_kernels::cpu {
namespace {

// 16 Ki elements: 64 KiB per fp32 stream, large enough that a chunk's loop overhead vanishes and
// small enough that one thread's streams stay in L2 while it works on them.
constexpr int64_t kChunk = 1 << 14;
// parallel_for runs inline below this many chunks: ~32 Ki elements take a few microseconds, about
// what waking the other threads costs.
constexpr int64_t kMinChunksPerTask = 2;

const KernelTable& selected_kernels() {
  static const KernelTable& table = []() -> const KernelTable& {
#if SOAP_KERNELS_CPU_AVX2
    // Follow torch (it honours ATEN_CPU_CAPABILITY): our fused multiply-adds then match its kernels'.
    const std::string capability = at::get_cpu_capability();
    const bool torch_uses_avx2 = capability == "AVX2" || capability == "AVX512";
    if (torch_uses_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return kernels_avx2();
    }
#endif
    return kernels_default();
  }();
  return table;
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t numel = tensors[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(t), begin, std::min(numel, begin + kChunk)});
    }
  }
  return chunks;
}

template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kMinChunksPerTask, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      fn(chunks[c]);
    }
  });
}

void moment_update_cpu(at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList grad,
    at::TensorList direction, double beta1, double beta2, double eps) {
  check_moment_update_args(exp_avg, exp_avg_sq, grad, direction, c10::DeviceType::CPU);
  const MomentHyper hyper = make_moment_hyper(beta1, beta2, eps);
  const auto kernel = selected_kernels().moment_update;
  for_each_chunk(make_chunks(exp_avg), [&](const Chunk& c) {
    kernel(exp_avg[c.tensor].data_ptr<float>(), exp_avg_sq[c.tensor].data_ptr<float>(),
        grad[c.tensor].const_data_ptr<float>(), direction[c.tensor].data_ptr<float>(), c.begin, c.end, hyper);
  });
}

void adam_step_cpu_impl(at::TensorList param, at::TensorList grad, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    const float* step_size, const AdamHyper& hyper) {
  const KernelTable& table = selected_kernels();
  std::vector<AdamStepChunkFn> kernel(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    switch (param[i].scalar_type()) {
      case at::kFloat:
        kernel[i] = table.adam_step_float;
        break;
      case at::kBFloat16:
        kernel[i] = table.adam_step_bfloat16;
        break;
      case at::kHalf:
        kernel[i] = table.adam_step_half;
        break;
      default:
        TORCH_INTERNAL_ASSERT(false, "dtype checked in check_adam_step_args");
    }
  }
  for_each_chunk(make_chunks(param), [&](const Chunk& c) {
    const auto t = c.tensor;
    kernel[t](param[t].data_ptr(), grad[t].const_data_ptr(), exp_avg[t].data_ptr<float>(),
        exp_avg_sq[t].data_ptr<float>(), c.begin, c.end, step_size[t], hyper);
  });
}

void adam_step_cpu(at::TensorList param, at::TensorList grad, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    c10::ArrayRef<double> step_size, double beta1, double beta2, double eps, double lr_weight_decay) {
  check_adam_step_args(param, grad, exp_avg, exp_avg_sq, c10::DeviceType::CPU);
  const std::vector<float> step_sizes = check_step_sizes(step_size, param.size());
  const AdamHyper hyper = make_adam_hyper(beta1, beta2, eps, lr_weight_decay);
  adam_step_cpu_impl(param, grad, exp_avg, exp_avg_sq, step_sizes.data(), hyper);
}

void adam_step_tensor_cpu(at::TensorList param, at::TensorList grad, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, const at::Tensor& step_size, double beta1, double beta2, double eps,
    double lr_weight_decay) {
  check_adam_step_args(param, grad, exp_avg, exp_avg_sq, c10::DeviceType::CPU);
  const c10::Device device = param.empty() ? step_size.device() : param[0].device();
  check_step_size_tensor(step_size, param.size(), device);
  const AdamHyper hyper = make_adam_hyper(beta1, beta2, eps, lr_weight_decay);
  adam_step_cpu_impl(param, grad, exp_avg, exp_avg_sq, step_size.const_data_ptr<float>(), hyper);
}

}  // namespace

// Which CPU kernel variant this process uses ("AVX2" or "DEFAULT"), for reports and benchmarks.
std::string cpu_kernel_variant() {
  return selected_kernels().name;
}

}  // namespace soap_kernels::cpu

TORCH_LIBRARY_FRAGMENT(soap_kernels, m) {
  m.def("cpu_kernel_variant() -> str", &soap_kernels::cpu::cpu_kernel_variant);
}

TORCH_LIBRARY_IMPL(soap_kernels, CPU, m) {
  m.impl("moment_update", &soap_kernels::cpu::moment_update_cpu);
  m.impl("adam_step", &soap_kernels::cpu::adam_step_cpu);
  m.impl("adam_step.tensor", &soap_kernels::cpu::adam_step_tensor_cpu);
}
