# ruff: noqa: B023  (closures and hooks are defined and used within one loop iteration)
"""PyTorch's generic optimizer tests (TestOptimRenewed of PyTorch's test/test_optim.py), run on SOAP.

Every test of TestOptimRenewed is here under its own name, with the same checks, written for this
project and parametrized by PyTorch's own machinery (``@optims`` over an ``OptimizerInfo``,
``instantiate_device_type_tests``) over SOAP's entry (``tests/torch_optim_support.py``), so that a
result compares one to one with PyTorch's (e.g. ``test_state_dict_deterministic_is_named_optim0_True_
is_named_optim1_False_SOAP_cpu_float32``). Tests that do not apply to SOAP are skipped by that entry
with the reason (``NOT_APPLICABLE``). PyTorch pins a dtype per test (mostly float32); where the
check does not depend on fp32's resolution the test also runs SOAP's other supported dtypes
(float64, bfloat16, float16). CPU only: CUDA-only tests report themselves skipped on the CPU.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
import unittest
from copy import deepcopy
from itertools import product

import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch_optim_support import (
    NOT_APPLICABLE,
    SUPPORTED_DTYPES,
    TEST_MULTIGPU,
    OptimizerErrorEnum,
    TensorTracker,
    TestCase,
    _get_device_type,
    _get_optim_inputs_including_global_cliquey_kwargs,
    instantiate_device_type_tests,
    onlyCPU,
    onlyCUDA,
    optims,
    parametrize,
    soap_db,
)


def rosenbrock(xy):
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def drosenbrock(xy):
    x, y = xy
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


def _all_inputs(device, dtype, optim_info, skip=("differentiable",)):
    """Every configuration, with each global-cliquey flag the optimizer has (SOAP: none)."""
    return _get_optim_inputs_including_global_cliquey_kwargs(device, dtype, optim_info, skip=skip)


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_param_names(state_dict):
    out = deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop("param_names", None)
    return out


def _model_closure(opt, model, x):
    opt.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return loss


def _step_schedulers(schedulers, loss):
    for s in schedulers:
        if isinstance(s, ReduceLROnPlateau):
            s.step(loss)
        else:
            s.step()


class TestOptimRenewed(TestCase):
    """TestOptimRenewed's checks: update direction (with schedulers, groups, tensor lr), state_dict
    round trips and BC, hooks, deepcopy, errors. SOAP has one implementation per backend and no
    foreach/fused/capturable/differentiable flag, so the derived-implementation tests are skipped."""

    def setUp(self):
        super().setUp()
        # The tensors here are tiny: intra-op threads only add synchronisation, which on a loaded
        # 2-core machine made a Conv2d+BatchNorm step 100x slower (85 ms against 0.3 ms).
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def tearDown(self):
        torch.set_num_threads(self._threads)
        super().tearDown()

    def _not_applicable(self):
        # The OptimizerInfo skips these tests; this guards a run without its decorators.
        name = self._testMethodName
        self.skipTest(next(r for t, r in NOT_APPLICABLE.items() if name.startswith(t)))

    def _fwd_step(self, optim_info, optimizer, closure):
        if optim_info.step_requires_closure:
            return optimizer.step(closure)
        loss = closure()
        optimizer.step()
        return loss

    # ---------------------------------------------------------------------------- configurations
    @onlyCPU
    @optims(soap_db)
    def test_optim_infos_do_not_specify_global_cliquey_kwargs(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            for flag in ("foreach", "fused", "differentiable"):
                self.assertNotIn(flag, optim_input.kwargs, optim_input.desc)

    @optims([o for o in soap_db if o.optim_error_inputs_func is not None])
    def test_errors(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        for error_input in optim_info.optim_error_inputs_func(device=device, dtype=dtype):
            optim_input = error_input.optimizer_error_input
            with self.subTest(desc=optim_input.desc):
                if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
                    def act():
                        optim_cls(optim_input.params, **optim_input.kwargs)
                elif error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                    optimizer = optim_cls(optim_input.params, **optim_input.kwargs)
                    act = optimizer.step
                else:
                    raise NotImplementedError(f"unknown error_on {error_input.error_on}")
                if issubclass(error_input.error_type, Warning):
                    with self.assertWarnsRegex(error_input.error_type, error_input.error_regex):
                        act()
                else:
                    with self.assertRaisesRegex(error_input.error_type, error_input.error_regex):
                        act()

    # ---------------------------------------------------------------------------- direction
    @parametrize("contiguous", [True, False])
    @parametrize("with_lrsched", [True, False])
    @optims(soap_db, dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info, contiguous, with_lrsched):
        optim_cls = optim_info.optim_cls
        for schedulers_c in (optim_info.scheduler_inputs if with_lrsched else [None]):
            for optim_input in optim_info.optim_inputs_func(device=device):  # fresh inputs per scheduler set
                kwargs = dict(optim_input.kwargs)
                if "foreach" in optim_info.supported_impls:
                    kwargs["foreach"] = False
                if contiguous:
                    weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
                    bias = Parameter(torch.randn(10, device=device, dtype=dtype))
                else:  # every other element of a larger tensor
                    weight = Parameter(torch.randn(10, 5, 2, device=device, dtype=dtype)[..., 0])
                    bias = Parameter(torch.randn(10, 2, device=device, dtype=dtype)[..., 0])
                x = torch.randn(5, device=device, dtype=dtype)
                optimizer = optim_cls([weight, bias], **kwargs)
                schedulers = [make(optimizer) for make in (schedulers_c or [])]

                def closure():
                    optimizer.zero_grad()
                    loss = (weight.mv(x) + bias).pow(2).sum()
                    loss.backward()
                    return loss

                initial = closure().item()
                for _ in range(20):
                    loss = self._fwd_step(optim_info, optimizer, closure)
                    _step_schedulers(schedulers, loss)
                final = closure().item()
                if kwargs.get("maximize", False):
                    self.assertGreater(final, initial, optim_input.desc)
                else:
                    self.assertLess(final, initial, optim_input.desc)

    @onlyCUDA
    @unittest.skipIf(not TEST_MULTIGPU, "only one GPU detected")
    @parametrize("with_lrsched", [True, False])
    @optims(soap_db, dtypes=[torch.float32])
    def test_forloop_goes_right_direction_multigpu(self, device, dtype, optim_info, with_lrsched):
        optim_cls = optim_info.optim_cls
        for schedulers_c in (optim_info.scheduler_inputs if with_lrsched else [None]):
            for optim_input in optim_info.optim_inputs_func(device=device):
                weight = Parameter(torch.randn(10, 5, device="cuda:0", dtype=dtype))
                bias = Parameter(torch.randn(10, device="cuda:1", dtype=dtype))
                x = torch.randn(5, device="cuda:0", dtype=dtype)
                optimizer = optim_cls([weight, bias], **optim_input.kwargs)
                schedulers = [make(optimizer) for make in (schedulers_c or [])]

                def closure():
                    optimizer.zero_grad()
                    loss = (weight.mv(x).cuda(1) + bias).pow(2).sum()
                    loss.backward()
                    return loss

                initial = closure().item()
                for _ in range(20):
                    _step_schedulers(schedulers, optimizer.step(closure))
                self.assertLess(closure().item(), initial, optim_input.desc)

    @optims(soap_db, dtypes=[torch.float32])
    def test_param_group_with_lrscheduler_goes_right_direction(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        for schedulers_c in optim_info.scheduler_inputs:
            w1 = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            w2 = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            x = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_cls([{"params": [w1]}, {"params": [w2], "lr": 0.01}])
            schedulers = [make(optimizer) for make in schedulers_c]

            def closure():
                optimizer.zero_grad()
                loss = (w1.mv(x) + w2.mv(x)).pow(2).sum()
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                _step_schedulers(schedulers, optimizer.step(closure))
            self.assertLess(closure().item(), initial)

    @parametrize("num_dim", [0, 1, 2])
    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_tensor_lr(self, device, dtype, optim_info, num_dim):
        """A one-element tensor lr of any rank gives the same steps as the float."""
        optim_cls = optim_info.optim_cls
        lr_devices = [device] + (["cpu"] if _get_device_type(device) != "cpu" else [])
        for optim_input, lr_device in product(_all_inputs(device, dtype, optim_info), lr_devices):
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            bias = Parameter(torch.randn(10, device=device, dtype=dtype))
            weight_c = weight.detach().clone().requires_grad_(True)
            bias_c = bias.detach().clone().requires_grad_(True)
            x = torch.randn(5, device=device, dtype=dtype)
            kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "lr"}
            # The float is the tensor's value (1e-3 in fp32 is 0.0010000000475): fp64 parameters take
            # fp64 step sizes, and with the float 1e-3 itself this 4.7e-8 relative difference in lr
            # moved the fp64 weights by up to 1.8e-7 in 5 steps (precondition_1d; rank-1 factors).
            lr = torch.tensor(1.0 if optim_info.step_requires_closure else 1e-3).item()
            optimizer_r = optim_cls([weight, bias], lr=lr, **kwargs)
            try:
                optimizer = optim_cls([weight_c, bias_c], lr=torch.tensor(lr).reshape([1] * num_dim).to(lr_device),
                                      **kwargs)
            except ValueError as e:
                self.assertRegex(str(e), ".*lr as a Tensor is not supported.*")
                continue

            def closure(opt, w, b):
                opt.zero_grad()
                loss = (w.mv(x) + b).pow(2).sum()
                loss.backward()
                return loss

            for _ in range(5):
                self._fwd_step(optim_info, optimizer_r, functools.partial(closure, optimizer_r, weight, bias))
                self._fwd_step(optim_info, optimizer, functools.partial(closure, optimizer, weight_c, bias_c))
                self.assertEqual(weight, weight_c, msg=optim_input.desc)
                self.assertEqual(bias, bias_c, msg=optim_input.desc)

    @parametrize("with_lrsched", [True, False])
    @optims(soap_db, dtypes=[torch.float64])
    def test_rosenbrock_sparse(self, device, dtype, optim_info, with_lrsched):
        """Sparse (uncoalesced) gradients give the dense gradients' steps and go downhill."""
        if not (optim_info.supports_sparse or optim_info.only_supports_sparse_grads):
            self._not_applicable()
        kwarg_updates, schedulers_c = optim_info.metadata_for_sparse
        if with_lrsched and not schedulers_c:
            return
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs(device, dtype, optim_info, skip=("differentiable", "fused")):
            kwargs = {**optim_input.kwargs, **kwarg_updates}
            params = [Parameter(torch.tensor([1.5, 1.5], dtype=dtype))]
            params_c = [Parameter(torch.tensor([1.5, 1.5], dtype=dtype))]
            optimizer, optimizer_c = optim_cls(params, **kwargs), optim_cls(params_c, **kwargs)
            schedulers = [make(optimizer) for make in (schedulers_c if with_lrsched else [])]
            schedulers_cc = [make(optimizer_c) for make in (schedulers_c if with_lrsched else [])]
            start = params[0].detach().dist(torch.ones(2, dtype=dtype))

            def closure(opt, p, sparse, w):
                opt.zero_grad()
                loss = rosenbrock(p)
                g = drosenbrock(p.detach())
                if sparse:  # the coordinate's gradient split over two entries of one index
                    idx = torch.tensor([[w, w]])
                    vals = torch.stack([g[w] / 4, g[w] - g[w] / 4])
                    p.grad = torch.sparse_coo_tensor(idx, vals, (2,), dtype=dtype)
                else:
                    p.grad = torch.where(torch.arange(2) == w, g, torch.zeros_like(g))
                return loss

            for i in range(1800):
                w = 1 - i % 2
                optimizer.step(functools.partial(closure, optimizer, params[0], True, w))
                _step_schedulers(schedulers, rosenbrock(params[0]))
                optimizer_c.step(functools.partial(closure, optimizer_c, params_c[0], False, w))
                _step_schedulers(schedulers_cc, rosenbrock(params_c[0]))
                self.assertEqual(params, params_c, atol=5e-6, rtol=5e-6)
            self.assertLessEqual(params[0].detach().dist(torch.ones(2, dtype=dtype)), start)

    # ---------------------------------------------------------------------------- complex
    @optims(soap_db, dtypes=[torch.complex64])
    def test_complex(self, device, dtype, optim_info):
        """A complex parameter steps as its view_as_real (mixed with a real one)."""
        if not optim_info.supports_complex:
            self._not_applicable()
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs(device, dtype, optim_info, skip=("differentiable", "fused")):
            complex_params = [torch.randn(10, 5, device=device, dtype=dtype, requires_grad=True),
                              torch.randn(10, device=device, dtype=dtype, requires_grad=True),
                              torch.randn(10, 5, device=device, dtype=torch.float32, requires_grad=True)]
            real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                           for p in complex_params]
            complex_opt = optim_cls(complex_params, **optim_input.kwargs)
            real_opt = optim_cls(real_params, **optim_input.kwargs)
            for _ in range(3):
                for pc, pr in zip(complex_params, real_params):
                    g = torch.randn_like(pr)
                    pr.grad = g
                    pc.grad = torch.view_as_complex(g.clone()) if pc.is_complex() else g.clone()
                complex_opt.step()
                real_opt.step()
                self.assertEqual(real_params, [torch.view_as_real(p) if p.is_complex() else p for p in complex_params])

    @optims(soap_db, dtypes=[torch.complex64])
    def test_complex_2d(self, device, dtype, optim_info):
        """A complex parameter steps as its real and imaginary parts as two real parameters."""
        if not optim_info.supports_complex:
            self._not_applicable()
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs(device, dtype, optim_info, skip=("differentiable", "fused")):
            a = torch.randn(2, device=device, dtype=dtype, requires_grad=True)
            re, im = a.real.detach().clone().requires_grad_(), a.imag.detach().clone().requires_grad_()
            opt1, opt2 = optim_cls([a], **optim_input.kwargs), optim_cls([re, im], **optim_input.kwargs)
            tracker = TensorTracker()
            for _ in range(3):
                opt1.zero_grad()
                rosenbrock(a).abs().backward()
                tracker.add(a.grad.real)
                tracker.add(a.grad.imag)
                opt2.zero_grad()
                rosenbrock(torch.complex(re, im)).abs().backward()
                tracker.pop_check_set(re.grad, self)
                tracker.pop_check_set(im.grad, self)
                opt1.step()
                opt2.step()
                self.assertEqual(a.real, re)
                self.assertEqual(a.imag, im)
            self.assertTrue(tracker.all_popped())

    def test_adamw_serialization(self, device):
        self._not_applicable()

    # ---------------------------------------------------------------------------- derived impls
    @optims(soap_db, dtypes=[torch.float64])
    def test_foreach_matches_forloop(self, device, dtype, optim_info):
        self._not_applicable()

    @onlyCUDA
    @unittest.skipIf(not TEST_MULTIGPU, "only one GPU detected")
    @parametrize("impl", ["foreach", "fused"])
    @optims(soap_db)
    def test_mixed_device_dtype(self, device, dtype, optim_info, impl):
        self._not_applicable()

    @onlyCUDA
    @optims(soap_db, dtypes=[torch.float64])
    def test_set_default_dtype_works_with_foreach(self, device, dtype, optim_info):
        self._not_applicable()

    @onlyCUDA
    @optims(soap_db, dtypes=[torch.float16])
    def test_foreach_large_tensor(self, device, dtype, optim_info):
        self._not_applicable()

    @onlyCUDA
    @optims(soap_db, dtypes=[torch.float32])
    def test_peak_memory_foreach(self, device, dtype, optim_info):
        self._not_applicable()

    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_fused_matches_forloop(self, device, dtype, optim_info):
        self._not_applicable()

    @optims(soap_db, dtypes=[torch.float32])
    def test_fused_error_on_params_on_meta(self, device, dtype, optim_info):
        self._not_applicable()

    @optims(soap_db, dtypes=[torch.float16])
    def test_fused_large_tensor(self, device, dtype, optim_info):
        self._not_applicable()

    @onlyCUDA
    @optims(soap_db, dtypes=[torch.float32])
    def test_fused_does_not_step_if_foundinf(self, device, dtype, optim_info):
        self._not_applicable()

    @parametrize("impl", ["fused", "capturable"])
    @optims(soap_db, dtypes=[torch.float32])
    def test_cpu_load_state_dict(self, device, dtype, impl, optim_info):
        self._not_applicable()

    # ---------------------------------------------------------------------------- param groups
    @optims(soap_db, dtypes=[torch.float32])
    def test_param_groups_weight_decay(self, device, dtype, optim_info):
        """A group with weight decay and one without still go downhill together."""
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs(device, dtype, optim_info):
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            bias = Parameter(torch.randn(10, device=device, dtype=dtype))
            x = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_cls([{"params": [weight], **optim_input.kwargs},
                                   {"params": [bias], **{**optim_input.kwargs, "weight_decay": 0.0}}])
            initial = (weight.mv(x) + bias).pow(2).sum().item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = (weight.mv(x) + bias).pow(2).sum()
                loss.backward()
                optimizer.step()
            if optim_input.kwargs.get("maximize", False):
                self.assertGreater(loss.item(), initial, optim_input.desc)
            else:
                self.assertLess(loss.item(), initial, optim_input.desc)

    @optims(soap_db, dtypes=[torch.float32])
    def test_param_groups_lr(self, device, dtype, optim_info):
        """A group's own lr overrides the optimizer's: lr 1e-28 leaves its parameter as it was."""
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs(device, dtype, optim_info):
            group_kwargs = dict(optim_input.kwargs)
            if group_kwargs.get("lr", 0) == 0:
                group_kwargs["lr"] = 1e-3
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            bias = Parameter(torch.randn(10, device=device, dtype=dtype))
            frozen = Parameter(torch.randn(2, device=device, dtype=dtype))
            frozen_before = frozen.detach().clone()
            x = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_cls([{"params": [weight, bias], **group_kwargs}, {"params": [frozen]}], lr=1e-28)
            initial = (weight.mv(x) + bias).pow(2).sum().item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = (weight.mv(x) + bias).pow(2).sum()
                loss.backward()
                frozen.grad = torch.rand_like(frozen)
                optimizer.step()
            if optim_input.kwargs.get("maximize", False):
                self.assertGreater(loss.item(), initial, optim_input.desc)
            else:
                self.assertLess(loss.item(), initial, optim_input.desc)
            self.assertEqual(frozen, frozen_before, msg=optim_input.desc)

    # ---------------------------------------------------------------------------- no-op steps
    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        params = [torch.randn(2, 3, device=device, dtype=dtype) for _ in range(2)]  # no grad at all
        before = [p.clone() for p in params]
        for optim_input in _all_inputs(device, dtype, optim_info, skip=()):
            optimizer = optim_cls(params, **optim_input.kwargs)
            optimizer.step(lambda: torch.tensor([1], device=device, dtype=dtype))
            self.assertEqual(params, before, msg=optim_input.desc)

    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        param = torch.randn(5, 1, device=device, dtype=dtype, requires_grad=True)
        before = param.detach().clone()
        # torch's optimizers default to weight_decay=0 and the test skips configs that set it; SOAP's
        # default is 0.01, so a config without the key decays too.
        default_decay = inspect.signature(optim_cls).parameters["weight_decay"].default
        for optim_input in _all_inputs(device, dtype, optim_info, skip=()):
            kwargs = dict(optim_input.kwargs)
            if kwargs.get("weight_decay", default_decay) != 0:
                continue  # weight decay moves parameters whatever the gradient
            params = [param.clone()] if kwargs.get("differentiable", False) else [param]
            optimizer = optim_cls(params, **kwargs)
            params[0].grad = torch.zeros_like(params[0])
            optimizer.step(lambda: torch.tensor([1], device=device, dtype=dtype))
            self.assertEqual(before, params[0], msg=optim_input.desc)

    @optims(soap_db, dtypes=[torch.float32])
    def test_optimizer_can_be_printed(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for optim_input in _all_inputs(device, dtype, optim_info, skip=()):
            text = repr(optim_cls(params, **optim_input.kwargs))
            self.assertIn(optim_cls.__name__, text)

    # ---------------------------------------------------------------------------- state_dict
    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_state_dict_deterministic(self, device, dtype, optim_info, is_named_optim0, is_named_optim1):
        """A state dict loaded into a fresh optimizer on equal parameters continues identically."""
        optim_cls = optim_info.optim_cls
        weight = Parameter(torch.randn(2, 3, device=device, dtype=dtype))
        bias = Parameter(torch.randn(2, device=device, dtype=dtype))
        x = torch.randn(3, device=device, dtype=dtype)

        def closure(opt, w, b):
            opt.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            return loss

        for optim_input in _all_inputs(device, dtype, optim_info):
            optimizer = optim_cls(_named([weight, bias], is_named_optim0), **optim_input.kwargs)
            fwd = functools.partial(closure, optimizer, weight, bias)
            for _ in range(10):
                self._fwd_step(optim_info, optimizer, fwd)
            with torch.no_grad():
                weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
            optimizer_c = optim_cls(_named([weight_c, bias_c], is_named_optim1), **optim_input.kwargs)
            fwd_c = functools.partial(closure, optimizer_c, weight_c, bias_c)
            optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
            for _ in range(10):
                if optim_info.step_requires_closure:
                    optimizer.step(fwd)
                    optimizer_c.step(fwd_c)
                else:
                    fwd()
                    fwd_c()
                    optimizer.step()
                    optimizer_c.step()
                self.assertEqual(weight, weight_c, msg=optim_input.desc)
                self.assertEqual(bias, bias_c, msg=optim_input.desc)
            # Equal (not identical) parameters give equal state dicts; names are optional.
            self.assertEqual(_without_param_names(optimizer.state_dict()),
                             _without_param_names(optimizer_c.state_dict()))
            # A parameter listed twice is packed the same way each time.
            optimizer_c.param_groups.extend(optimizer_c.param_groups)
            self.assertEqual(_without_param_names(optimizer.state_dict())["param_groups"][-1],
                             _without_param_names(optimizer_c.state_dict())["param_groups"][-1])

    def _conv_bn(self, device, dtype):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
        model.to(dtype=dtype, device=device)
        return model, torch.rand(1, 4, 16, 16, device=device, dtype=dtype)

    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_can_load_older_state_dict(self, device, dtype, optim_info):
        """A state dict without the flags added after the first release still loads and steps."""
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs(device, dtype, optim_info):
            model, x = self._conv_bn(device, dtype)
            optimizer = optim_cls(model.parameters(), **optim_input.kwargs)
            fwd = functools.partial(_model_closure, optimizer, model, x)
            for _ in range(3):
                self._fwd_step(optim_info, optimizer, fwd)
            old = deepcopy(optimizer.state_dict())
            for group in old["param_groups"]:
                for flag in optim_info.not_og_supported_flags:
                    group.pop(flag, None)
            optimizer.load_state_dict(old)
            self._fwd_step(optim_info, optimizer, fwd)

    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims([o for o in soap_db if not o.only_supports_sparse_grads], dtypes=SUPPORTED_DTYPES)
    def test_can_load_from_to_named_state_dict(self, device, dtype, optim_info, is_named_optim0, is_named_optim1):
        """named_parameters() and parameters() state dicts load into each other; names are kept."""
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs(device, dtype, optim_info):
            model, x = self._conv_bn(device, dtype)
            optimizer = optim_cls(model.named_parameters() if is_named_optim0 else model.parameters(),
                                  **optim_input.kwargs)
            for _ in range(3):
                self._fwd_step(optim_info, optimizer, functools.partial(_model_closure, optimizer, model, x))
            saved = deepcopy(optimizer.state_dict())
            optimizer2 = optim_cls(model.named_parameters() if is_named_optim1 else model.parameters(),
                                   **optim_input.kwargs)
            optimizer2.load_state_dict(saved)
            self._fwd_step(optim_info, optimizer2, functools.partial(_model_closure, optimizer2, model, x))
            if is_named_optim0 or is_named_optim1:
                self.assertEqual(optimizer2.state_dict()["param_groups"][0]["param_names"],
                                 ["0.weight", "0.bias", "1.weight", "1.bias"])

    @parametrize("is_named_optim", [True, False])
    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_save_load_equality_with_weights_only(self, device, dtype, optim_info, is_named_optim):
        """torch.save then torch.load (also with weights_only=True) gives back an equal state dict."""
        optim_cls = optim_info.optim_cls
        weight = Parameter(torch.randn(2, 3, device=device, dtype=dtype))
        bias = Parameter(torch.randn(2, device=device, dtype=dtype))
        x = torch.randn(3, device=device, dtype=dtype)
        for optim_input in _all_inputs(device, dtype, optim_info):
            optimizer = optim_cls(_named([weight, bias], is_named_optim), **optim_input.kwargs)

            def closure():
                optimizer.zero_grad()
                loss = (weight.mv(x) + bias).pow(2).sum()
                loss.backward()
                return loss

            for _ in range(3):
                optimizer.step(closure)
            sd = optimizer.state_dict()
            with tempfile.TemporaryFile() as f:
                torch.save(sd, f)
                f.seek(0)
                self.assertEqual(torch.load(f, weights_only=False), sd)
                f.seek(0)
                self.assertEqual(torch.load(f, weights_only=True), sd)

    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_load_nontensor_step(self, device, dtype, optim_info):
        """A state dict whose 'step' entries are Python numbers loads and steps."""
        optim_cls = optim_info.optim_cls
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        closure_loss = torch.rand(1, device=device, dtype=dtype)

        def closure():
            return closure_loss if optim_info.step_requires_closure else None

        for optim_input in _all_inputs(device, dtype, optim_info):
            optimizer = optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step(closure)
            sd = deepcopy(optimizer.state_dict())
            for p_state in sd["state"].values():
                if torch.is_tensor(p_state.get("step")):
                    p_state["step"] = p_state["step"].item()
            optimizer.load_state_dict(sd)
            optimizer.step(closure)

    @onlyCUDA
    @optims(soap_db, dtypes=[torch.float32])
    def test_state_dict_with_cuda_params(self, device, dtype, optim_info):
        """A CPU optimizer's state dict loads into one on CUDA parameters, which then steps the same."""
        optim_cls = optim_info.optim_cls
        for optim_input in _all_inputs("cpu", dtype, optim_info):
            params = [Parameter(torch.randn(2, 3, dtype=dtype)) for _ in range(2)]
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer = optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step()
            with torch.no_grad():
                params_cuda = [p.to("cuda") for p in params]
                for p, q in zip(params_cuda, params):
                    p.grad = q.grad.to("cuda")
            optimizer_cuda = optim_cls(params_cuda, **optim_input.kwargs)
            sd_cpu, sd_cuda = deepcopy(optimizer.state_dict()), deepcopy(optimizer.state_dict())
            optimizer_cuda.load_state_dict(sd_cuda)
            self.assertEqual(sd_cpu, sd_cuda)  # loading did not modify its argument
            capturable = sd_cpu["param_groups"][0].get("capturable", False)
            fused = sd_cpu["param_groups"][0].get("fused", False)
            for s_cpu, s_cuda in zip(sd_cpu["state"].values(), optimizer_cuda.state_dict()["state"].values()):
                if torch.is_tensor(s_cpu.get("step")):
                    self.assertEqual(s_cuda["step"].device.type, "cuda" if capturable or fused else "cpu")
            for _ in range(5):
                optimizer.step()
                optimizer_cuda.step()
                self.assertEqual(params, params_cuda)
                self.assertEqual(optimizer.state_dict(), optimizer_cuda.state_dict())

    # ---------------------------------------------------------------------------- state_dict hooks
    @staticmethod
    def _state_dict_pre_hook(optimizer):
        optimizer.state["test"] = 1

    @staticmethod
    def _state_dict_post_hook(optimizer, state_dict):
        ran_pre = "test" in state_dict["state"]
        state_dict["state"].pop("test", None)
        state_dict["ran_state_dict_pre_hook"] = ran_pre
        return state_dict

    @staticmethod
    def _load_state_dict_pre_hook1(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    @staticmethod
    def _load_state_dict_pre_hook2(optimizer, state_dict):
        replaced = deepcopy(state_dict)  # a hook may return a different state dict to load
        replaced["param_groups"][0]["lr"] = 0.003
        return replaced

    @staticmethod
    def _load_state_dict_post_hook(optimizer):
        optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
        optimizer.state["ran_load_state_dict_post_hook"] = True

    def _one_param_optimizers(self, device, dtype, optim_info):
        for optim_input in _all_inputs(device, dtype, optim_info, skip=()):
            param = torch.rand(2, 3, device=device, dtype=dtype, requires_grad=True)
            # The load hooks mark their runs by setting lr to 0.002 and 0.003, and SOAP's default lr
            # is 3e-3 (torch's optimizers' are not): an lr of neither keeps the marks unambiguous.
            kwargs = {"lr": 1e-3, **optim_input.kwargs}
            yield optim_info.optim_cls([param], **kwargs)

    @optims(soap_db, dtypes=[torch.float32])
    def test_state_dict_pre_hook(self, device, dtype, optim_info):
        for optim in self._one_param_optimizers(device, dtype, optim_info):
            optim.register_state_dict_pre_hook(type(self)._state_dict_pre_hook)
            self.assertEqual(optim.state_dict()["state"]["test"], 1)

    @optims(soap_db, dtypes=[torch.float32])
    def test_state_dict_post_hook(self, device, dtype, optim_info):
        for optim in self._one_param_optimizers(device, dtype, optim_info):
            optim.register_state_dict_post_hook(type(self)._state_dict_post_hook)
            self.assertFalse(optim.state_dict()["ran_state_dict_pre_hook"])

    @optims(soap_db, dtypes=[torch.float32])
    def test_state_dict_pre_post_hook(self, device, dtype, optim_info):
        for optim in self._one_param_optimizers(device, dtype, optim_info):
            optim.register_state_dict_pre_hook(type(self)._state_dict_pre_hook)
            optim.register_state_dict_post_hook(type(self)._state_dict_post_hook)
            sd = optim.state_dict()
            self.assertNotIn("test", sd["state"])
            self.assertTrue(sd["ran_state_dict_pre_hook"])

    @optims(soap_db, dtypes=[torch.float32])
    def test_load_state_dict_pre_hook_and_prepend(self, device, dtype, optim_info):
        for optim in self._one_param_optimizers(device, dtype, optim_info):
            sd = optim.state_dict()
            optim.register_load_state_dict_pre_hook(type(self)._load_state_dict_pre_hook1)
            optim.load_state_dict(sd)
            self.assertEqual(optim.param_groups[0]["lr"], 0.002)
            # Prepended, hook2 runs first; hook1 then sets 0.002 on what hook2 returned.
            optim.register_load_state_dict_pre_hook(type(self)._load_state_dict_pre_hook2, prepend=True)
            optim.load_state_dict(sd)
            self.assertEqual(optim.param_groups[0]["lr"], 0.002)

    @optims(soap_db, dtypes=[torch.float32])
    def test_load_state_dict_post_hook(self, device, dtype, optim_info):
        for optim in self._one_param_optimizers(device, dtype, optim_info):
            optim.register_load_state_dict_post_hook(type(self)._load_state_dict_post_hook)
            optim.load_state_dict(optim.state_dict())
            self.assertFalse(optim.state["ran_load_state_dict_pre_hook2"])
            self.assertTrue(optim.state["ran_load_state_dict_post_hook"])

    @optims(soap_db, dtypes=[torch.float32])
    def test_load_state_dict_pre_post_hook(self, device, dtype, optim_info):
        for optim in self._one_param_optimizers(device, dtype, optim_info):
            optim.register_load_state_dict_pre_hook(type(self)._load_state_dict_pre_hook2)
            optim.register_load_state_dict_post_hook(type(self)._load_state_dict_post_hook)
            optim.load_state_dict(optim.state_dict())
            self.assertTrue(optim.state["ran_load_state_dict_pre_hook2"])
            self.assertTrue(optim.state["ran_load_state_dict_post_hook"])

    # ---------------------------------------------------------------------------- step hooks
    @optims(soap_db, dtypes=[torch.float32])
    def test_step_post_hook(self, device, dtype, optim_info):
        params = [torch.tensor([1, 1], device=device, dtype=dtype)]
        closure = (lambda: 1) if optim_info.step_requires_closure else None
        for optim_input in _all_inputs(device, dtype, optim_info, skip=()):
            optim = optim_info.optim_cls(params, **optim_input.kwargs)
            calls = []
            handle = optim.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
            optim.step(closure)
            optim.step(closure)
            self.assertEqual(len(calls), 2)
            handle.remove()
            optim.step(closure)
            self.assertEqual(len(calls), 2)
            self.assertTrue(all(c is optim for c in calls))

    @optims(soap_db, dtypes=[torch.float32])
    def test_step_pre_hook(self, device, dtype, optim_info):
        params = [torch.tensor([1, 1], device=device, dtype=dtype)]
        closure = (lambda: 1) if optim_info.step_requires_closure else None
        for optim_input in _all_inputs(device, dtype, optim_info, skip=()):
            optim = optim_info.optim_cls(params, **optim_input.kwargs)
            calls = []
            handle = optim.register_step_pre_hook(lambda opt, args, kwargs: calls.append(opt))
            optim.step(closure)
            optim.step(closure)
            self.assertEqual(len(calls), 2)
            handle.remove()
            optim.step(closure)
            self.assertEqual(len(calls), 2)

    @optims(soap_db, dtypes=[torch.float32])
    def test_step_all_hooks(self, device, dtype, optim_info):
        """Global pre, local pre, local post, global post, in that order, for each optimizer."""
        params = [torch.tensor([1, 1], device=device, dtype=dtype)]
        closure = (lambda: 1) if optim_info.step_requires_closure else None
        for optim_input in _all_inputs(device, dtype, optim_info, skip=()):
            optim = optim_info.optim_cls(params, **optim_input.kwargs)
            other = SGD(params)
            order = []
            handles = [register_optimizer_step_pre_hook(lambda *a: order.append("global pre")),
                       register_optimizer_step_post_hook(lambda *a: order.append("global post"))]
            try:
                for o in (optim, other):
                    handles.append(o.register_step_pre_hook(lambda *a: order.append("pre")))
                    handles.append(o.register_step_post_hook(lambda *a: order.append("post")))
                one = ["global pre", "pre", "post", "global post"]
                optim.step(closure)
                self.assertListEqual(order, one)
                other.step(closure)
                self.assertListEqual(order, one * 2)
                optim.step(closure)
                self.assertListEqual(order, one * 3)
            finally:
                for h in handles:
                    h.remove()
            optim.step(closure)
            other.step(closure)
            self.assertListEqual(order, one * 3)

    # ---------------------------------------------------------------------------- copies, state
    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_deepcopy_copies_all_public_attrs(self, device, dtype, optim_info):
        optim_cls = optim_info.optim_cls
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)

        def public(obj):
            return {k for k in vars(obj) if not k.startswith("_")}

        for optim_input in _all_inputs(device, dtype, optim_info):
            optimizer = optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step((lambda: 1) if optim_info.step_requires_closure else None)
            self.assertEqual(public(optimizer), public(deepcopy(optimizer)), msg=optim_input.desc)

    @optims(soap_db, dtypes=[torch.float32])
    def test_second_order_optims_return_consistent_types(self, device, dtype, optim_info):
        self._not_applicable()

    @onlyCUDA
    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_fused_cpu_matches_cuda(self, device, dtype, optim_info):
        self._not_applicable()

    @onlyCUDA
    @optims(soap_db, dtypes=[torch.float32])
    def test_defaults_changed_to_foreach(self, device, dtype, optim_info):
        self._not_applicable()

    @optims(soap_db, dtypes=SUPPORTED_DTYPES)
    def test_non_empty_state(self, device, dtype, optim_info):
        """After one step every parameter's state holds something."""
        optim_cls = optim_info.optim_cls
        model = torch.nn.Linear(5, 5).to(dtype=dtype, device=device)
        x = torch.rand(2, 5, dtype=dtype, device=device)
        for optim_input in optim_info.optim_inputs_func(device=device):
            optim = optim_cls(model.parameters(), **optim_input.kwargs)
            optim.zero_grad()
            model(x).sum().backward()
            optim.step((lambda: 1.0) if optim_info.step_requires_closure else None)
            self.assertGreater(len(optim.state), 0, optim_input.desc)
            for state in optim.state.values():
                self.assertGreater(len(state), 0, optim_input.desc)


instantiate_device_type_tests(TestOptimRenewed, globals(), only_for="cpu")
