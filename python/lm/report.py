"""Turn per-run records of ``train_lm.py`` into the comparison: best LR, time to target, table, plot."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, stdev


def _final_val(run: dict) -> float:
    if run["status"] != "ok" or not run["val_loss"]:
        return math.inf
    return run["val_loss"][-1]


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [mean(values) for values in zip(*curves, strict=True)]


def first_crossing(xs: list[float], curve: list[float], target: float) -> float | None:
    """First ``x`` where the piecewise-linear ``curve`` reaches ``target`` or below; None if never."""
    for i, value in enumerate(curve):
        if value <= target:
            if i == 0:
                return xs[0]
            before = curve[i - 1]
            fraction = (before - target) / (before - value)
            return xs[i - 1] + fraction * (xs[i] - xs[i - 1])
    return None


def summarize(runs: list[dict], optimizers: list[str], reference: str = "adamw") -> dict:
    """Per optimizer: its best LR (lowest mean final val loss over seeds) and that LR's mean curves.

    Then steps and training wall-clock for each optimizer's mean validation curve to reach the
    reference optimizer's best final validation loss, interpolated linearly between evaluations,
    and their ratios to the reference's own figures.
    """
    per_optimizer: dict[str, dict] = {}
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        by_lr: dict[float, list[dict]] = {}
        for run in mine:
            by_lr.setdefault(run["lr"], []).append(run)
        lr_table = {lr: mean(_final_val(r) for r in group) for lr, group in by_lr.items()}
        entry: dict = {
            "lr_grid": {f"{lr:g}": (v if math.isfinite(v) else None) for lr, v in lr_table.items()},
            "statuses": sorted({r["status"] for r in mine}),
            "errors": sorted({r["error"] for r in mine if r.get("error")}),
        }
        finite = {lr: v for lr, v in lr_table.items() if math.isfinite(v)}
        if not finite:
            entry["best_lr"] = None
            per_optimizer[name] = entry
            continue
        best_lr = min(finite, key=finite.get)
        best = by_lr[best_lr]
        finals = [_final_val(r) for r in best]
        entry.update(
            best_lr=best_lr,
            seeds=[r["seed"] for r in best],
            final_val_loss=mean(finals),
            final_val_loss_std=stdev(finals) if len(finals) > 1 else 0.0,
            eval_steps=best[0]["eval_steps"],
            val_loss=_mean_curve([r["val_loss"] for r in best]),
            train_time_at_eval_s=_mean_curve([r["train_time_at_eval_s"] for r in best]),
            train_time_s=mean(r["train_time_s"] for r in best),
            optimizer_time_s=mean(r["optimizer_time_s"] for r in best),
            optimizer_share=mean(r["optimizer_share"] for r in best),
            step_time_ms=1e3 * mean(r["train_time_s"] / max(1, r["steps_done"]) for r in best),
            peak_memory_bytes=max(r["peak_memory_bytes"] for r in best),
            optimizer_state_bytes=max(r["optimizer_state_bytes"] for r in best),
        )
        per_optimizer[name] = entry

    summary: dict = {"reference": reference, "target_val_loss": None, "optimizers": per_optimizer}
    ref = per_optimizer.get(reference)
    if not ref or ref.get("best_lr") is None:
        return summary
    target = ref["final_val_loss"]
    summary["target_val_loss"] = target
    ref_steps = first_crossing(ref["eval_steps"], ref["val_loss"], target)
    ref_time = first_crossing(ref["train_time_at_eval_s"], ref["val_loss"], target)
    for entry in per_optimizer.values():
        if entry.get("best_lr") is None:
            continue
        steps = first_crossing(entry["eval_steps"], entry["val_loss"], target)
        seconds = first_crossing(entry["train_time_at_eval_s"], entry["val_loss"], target)
        entry["steps_to_target"] = steps
        entry["time_to_target_s"] = seconds
        entry["steps_ratio"] = steps / ref_steps if steps is not None and ref_steps else None
        entry["time_ratio"] = seconds / ref_time if seconds is not None and ref_time else None
    return summary


def _fmt(value: float | None, spec: str, missing: str = "not reached") -> str:
    return missing if value is None else format(value, spec)


def format_table(summary: dict) -> str:
    target = summary["target_val_loss"]
    ref = summary["reference"]
    width = max([9, *map(len, summary["optimizers"])])  # peers have long names
    header = (
        f"{'optimizer':<{width}} {'best lr':>8} {'final val':>15} {'steps to':>11} {'x ' + ref:>8} "
        f"{'time to':>11} {'x ' + ref:>8} {'train s':>8} {'ms/step':>8} {'opt share':>9} "
        f"{'state MB':>8} {'peak MB':>8}"
    )
    lines = [
        f"target: {ref}'s final validation loss = {_fmt(target, '.4f', 'n/a')} "
        "(steps/time from each optimizer's mean curve, interpolated between evaluations)",
        header,
        "-" * len(header),
    ]
    for name, e in summary["optimizers"].items():
        if e.get("best_lr") is None:
            why = "; ".join(e["errors"]) or ", ".join(e["statuses"]) or "no runs"
            lines.append(f"{name:<{width}} {'-':>8} failed: {why[:150]}")
            continue
        lines.append(
            f"{name:<{width}} {e['best_lr']:>8.2g} "
            f"{e['final_val_loss']:>8.4f}±{e['final_val_loss_std']:<6.4f} "
            f"{_fmt(e.get('steps_to_target'), '.1f'):>11} {_fmt(e.get('steps_ratio'), '.3f', '-'):>8} "
            f"{_fmt(e.get('time_to_target_s'), '.1f'):>11} {_fmt(e.get('time_ratio'), '.3f', '-'):>8} "
            f"{e['train_time_s']:>8.1f} {e['step_time_ms']:>8.1f} {e['optimizer_share']:>9.1%} "
            f"{e['optimizer_state_bytes'] / 2**20:>8.2f} {e['peak_memory_bytes'] / 2**20:>8.0f}"
        )
    return "\n".join(lines)


def plot_curves(summary: dict, path: Path, title: str = "", wall_clock: bool = True) -> None:
    """Validation loss against step and (``wall_clock``) against training wall-clock, one line per
    optimizer. Leave the wall-clock panel out when the runs shared or paused their cores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if wall_clock:
        fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        panels = ((by_step, "step"), (by_time, "training wall-clock (s)"))
    else:
        fig, by_step = plt.subplots(1, 1, figsize=(6, 4.2), constrained_layout=True)
        by_time = None
        panels = ((by_step, "step"),)
    for name, e in summary["optimizers"].items():
        if e.get("best_lr") is None:
            continue
        label = f"{name} (lr {e['best_lr']:g})"
        by_step.plot(e["eval_steps"], e["val_loss"], marker=".", label=label)
        if by_time is not None:
            by_time.plot(e["train_time_at_eval_s"], e["val_loss"], marker=".", label=label)
    target = summary["target_val_loss"]
    for ax, xlabel in panels:
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"{summary['reference']} final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
        # The evaluation at step 0 (loss ~ log vocab) would squash the interesting part of the curves.
        finals = [e["val_loss"] for e in summary["optimizers"].values() if e.get("best_lr") is not None]
        if finals:
            low = min(min(c) for c in finals)
            high = max(max(c[1:] or c) for c in finals)
            if high > low:
                ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    by_step.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
