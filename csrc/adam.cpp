// Schemas of the soap_kernels ops (defined once, here) and the argument checks every backend uses.
// The CPU kernels register in cpu/adam_cpu.cpp, the CUDA kernels in cuda/adam_cuda.cu, the fake
// (meta) implementations for torch.compile in soap_kernels/_native.py.
#include "adam.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

namespace soap_kernels {

MomentHyper make_moment_hyper(double beta1, double beta2, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(beta1) && std::isfinite(beta2) && std::isfinite(eps),
      "soap_kernels: beta1, beta2 and eps must be finite, got ", beta1, ", ", beta2, ", ", eps);
  MomentHyper h{};
  // 1 - beta1 is formed in double and then rounded, as Python's `1.0 - beta1` followed by
  // lerp_'s cast of its Scalar weight.
  h.lerp_weight = static_cast<float>(1.0 - beta1);
  h.lerp_weight_small = std::abs(h.lerp_weight) < 0.5f;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  return h;
}

AdamHyper make_adam_hyper(double beta1, double beta2, double eps, double lr_weight_decay) {
  TORCH_CHECK_VALUE(std::isfinite(lr_weight_decay),
      "soap_kernels::adam_step: lr_weight_decay must be finite, got ", lr_weight_decay);
  AdamHyper h{};
  h.moment = make_moment_hyper(beta1, beta2, eps);
  h.neg_lr_weight_decay = static_cast<float>(-lr_weight_decay);
  h.weight_decay = lr_weight_decay != 0.0;
  return h;
}

namespace {

void check_list_lengths(const char* op, std::initializer_list<std::pair<const char*, size_t>> lists) {
  const auto& first = *lists.begin();
  for (const auto& [name, size] : lists) {
    TORCH_CHECK_VALUE(size == first.second, op, ": the lists must have one entry per tensor, but ",
        first.first, " has ", first.second, " and ", name, " has ", size);
  }
}

// Layout, device and shape of one entry of a list against the entry that sets the rules.
void check_entry(const char* op, const char* name, size_t i, const at::Tensor& t, const at::Tensor& like,
    c10::Device device) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, "[", i, "] is an undefined tensor");
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
      " but the call works on ", device, "; every tensor of one call must be on one device");
  TORCH_CHECK_VALUE(t.sizes().equals(like.sizes()), op, ": ", name, "[", i, "] has shape ", t.sizes(),
      " but the matching tensor has shape ", like.sizes());
  // The kernels walk memory linearly; a strided view would be read in the wrong order.
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, "[", i, "] is not contiguous (strides ",
      t.strides(), "); the fused kernels need contiguous tensors, pass .contiguous() ones");
  TORCH_CHECK_VALUE(!t.is_complex(), op, ": ", name, "[", i, "] is complex; only real tensors are supported");
}

void check_fp32(const char* op, const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, "[", i,
      "] must be float32 (optimizer state and math are fp32), got ", t.scalar_type());
}

}  // namespace

void check_moment_update_args(at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList grad,
    at::TensorList direction, c10::DeviceType device_type) {
  constexpr const char* op = "soap_kernels::moment_update";
  check_list_lengths(op, {{"exp_avg", exp_avg.size()}, {"exp_avg_sq", exp_avg_sq.size()}, {"grad", grad.size()},
                             {"direction", direction.size()}});
  if (exp_avg.empty()) {
    return;
  }
  const c10::Device device = exp_avg[0].device();
  TORCH_CHECK_VALUE(device.type() == device_type, op, ": exp_avg[0] is on ", device,
      " but this is the ", c10::DeviceTypeName(device_type), " implementation");
  for (size_t i = 0; i < exp_avg.size(); ++i) {
    check_entry(op, "exp_avg", i, exp_avg[i], exp_avg[i], device);
    check_entry(op, "exp_avg_sq", i, exp_avg_sq[i], exp_avg[i], device);
    check_entry(op, "grad", i, grad[i], exp_avg[i], device);
    check_entry(op, "direction", i, direction[i], exp_avg[i], device);
    check_fp32(op, "exp_avg", i, exp_avg[i]);
    check_fp32(op, "exp_avg_sq", i, exp_avg_sq[i]);
    check_fp32(op, "grad", i, grad[i]);
    check_fp32(op, "direction", i, direction[i]);
    // The kernels store direction after the moments; sharing memory with them would lose data.
    for (const at::Tensor* input : {&exp_avg[i], &exp_avg_sq[i], &grad[i]}) {
      TORCH_CHECK_VALUE(at::get_overlap_status(direction[i], *input) == at::MemOverlapStatus::No, op,
          ": direction[", i, "] overlaps an input of the same index; pass a separate output tensor");
    }
  }
}

void check_adam_step_args(
    at::TensorList param,
    at::TensorList grad,
    at::TensorList exp_avg,
    at::TensorList exp_avg_sq,
    c10::DeviceType device_type) {
  constexpr const char* op = "soap_kernels::adam_step";
  check_list_lengths(op,
      {{"param", param.size()}, {"grad", grad.size()}, {"exp_avg", exp_avg.size()},
          {"exp_avg_sq", exp_avg_sq.size()}});
  if (param.empty()) {
    return;
  }
  const c10::Device device = param[0].device();
  TORCH_CHECK_VALUE(device.type() == device_type, op, ": param[0] is on ", device, " but this is the ",
      c10::DeviceTypeName(device_type), " implementation");
  for (size_t i = 0; i < param.size(); ++i) {
    check_entry(op, "param", i, param[i], param[i], device);
    check_entry(op, "grad", i, grad[i], param[i], device);
    check_entry(op, "exp_avg", i, exp_avg[i], param[i], device);
    check_entry(op, "exp_avg_sq", i, exp_avg_sq[i], param[i], device);
    const auto dtype = param[i].scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": param[", i,
        "] has dtype ", dtype, "; supported are float32, bfloat16 and float16");
    TORCH_CHECK_TYPE(grad[i].scalar_type() == dtype, op, ": grad[", i, "] has dtype ", grad[i].scalar_type(),
        " but param[", i, "] has ", dtype, "; cast the gradient to the parameter's dtype");
    check_fp32(op, "exp_avg", i, exp_avg[i]);
    check_fp32(op, "exp_avg_sq", i, exp_avg_sq[i]);
  }
}

std::vector<float> check_step_sizes(c10::ArrayRef<double> step_size, size_t num_tensors) {
  TORCH_CHECK_VALUE(step_size.size() == num_tensors, "soap_kernels::adam_step: step_size has ",
      step_size.size(), " entries but there are ", num_tensors, " parameters (one step size per parameter)");
  std::vector<float> out;
  out.reserve(step_size.size());
  for (const double s : step_size) {
    out.push_back(static_cast<float>(s));
  }
  return out;
}

void check_step_size_tensor(const at::Tensor& step_size, size_t num_tensors, c10::Device device) {
  constexpr const char* op = "soap_kernels::adam_step";
  TORCH_CHECK_VALUE(step_size.dim() == 1 && static_cast<size_t>(step_size.numel()) == num_tensors, op,
      ": step_size must be a 1-D tensor with one entry per parameter (", num_tensors, "), got shape ",
      step_size.sizes());
  TORCH_CHECK_TYPE(step_size.scalar_type() == at::kFloat, op, ": step_size must be float32, got ",
      step_size.scalar_type());
  // Reading it where the kernel runs keeps the step free of host synchronisation.
  TORCH_CHECK_VALUE(step_size.device() == device, op, ": step_size is on ", step_size.device(),
      " but the parameters are on ", device);
  TORCH_CHECK_VALUE(step_size.is_contiguous(), op, ": step_size must be contiguous");
}

}  // namespace soap_kernels

// moment_update writes its result into `direction` (the Python wrapper allocates it) rather than
// returning a new list: torch.compile functionalises mutating custom ops only when they return no
// list of tensors, and a caller-owned buffer can be reused from step to step.
TORCH_LIBRARY(soap_kernels, m) {
  // The fake implementations live in Python; this tells torch where to find them.
  m.set_python_module("soap_kernels._native");
  m.def(
      "moment_update(Tensor(a!)[] exp_avg, Tensor(b!)[] exp_avg_sq, Tensor[] grad, Tensor(c!)[] direction, "
      "float beta1, float beta2, float eps) -> ()");
  m.def(
      "adam_step(Tensor(a!)[] param, Tensor[] grad, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "float[] step_size, float beta1, float beta2, float eps, float lr_weight_decay) -> ()");
  // The same op with the step sizes in a tensor: the caller can keep step counts on the device.
  m.def(
      "adam_step.tensor(Tensor(a!)[] param, Tensor[] grad, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "Tensor step_size, float beta1, float beta2, float eps, float lr_weight_decay) -> ()");
}
