"""SOAP's entry for PyTorch's generic optimizer tests (``tests/test_torch_optim.py``).

PyTorch describes each optimizer under test with an ``OptimizerInfo`` (``optim_db`` in
``torch.testing._internal.common_optimizers``, shipped in the torch wheel): the configurations to
construct it with (``optim_inputs_func``), the inputs that must raise (``optim_error_inputs_func``),
the LR schedulers to compose it with, which implementation flags it has (``foreach``, ``fused``,
``differentiable``, ``capturable``), whether it takes sparse or complex gradients, and the tests
that do not apply to it (``skips``). This module builds the same description for SOAP.
"""

from __future__ import annotations

import sys
import types
import unittest

import torch

try:  # torch.testing._internal.common_utils imports expecttest, which only its inline-expect
    import expecttest  # noqa: F401  # assertions use; none of these tests does.
except ImportError:  # pragma: no cover - depends on the environment
    _shim = types.ModuleType("expecttest")
    _shim.TestCase = unittest.TestCase
    _shim.ACCEPT = False
    sys.modules["expecttest"] = _shim

from torch.optim.lr_scheduler import (  # noqa: E402
    ConstantLR,
    ExponentialLR,
    LinearLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)

# PyTorch's test harness, imported here only (after the expecttest shim) and re-exported.
from torch.testing._internal.common_cuda import TEST_MULTIGPU  # noqa: E402
from torch.testing._internal.common_device_type import instantiate_device_type_tests, onlyCPU, onlyCUDA  # noqa: E402
from torch.testing._internal.common_methods_invocations import DecorateInfo  # noqa: E402
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    TensorTracker,
    _get_device_type,
    _get_optim_inputs_including_global_cliquey_kwargs,
    get_error_inputs_for_all_optims,
    optims,
)
from torch.testing._internal.common_utils import TestCase, parametrize  # noqa: E402

from soap_kernels import SOAP  # noqa: E402

# The parameter dtypes SOAP supports (its state and math are fp32 for fp32/bf16/fp16 parameters and
# fp64 for fp64 ones). PyTorch's tests pin a dtype per test; ours run these where the test's check
# does not depend on fp32's resolution (see test_torch_optim.py).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def optim_inputs_func_soap(device, dtype=None):
    """SOAP configurations, as the ``optim_inputs_func_*`` of optim_db: keyword arguments only
    (the tests bring the parameters), no global-cliquey flags (SOAP has none)."""
    del device, dtype  # every configuration runs on the CPU and for every supported dtype
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.0}, desc="zero weight_decay"),
        OptimizerInput(params=None, kwargs={"normalize_grads": True}, desc="normalize_grads"),
        OptimizerInput(params=None, kwargs={"precondition_frequency": 1}, desc="refresh every step"),
        # max_precond_dim 64 makes merge_dims merge the tests' (10, 5) weights and conv kernels.
        OptimizerInput(params=None, kwargs={"merge_dims": True, "max_precond_dim": 64}, desc="merge_dims"),
        OptimizerInput(params=None, kwargs={"precondition_1d": True}, desc="precondition_1d"),
        OptimizerInput(params=None, kwargs={"backend": "reference"}, desc="reference backend"),
        OptimizerInput(params=None, kwargs={"backend": "torch"}, desc="torch backend"),
    ]


def optim_error_inputs_func_soap(device, dtype):
    """What must raise: torch's checks common to every optimizer, then SOAP's own."""
    errors = get_error_inputs_for_all_optims(device, dtype)
    param = torch.nn.Parameter(torch.randn(3, 2, device=device, dtype=dtype))

    def construction(kwargs, desc, regex, error=ValueError):
        return ErrorOptimizerInput(OptimizerInput(params=[param], kwargs=kwargs, desc=desc),
                                   error_type=error, error_regex=regex)

    errors += [
        construction({"lr": -1e-2}, "lr must be >= 0", "Invalid learning rate"),
        construction({"betas": (1.0, 0.5)}, "beta1 must be in [0, 1)", "Invalid beta parameter at index 0"),
        construction({"betas": (0.9, -0.1)}, "beta2 must be in [0, 1)", "Invalid beta parameter at index 1"),
        construction({"eps": -1.0}, "eps must be >= 0", "Invalid eps"),
        construction({"weight_decay": -1.0}, "weight_decay must be >= 0", "Invalid weight_decay"),
        construction({"shampoo_beta": 1.0}, "shampoo_beta must be < 1", "Invalid shampoo_beta"),
        construction({"precondition_frequency": 0}, "precondition_frequency must be >= 1",
                     "Invalid precondition_frequency"),
        construction({"max_precond_dim": 0}, "max_precond_dim must be >= 1", "Invalid max_precond_dim"),
        construction({"backend": "nope"}, "unknown backend", "Unknown backend"),
        construction({"data_format": "nhwc"}, "unknown data_format", "Unknown data_format"),
        ErrorOptimizerInput(
            OptimizerInput(params=[torch.randn(3, 2, dtype=torch.complex64, device=device)], kwargs={},
                           desc="complex parameters are refused"),
            error_type=ValueError, error_regex="does not support complex parameters"),
    ]
    # Refused at step(), with nothing modified.
    sparse = param.detach().clone().requires_grad_()
    sparse.grad = torch.zeros_like(sparse).to_sparse()
    nonfinite = param.detach().clone().requires_grad_()
    nonfinite.grad = torch.full_like(nonfinite, float("nan"))
    errors += [
        ErrorOptimizerInput(OptimizerInput(params=[sparse], kwargs={}, desc="sparse gradients are refused"),
                            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=ValueError,
                            error_regex="does not support sparse gradients"),
        ErrorOptimizerInput(OptimizerInput(params=[nonfinite], kwargs={}, desc="a NaN gradient raises"),
                            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=ValueError,
                            error_regex="non-finite gradient"),
    ]
    return errors


# TestOptimRenewed's tests that do not apply to SOAP, and why (README's table is made from this).
NOT_APPLICABLE = {
    "test_rosenbrock_sparse": "SOAP refuses sparse gradients (a ValueError at step(), checked in test_errors).",
    "test_complex": "SOAP refuses complex parameters (a ValueError, checked in test_errors); optimize torch.view_as_real(p).",
    "test_complex_2d": "SOAP refuses complex parameters (a ValueError, checked in test_errors).",
    "test_adamw_serialization": "AdamW/Adam-specific (the decoupled_weight_decay key); not generic over optimizers.",
    "test_foreach_matches_forloop":
        "SOAP has no foreach flag (one implementation per backend; the backends' lockstep is tested in test_engine.py).",
    "test_mixed_device_dtype": "Compares foreach/fused=True against False; SOAP has neither flag (and it needs two GPUs).",
    "test_set_default_dtype_works_with_foreach": "SOAP has no foreach flag (CUDA-only in PyTorch too).",
    "test_foreach_large_tensor": "SOAP has no foreach flag (and it needs 72 GB of CUDA memory).",
    "test_peak_memory_foreach": "Compares the peak memory of foreach=True and False; SOAP has no foreach flag (CUDA-only).",
    "test_fused_matches_forloop": "SOAP has no fused flag.",
    "test_fused_error_on_params_on_meta": "SOAP has no fused flag.",
    "test_fused_large_tensor": "SOAP has no fused flag (and it needs 64 GB).",
    "test_fused_does_not_step_if_foundinf": "SOAP has no fused flag (grad_scale/found_inf are fused-kernel inputs).",
    "test_cpu_load_state_dict":
        "Loads a CPU state dict into a fused/capturable optimizer on an accelerator; SOAP has neither flag.",
    "test_second_order_optims_return_consistent_types":
        "Only for optimizers whose step requires a closure (LBFGS's tolerance_grad); SOAP's does not.",
    "test_fused_cpu_matches_cuda": "SOAP has no fused flag.",
    "test_defaults_changed_to_foreach":
        "Checks that the default implementation is _multi_tensor_<name>; SOAP has no foreach implementation.",
}

soap_optim_info = OptimizerInfo(
    SOAP,
    optim_inputs_func=optim_inputs_func_soap,
    optim_error_inputs_func=optim_error_inputs_func_soap,
    scheduler_inputs=(
        [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
        [lambda opt: ExponentialLR(opt, gamma=0.9)],
        [lambda opt: LinearLR(opt, start_factor=0.4, total_iters=4)],
        [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4), lambda opt: ExponentialLR(opt, gamma=0.9)],
        [lambda opt: PolynomialLR(opt, power=0.9, total_iters=4)],
        # Cycles betas[0] as well as lr (SOAP's betas are Adam's).
        [lambda opt: OneCycleLR(opt, max_lr=1e-2, total_steps=25)],
    ),
    supported_impls=(),  # no foreach, fused or differentiable flag
    not_og_supported_flags=(),  # every group key was in SOAP's first release (the reference's keys)
    supports_sparse=False,
    has_capturable_arg=False,
    only_supports_sparse_grads=False,
    supports_complex=False,
    step_requires_closure=False,
    supports_param_groups=True,
    supports_multiple_devices=True,
    supports_fused_on=(),
    skips=tuple(DecorateInfo(unittest.skip(f"not applicable to SOAP: {reason}"), "TestOptimRenewed", name)
                for name, reason in NOT_APPLICABLE.items()),
)
soap_optim_info.supported_dtypes = SUPPORTED_DTYPES

soap_db = [soap_optim_info]

__all__ = [
    "NOT_APPLICABLE", "SUPPORTED_DTYPES", "TEST_MULTIGPU", "OptimizerErrorEnum", "TensorTracker", "TestCase",
    "_get_device_type", "_get_optim_inputs_including_global_cliquey_kwargs", "instantiate_device_type_tests",
    "onlyCPU", "onlyCUDA", "optims", "parametrize", "soap_db", "soap_optim_info",
]
