"""Plots of benchmark result files (the JSON the ``bench_*.py`` scripts write).

    python benchmarks/plot.py benchmarks/results/step_cpu_cpu.json                 # -> step_cpu_cpu.png
    python benchmarks/plot.py results/step_gpt2-small_cuda.json results/step_gpt2-medium_cuda.json -o steps.png
    python benchmarks/plot.py results/rotate_cpu_cpu.json

Whole-step files (``"benchmark": "step"``, several may be combined in one figure): the amortized
step per optimizer, grouped by parameter set (log scale; whiskers = p20..p80 of the single steps),
the ratio to ``torch.optim.AdamW(fused=True)`` measured in the same run, and the optimizer's bytes
per parameter (persistent state + workspace kept between steps; peers included). Op files: one panel
per op, the median time of each backend per case (whiskers p20..p80).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series_name(row: dict) -> str:
    name = row.get("optimizer") or row.get("backend") or "?"
    dtype = row.get("param_dtype")
    return f"{name} ({dtype})" if dtype and dtype != "fp32" else name


def _title(payload: dict) -> str:
    env = payload.get("environment", {})
    load = env.get("load_average")
    bits = [env.get("device", "?"), f"torch {env.get('torch', '?')}", f"{env.get('threads', '?')} threads",
            env.get("date", "")[:10], env.get("git_revision", "")]
    if load:
        bits.append(f"load {load[0]}")
    bits += [f"{k}={v}" for k, v in env.get("env", {}).items() if k != "TRITON_INTERPRET"]
    return ", ".join(str(b) for b in bits if b)


def _group_labels(payloads: Sequence[dict]) -> list[str]:
    """The parameter set, plus the device / threads / env knobs where that alone is ambiguous."""
    labels = [p["parameter_set"] for p in payloads]
    if len(set(labels)) == len(labels):
        return labels
    out = []
    for p in payloads:
        env = p.get("environment", {})
        extra = [f"{env.get('threads', '?')}t"] + [f"{k}={v}" for k, v in env.get("env", {}).items() if k != "TRITON_INTERPRET"]
        if len({q["environment"].get("device") for q in payloads}) > 1:
            extra.insert(0, str(env.get("device", "?"))[:24])
        out.append(f"{p['parameter_set']} ({', '.join(extra)})")
    return out


def _bars(ax, groups: Sequence[str], series: Sequence[str], value, err=None, log: bool = True) -> None:
    width = 0.8 / max(1, len(series))
    for k, s in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for g_i, g in enumerate(groups):
            v = value(g, s)
            if v is None:
                continue
            xs.append(g_i - 0.4 + width * (k + 0.5))
            ys.append(v)
            if err is not None:
                e = err(g, s)
                lo.append(max(0.0, v - e[0]) if e else 0.0)
                hi.append(max(0.0, e[1] - v) if e else 0.0)
        if xs:
            ax.bar(xs, ys, width, label=s, yerr=[lo, hi] if err is not None else None, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20 if max((len(g) for g in groups), default=0) > 12 else 0, ha="right"
                       if max((len(g) for g in groups), default=0) > 12 else "center", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3, which="both")


def plot_step(payloads: Sequence[dict], path: Path) -> Path:
    groups = _group_labels(payloads)
    series: list[str] = []
    table: dict[tuple[str, str], dict] = {}
    for g, p in zip(groups, payloads):
        for r in p["results"]:
            if "amortized_s" not in r:
                continue
            s = _series_name(r)
            if s not in series:
                series.append(s)
            table[(g, s)] = r
    has_memory = any("state_bytes_per_param" in r for r in table.values())
    panels = 3 if has_memory else 2
    fig, axes = plt.subplots(1, panels, figsize=(max(10, 2.2 * len(groups) + 0.5 * len(series)) * panels / 2, 4.8))
    ax_t, ax_r = axes[0], axes[1]

    def value(g, s):
        r = table.get((g, s))
        return r["amortized_s"] * 1e3 if r else None

    def err(g, s):
        r = table.get((g, s))
        return (r["p20_s"] * 1e3, r["p80_s"] * 1e3) if r else None

    _bars(ax_t, groups, series, value, err)
    ax_t.set_ylabel("amortized step (ms, refresh steps included)")
    ax_t.set_title("optimizer step time")
    ax_t.legend(fontsize=7)

    ratio_series = [s for s in series if any(table.get((g, s), {}).get("x_adamw") for g in groups)]

    def ratio(g, s):
        r = table.get((g, s))
        return r.get("x_adamw") if r else None

    _bars(ax_r, groups, ratio_series, ratio)
    ax_r.axhline(1.0, color="k", lw=0.8)
    ax_r.set_ylabel("× AdamW(fused=True), same run")
    ax_r.set_title("ratio to AdamW (lower is better)")
    if has_memory:
        def memory(g, s):
            r = table.get((g, s))
            if not r or r.get("state_bytes_per_param") is None:
                return None
            return r["state_bytes_per_param"] + (r.get("workspace_bytes_per_param") or 0.0)

        _bars(axes[2], groups, series, memory, log=False)
        axes[2].set_ylabel("optimizer bytes per parameter (state + workspace)")
        axes[2].set_title("memory")
    fig.suptitle(_title(payloads[0]) if len(payloads) == 1 else f"{len(payloads)} runs; first: {_title(payloads[0])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ops(payloads: Sequence[dict], path: Path) -> Path:
    rows = [r for p in payloads for r in p["results"] if "median_s" in r]
    op_names: list[str] = []
    for r in rows:
        if r["op"] not in op_names:
            op_names.append(r["op"])
    fig, axes = plt.subplots(len(op_names), 1, figsize=(11, 3.6 * max(1, len(op_names))), squeeze=False)
    for ax, op in zip(axes[:, 0], op_names):
        mine = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(r["case"] for r in mine))
        series = list(dict.fromkeys(r["backend"] for r in mine))
        table = {(r["case"], r["backend"]): r for r in mine}

        def value(c, s, table=table):
            r = table.get((c, s))
            return r["median_s"] * 1e3 if r else None

        def err(c, s, table=table):
            r = table.get((c, s))
            return (r["p20_s"] * 1e3, r["p80_s"] * 1e3) if r and "p20_s" in r else None

        _bars(ax, cases, series, value, err)
        ax.set_ylabel("median ms")
        ax.set_title(op, fontsize=10)
        ax.legend(fontsize=7, ncol=min(4, len(series)))
    fig.suptitle(f"{payloads[0].get('benchmark', '')} — {_title(payloads[0])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_payloads(payloads: Sequence[dict], path: Path) -> Path:
    """One PNG for result payloads: a step figure when they are whole-step results, else op panels."""
    path = Path(path)
    if all(p.get("benchmark") == "step" for p in payloads):
        return plot_step(payloads, path)
    return plot_ops(payloads, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="result JSON files")
    parser.add_argument("-o", "--out", help="PNG path (default: next to the first file, .png)")
    args = parser.parse_args(argv)
    payloads = [json.loads(Path(f).read_text()) for f in args.files]
    steps = [p for p in payloads if p.get("benchmark") == "step"]
    others = [(f, p) for f, p in zip(args.files, payloads) if p.get("benchmark") != "step"]
    if steps:
        out = Path(args.out) if args.out else Path(args.files[0]).with_suffix(".png")
        print(f"wrote {plot_step(steps, out)}")
    for f, p in others:
        out = Path(args.out) if args.out and not steps and len(others) == 1 else Path(f).with_suffix(".png")
        print(f"wrote {plot_ops([p], out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
