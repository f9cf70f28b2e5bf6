// soap_kernels::moment_update and soap_kernels::adam_step: what every backend shares.
//
// The ops (schemas in adam.cpp):
//   moment_update(exp_avg[], exp_avg_sq[], grad[], direction[], beta1, beta2, eps) -> ()
//     in place  exp_avg    <- lerp(exp_avg, grad, 1-beta1)          (= beta1*exp_avg + (1-beta1)*grad)
//               exp_avg_sq <- beta2*exp_avg_sq + (1-beta2)*grad^2
//     output    direction  <- exp_avg / (sqrt(exp_avg_sq) + eps)   (a separate buffer, fully written)
//     fp32 only; 24 bytes per element (read m, v, g; write m, v, d).
//   adam_step(param[], grad[], exp_avg[], exp_avg_sq[], step_size, beta1, beta2, eps, lr_weight_decay)
//     the same moment update, then p <- p - step_size[i] * exp_avg / (sqrt(exp_avg_sq) + eps),
//     then (if lr_weight_decay != 0) p <- p - lr_weight_decay * p, on the updated p (SOAP's
//     reference order, not AdamW's). param/grad fp32, bf16 or fp16 (the same dtype for a pair), state
//     fp32, math fp32, p rounded once. Bytes per element: 2*sizeof(p) + sizeof(g) + 16.
//
// Every hyperparameter is rounded to fp32 exactly where torch's own ops round it (a Python double
// such as 1-beta1 is formed in double, then cast), so that the kernels reproduce the separate torch
// ops bit for bit where the arithmetic is the same.
#pragma once

#include "hyper.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace soap_kernels {

MomentHyper make_moment_hyper(double beta1, double beta2, double eps);
AdamHyper make_adam_hyper(double beta1, double beta2, double eps, double lr_weight_decay);

// Argument checks shared by the CPU and CUDA implementations. They throw c10 errors that reach
// Python as TypeError (dtype) or ValueError (lengths, shapes, devices, layout), naming the op, the
// list and the index, so the caller can fix the call.
void check_moment_update_args(at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList grad,
    at::TensorList direction, c10::DeviceType device_type);
void check_adam_step_args(
    at::TensorList param,
    at::TensorList grad,
    at::TensorList exp_avg,
    at::TensorList exp_avg_sq,
    c10::DeviceType device_type);
// The step sizes of the float[] overload, as fp32 (torch casts add_'s alpha to fp32 the same way).
std::vector<float> check_step_sizes(c10::ArrayRef<double> step_size, size_t num_tensors);
// The Tensor overload: a 1-D fp32 contiguous tensor of num_tensors entries on `device`.
void check_step_size_tensor(const at::Tensor& step_size, size_t num_tensors, c10::Device device);

}  // namespace soap_kernels
