"""The import rules of docs/DESIGN.md §3, and the one rule written twice on purpose (the layout)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from soap_kernels import layout, reference

PACKAGE = Path(__file__).resolve().parents[1] / "soap_kernels"


def _package_imports(path: Path) -> set[str]:
    """The soap_kernels modules ``path`` imports (relative or absolute), as dotted names."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    pkg_parts = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
                found.update(names)
            elif node.module and node.module.startswith("soap_kernels"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("soap_kernels"))
    return found


def test_the_oracle_imports_nothing_of_the_package():
    assert _package_imports(PACKAGE / "reference.py") == set()


@pytest.mark.parametrize("module", ["engine.py", "ops.py", "kernels.py", "select.py", "layout.py", "lapack.py",
                                    "triton/table.py", "triton/rotate.py", "triton/refresh.py", "triton/adam.py",
                                    "triton/statistics.py", "triton/_common.py"])
def test_nothing_the_oracle_judges_imports_it(module):
    assert not any(m.endswith("reference") for m in _package_imports(PACKAGE / module)), module


@pytest.mark.parametrize("module", ["kernels.py", "ops.py", "triton/table.py", "triton/rotate.py", "triton/refresh.py",
                                    "triton/adam.py", "triton/statistics.py", "triton/_common.py", "lapack.py"])
def test_kernels_know_nothing_of_the_optimizer(module):
    imported = _package_imports(PACKAGE / module)
    assert not imported & {"soap_kernels.optimizer", "soap_kernels.engine", "soap_kernels.select",
                           "soap_kernels.distributed", "soap_kernels.schedules"}, (module, imported)


def test_backend_choice_lives_in_select_only():
    """Only select.py imports the Triton table or decides between tables."""
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("select.py", "__init__.py") or path.parent.name == "triton":
            continue
        assert "soap_kernels.triton.table" not in _package_imports(path), path


def test_distribution_is_held_not_inherited():
    """The optimizer knows only the placement interface: it imports nothing of distributed.py, the
    placement imports the optimizer for type hints only, and ShardedSOAP overrides no method of
    SOAP (it holds a Sharded placement)."""
    from soap_kernels import SOAP, ShardedSOAP
    from soap_kernels.distributed import Sharded
    from soap_kernels.placement import Placement

    assert "soap_kernels.distributed" not in _package_imports(PACKAGE / "optimizer.py")
    tree = ast.parse((PACKAGE / "placement.py").read_text())
    runtime = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "optimizer"]
    assert not runtime, "placement.py imports the optimizer at run time"
    overridden = {name for name, value in vars(ShardedSOAP).items()
                  if callable(value) and name in vars(SOAP) and name != "__init__"}
    assert overridden == set(), overridden
    abstract = {name for name, value in vars(Placement).items() if callable(value) and not name.startswith("__")}
    assert abstract <= set(vars(Sharded)) | {"bind"}, abstract - set(vars(Sharded))


SHAPES = [(), (1,), (7,), (40,), (0,), (3, 0), (16, 16), (40, 8), (1, 9), (6, 5, 3), (6, 4, 3, 3), (6, 3, 3, 4),
          (128, 64, 3, 3), (2, 3, 4, 5, 6), (10001, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_engine_layout_states_the_reference_rule(shape):
    for max_dim, merge, pre1d, cl in itertools.product((4, 16, 32, 10000), (False, True), (False, True),
                                                       (False, True)):
        ours = layout.make_layout(shape, max_precond_dim=max_dim, merge_dims_=merge, precondition_1d=pre1d,
                                  channels_last=cl)
        ref = reference.make_layout(shape, max_precond_dim=max_dim, merge_dims=merge, precondition_1d=pre1d,
                                    channels_last=cl)
        assert (ours.shape, ours.work_shape, ours.permute, ours.preconditioned) == \
            (ref.shape, ref.work_shape, ref.permute, ref.preconditioned), (shape, max_dim, merge, pre1d, cl)


def test_layout_round_trips_batched_tensors():
    import torch

    lay = layout.make_layout((6, 3, 3, 4), max_precond_dim=16, merge_dims_=True, precondition_1d=False,
                             channels_last=True)
    ref = reference.make_layout((6, 3, 3, 4), max_precond_dim=16, merge_dims=True, precondition_1d=False,
                                channels_last=True)
    x = torch.randn(2, 6, 3, 3, 4)
    assert torch.equal(lay.to_work(x)[1], ref.to_work(x[1]))
    assert torch.equal(lay.from_work(lay.to_work(x)), x)
