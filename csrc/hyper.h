// Runtime hyperparameters of the kernels, already rounded to the fp32 the kernels compute in
// (see make_moment_hyper in adam.cpp). Plain structs without torch headers, so that the per-ISA CPU
// kernels and the CUDA kernels can include them cheaply.
#pragma once

namespace soap_kernels {

// Runtime hyperparameters of the moment update, already in the precision the kernels use.
struct MomentHyper {
  float lerp_weight;       // float(1 - beta1): torch's lerp_ casts its Scalar weight to fp32
  bool lerp_weight_small;  // |w| < 0.5 picks torch's lerp branch (see lerp in ATen/native/Lerp.h)
  float beta2;             // float(beta2), as exp_avg_sq.mul_(beta2)
  float one_minus_beta2;   // float(1 - beta2), as addcmul_(g, g, value=1-beta2)
  float eps;               // float(eps), as .add_(eps)
};

// adam_step adds the decoupled decay; the step size is per tensor and kept apart.
struct AdamHyper {
  MomentHyper moment;
  float neg_lr_weight_decay;  // float(-lr*wd), as p.add_(p, alpha=-lr*wd)
  bool weight_decay;          // lr_weight_decay != 0
};

}  // namespace soap_kernels
