"""Summaries, the table, the claim checks and the plot of ``schedule_study.py``."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

# Two final losses "match" when their paired difference is within this tolerance: twice the
# standard error of the paired difference over seeds, but at least TOL_REL of the reference's loss
# (with one seed there is no standard error and only the relative part applies).
TOL_REL = 0.03


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def tail_mean(run: dict) -> float:
    """The final training loss: mean of the last 10% of the steps (at least 5), as the per-step loss
    under dropout and stochastic depth is noisy."""
    losses = run["train_loss"]
    k = max(5, len(losses) // 10)
    return _mean(losses[-k:])


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [_mean([c[i] for c in curves]) for i in range(n)]


METRICS = ("final_loss", "clean_loss", "test_loss")


def run_metrics(run: dict) -> dict[str, float]:
    """Per-run final metrics: ``final_loss`` (the study's: training loss under dropout, mean of the
    last 10% of steps), ``clean_loss`` (the whole training split in eval mode when the task reports it,
    else the held-out loss) and ``test_loss`` (held-out)."""
    last = run["eval"][-1] if run["eval"] else {}
    test = last.get("test_loss", math.nan)
    return {"final_loss": tail_mean(run), "clean_loss": last.get("train_eval_loss", test), "test_loss": test}


def summarize_task(runs: list[dict], schedules: list[str]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    steps = max((len(r["train_loss"]) for r in ok), default=0)
    window = max(3, steps // 20)
    clean_is_train = any("train_eval_loss" in e for r in ok for e in r["eval"])
    out: dict = {
        "smoothing_window": window,
        "tolerance_rel": TOL_REL,
        "clean_loss_is": "training split in eval mode" if clean_is_train else "held-out loss",
        "schedules": {},
    }
    per_seed = {s: {r["seed"]: run_metrics(r) for r in ok if r["schedule"] == s} for s in schedules}
    for s in schedules:
        mine = [r for r in ok if r["schedule"] == s]
        failed = [r for r in runs if r["schedule"] == s and r["status"] != "ok"]
        row: dict = {"seeds": [r["seed"] for r in mine], "failed": [(r["seed"], r["status"], r["error"]) for r in failed]}
        if not mine:
            out["schedules"][s] = row
            continue
        for metric in METRICS:
            values = [per_seed[s][r["seed"]][metric] for r in mine]
            row[metric] = _mean(values)
            row[f"{metric}_sd"] = _sd(values)
        # Per-seed final metrics, for paired comparisons between any two schedules (seed keys as
        # strings, as they come back from the JSON).
        row["per_seed"] = {metric: {str(r["seed"]): per_seed[s][r["seed"]][metric] for r in mine} for metric in METRICS}
        accs = [r["eval"][-1]["test_acc"] for r in mine if r["eval"] and "test_acc" in r["eval"][-1]]
        factors = mine[0]["factors"]
        refreshes = _mean([r["factor_refreshes"] for r in mine])
        train_time = _mean([r["train_time_s"] for r in mine])
        row.update(
            schedule_repr=mine[0]["schedule_repr"],
            test_acc=_mean(accs) if accs else None,
            factors=factors,
            factor_refreshes=refreshes,
            full_refreshes=refreshes / factors if factors else 0.0,
            refresh_steps=_mean([r["refresh_steps"] for r in mine]),
            refresh_time_s=_mean([r["refresh_time_s"] for r in mine]),
            decision_time_s=_mean([r["decision_time_s"] for r in mine]),
            optimizer_time_s=_mean([r["optimizer_time_s"] for r in mine]),
            train_time_s=train_time,
            ms_per_step=1e3 * train_time / max(1, len(mine[0]["train_loss"])),
            refresh_share=_mean([r["refresh_time_s"] / r["train_time_s"] for r in mine if r["train_time_s"]]),
            # The same in process CPU time: steadier than wall-clock on a shared machine.
            refresh_cpu_s=_mean([r["refresh_cpu_s"] for r in mine]),
            decision_cpu_s=_mean([r["decision_cpu_s"] for r in mine]),
            optimizer_cpu_s=_mean([r["optimizer_cpu_s"] for r in mine]),
            train_cpu_s=_mean([r["train_cpu_s"] for r in mine]),
            ms_cpu_per_step=1e3 * _mean([r["train_cpu_s"] for r in mine]) / max(1, len(mine[0]["train_loss"])),
            refresh_cpu_share=_mean([r["refresh_cpu_s"] / r["train_cpu_s"] for r in mine if r["train_cpu_s"]]),
            load_average=_mean([r["load_before"][0] for r in mine]),
        )
        row["curve_smoothed"] = _mean_curve([smooth(r["train_loss"], window) for r in mine])
        row["curve_time_s"] = _mean_curve([r["time_s"] for r in mine])
        row["curve_cpu_s"] = _mean_curve([r["cpu_s"] for r in mine])
        out["schedules"][s] = row
    # Paired differences of the final metrics (same seed), against const1 and adam.
    for ref in ("const1", "adam"):
        for s in schedules:
            row = out["schedules"][s]
            seeds = sorted(set(per_seed[s]) & set(per_seed.get(ref, {})))
            if s == ref or not seeds:
                continue
            row[f"vs_{ref}"] = {}
            for metric in METRICS:
                diffs = [per_seed[s][k][metric] - per_seed[ref][k][metric] for k in seeds]
                row[f"vs_{ref}"][metric] = {
                    "diff": _mean(diffs),
                    "se": _sd(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None,
                    "seeds": len(diffs),
                }
    # Steps and training time for the smoothed mean curve to reach Adam's final loss.
    adam = out["schedules"].get("adam", {})
    target = adam.get("final_loss")
    out["target_loss"] = target
    for s in schedules:
        row = out["schedules"][s]
        if target is None or "curve_smoothed" not in row:
            continue
        hit = next((i for i, v in enumerate(row["curve_smoothed"]) if v <= target), None)
        row["steps_to_adam"] = None if hit is None else hit + 1
        row["time_to_adam_s"] = None if hit is None else row["curve_time_s"][hit]
        row["cpu_to_adam_s"] = None if hit is None else row["curve_cpu_s"][hit]
    return out


# ----------------------------------------------------------------------------------------- claims
def _compare(summary: dict, a: str, b: str, metric: str) -> tuple[float, float, float]:
    """(mean over seeds of the paired difference a - b of ``metric``, tolerance, b's mean).

    Paired: the same seed gives both runs the same initial weights, batches and dropout draws, so
    the seed-to-seed spread cancels. Tolerance: max(2 standard errors of the paired difference,
    TOL_REL of b's mean); with one seed only the relative part applies."""
    rows = summary["schedules"]
    va, vb = rows[a]["per_seed"][metric], rows[b]["per_seed"][metric]
    seeds = sorted(set(va) & set(vb))
    diffs = [va[k] - vb[k] for k in seeds]
    diff = _mean(diffs)
    se = _sd(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    tol = max(2 * se if se else 0.0, TOL_REL * abs(rows[b][metric]))
    return diff, tol, rows[b][metric]


def _fmt_cmp(a: str, b: str, c: tuple[float, float, float]) -> str:
    diff, tol, ref = c
    return f"{a} - {b} = {diff:+.4f} ({100 * diff / ref:+.1f}% of {ref:.4f}; tol {tol:.4f})"


def check_claims(summary: dict, metric: str = "final_loss") -> list[dict]:
    """The study's claims (and two about the new schedules) checked on ``metric``; verdicts are
    "held", "not held", "partly" or "n/a" (a schedule it needs was not run)."""
    rows = summary["schedules"]
    claims: list[dict] = []

    def add(key: str, text: str, verdict: str, evidence: str) -> None:
        claims.append({"key": key, "metric": metric, "claim": text, "verdict": verdict, "evidence": evidence})

    def have(*names: str) -> bool:
        return all(n in rows and metric in rows[n] and not math.isnan(rows[n][metric]) for n in names)

    def cmp(a: str, b: str) -> tuple[float, float, float]:
        return _compare(summary, a, b, metric)

    soap = [s for s in rows if s != "adam" and have(s)]
    if have("adam") and soap:
        cmps = {s: cmp(s, "adam") for s in soap}
        better = [s for s, c in cmps.items() if c[0] < -c[1]]
        not_better = [s for s in soap if s not in better]
        add(
            "soap_beats_adam",
            "every SOAP schedule reaches a lower loss than Adam",
            "held" if not not_better else ("partly" if better else "not held"),
            f"{len(better)}/{len(soap)} lower beyond tolerance (not: {', '.join(not_better) or 'none'}); vs adam: "
            + ", ".join(f"{s} {100 * c[0] / c[2]:+.1f}%" for s, c in cmps.items()),
        )
    if have("const1", "const100"):
        c = cmp("const100", "const1")
        order = " < ".join(sorted((s for s in ("const1", "const10", "const100") if have(s)), key=lambda s: rows[s][metric]))
        add(
            "constant_frequency_matters",
            "with a constant interval, f=1 gives the best loss and f=100 is clearly worse",
            "held" if c[0] > c[1] else "not held",
            f"{_fmt_cmp('const100', 'const1', c)}; by loss: {order}",
        )
    if have("const1", "doubling"):
        c = cmp("doubling", "const1")
        frac = rows["doubling"]["factor_refreshes"] / max(1.0, rows["const1"]["factor_refreshes"])
        time_frac = rows["doubling"]["refresh_cpu_s"] / max(1e-12, rows["const1"]["refresh_cpu_s"])
        add(
            "doubling_matches_const1",
            "doubling matches f=1 at a fraction of the refreshes",
            "held" if c[0] <= c[1] else "not held",
            f"{_fmt_cmp('doubling', 'const1', c)}; doubling does {100 * frac:.1f}% of const1's factor refreshes "
            f"and {100 * time_frac:.1f}% of its refresh CPU time",
        )
    if have("const1", "halving"):
        c1 = cmp("halving", "const1")
        evidence, held = _fmt_cmp("halving", "const1", c1), c1[0] > c1[1]
        if have("doubling"):
            c2 = cmp("halving", "doubling")
            evidence += f"; {_fmt_cmp('halving', 'doubling', c2)}"
            held = held and c2[0] > c2[1]
        add(
            "halving_degrades",
            "halving the interval at each refresh clearly degrades training",
            "held" if held else "not held",
            evidence,
        )
    if have("const1", "loss_threshold"):
        c = cmp("loss_threshold", "const1")
        add(
            "loss_threshold_among_best",
            "the loss-threshold schedule is among the lowest losses (matches f=1)",
            "held" if c[0] <= c[1] else "not held",
            f"{_fmt_cmp('loss_threshold', 'const1', c)}; {rows['loss_threshold']['factor_refreshes']:.0f} factor refreshes "
            f"vs const1's {rows['const1']['factor_refreshes']:.0f}",
        )
    if have("const1", "doubling", "const100"):
        t = {s: rows[s]["train_cpu_s"] for s in ("const1", "doubling", "const100")}
        held = t["const1"] > t["doubling"] and t["doubling"] <= 1.1 * t["const100"]
        add(
            "doubling_cheap_in_time",
            "f=1 costs more time; doubling costs at most ~10% more than f=100 (CPU time)",
            "held" if held else "not held",
            f"train CPU time const1 {t['const1']:.1f} s, doubling {t['doubling']:.1f} s, const100 {t['const100']:.1f} s "
            f"(doubling/const100 {t['doubling'] / t['const100']:.2f}; wall-clock "
            + ", ".join(f"{s} {rows[s]['train_time_s']:.1f} s" for s in t)
            + "); refresh CPU time "
            + ", ".join(f"{s} {rows[s]['refresh_cpu_s']:.2f} s" for s in t),
        )
    if have("loss_threshold", "doubling"):
        t = {s: rows[s]["train_cpu_s"] for s in ("loss_threshold", "doubling")}
        add(
            "loss_threshold_costs_time",
            "the loss-threshold schedule takes more time than doubling (CPU time)",
            "held" if t["loss_threshold"] > t["doubling"] else "not held",
            f"train CPU time loss_threshold {t['loss_threshold']:.1f} s, doubling {t['doubling']:.1f} s; refresh CPU time "
            f"{rows['loss_threshold']['refresh_cpu_s']:.2f} s vs {rows['doubling']['refresh_cpu_s']:.2f} s",
        )
    if have("adam", "doubling"):
        t = {s: rows[s]["train_cpu_s"] for s in ("adam", "doubling")}
        add(
            "adam_faster_per_step",
            "Adam takes a little less time for the same steps than doubling (CPU time)",
            "held" if t["adam"] < t["doubling"] else "not held",
            f"train CPU time adam {t['adam']:.1f} s, doubling {t['doubling']:.1f} s (ratio {t['doubling'] / t['adam']:.2f})",
        )
    for s in ("drift_adaptive", "budgeted", "staggered", "staggered_params"):
        if have("const10", s):
            c = cmp(s, "const10")
            add(
                f"{s}_matches_const10",
                f"(not in the study) {s} matches f=10",
                "held" if c[0] <= c[1] else "not held",
                f"{_fmt_cmp(s, 'const10', c)}; {rows[s]['full_refreshes']:.1f} full-basis equivalents vs const10's "
                f"{rows['const10']['full_refreshes']:.1f}; decision overhead {rows[s]['decision_cpu_s']:.2f} s CPU",
            )
    return claims


def format_claims(claims: list[dict], label: str = "") -> str:
    lines = [
        f"claims of the study on {label or (claims[0]['metric'] if claims else '-')} (tolerance: max(2 SE of the paired "
        f"seed difference, {100 * TOL_REL:.0f}% of the reference)):"
    ]
    for c in claims:
        lines.append(f"  [{c['verdict']:>8}] {c['claim']}: {c['evidence']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ table
def _f(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(task: str, summary: dict) -> str:
    header = (
        f"{'schedule':<18}{'final loss':>16}{'vs c1':>7}{'clean loss':>16}{'vs c1':>7}{'test loss':>10}{'acc':>7}"
        f"{'refr.':>7}{'full':>6}{'refr.':>7}{'decide':>7}{'opt':>7}{'train':>7}{'wall':>7}{'ms/step':>8}"
        f"{'steps>A':>8}{'cpu>A':>7}"
    )
    lines = [
        f"[{task}] final loss = training loss (per batch; under dropout and layer drop for the cnn) averaged over the last 10% "
        f"of steps; clean loss = "
        f"{summary['clean_loss_is']}; mean +- sd over seeds; vs c1 = paired difference to const1",
        "refr. = factor refreshes (full = / factors); refr./decide/opt/train = CPU seconds per run in refreshes, in the "
        "schedule's decision (drift), in optimizer.step, in training; wall = training wall-clock s; ms/step = CPU; "
        "steps>A / cpu>A = steps / CPU s for the smoothed loss to reach Adam's final loss",
        header,
        "-" * len(header),
    ]
    for name, row in summary["schedules"].items():
        if "final_loss" not in row:
            lines.append(f"{name:<18} no successful run {row.get('failed')}")
            continue
        vs = row.get("vs_const1")
        c1 = summary["schedules"].get("const1", {})
        rel = {m: f"{100 * vs[m]['diff'] / c1[m]:+.0f}%" if vs else "-" for m in ("final_loss", "clean_loss")}
        loss = f"{row['final_loss']:.4f}+-{row['final_loss_sd']:.4f}"
        clean = f"{row['clean_loss']:.4f}+-{row['clean_loss_sd']:.4f}"
        lines.append(
            f"{name:<18}{loss:>16}{rel['final_loss']:>7}{clean:>16}{rel['clean_loss']:>7}{row['test_loss']:>10.4f}"
            f"{_f(row['test_acc'], '.3f'):>7}{row['factor_refreshes']:>7.0f}{row['full_refreshes']:>6.1f}"
            f"{row['refresh_cpu_s']:>7.2f}{row['decision_cpu_s']:>7.2f}{row['optimizer_cpu_s']:>7.1f}{row['train_cpu_s']:>7.1f}"
            f"{row['train_time_s']:>7.1f}{row['ms_cpu_per_step']:>8.1f}"
            f"{_f(row.get('steps_to_adam'), 'd', 'never'):>8}{_f(row.get('cpu_to_adam_s'), '.1f', 'never'):>7}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plot
def plot_task(task: str, summary: dict, runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in summary["schedules"].items() if "curve_smoothed" in v}
    ok = [r for r in runs if r["status"] == "ok"]
    cmap = plt.get_cmap("tab10")
    colors = {name: cmap(i % 10) for i, name in enumerate(summary["schedules"])}
    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    (ax_step, ax_time, ax_clean), (ax_cum, ax_refr, ax_cost) = axes
    for name, row in rows.items():
        style = {"color": colors[name], "lw": 1.4, "ls": "--" if name == "adam" else "-"}
        steps = range(1, len(row["curve_smoothed"]) + 1)
        ax_step.plot(steps, row["curve_smoothed"], label=name, **style)
        ax_time.plot(row["curve_cpu_s"], row["curve_smoothed"], label=name, **style)
        mine = [r for r in ok if r["schedule"] == name]
        n_eval = min(len(r["eval"]) for r in mine)
        key = "train_eval_loss" if "train_eval_loss" in mine[0]["eval"][0] else "test_loss"
        ax_clean.plot(
            mine[0]["eval_steps"][:n_eval],
            _mean_curve([[e[key] for e in r["eval"][:n_eval]] for r in mine]),
            marker="o",
            ms=3,
            label=name,
            **style,
        )
        if name != "adam":
            cumulative = _mean_curve([_cumsum(r["refreshed_factors"]) for r in mine])
            ax_cum.plot(steps[: len(cumulative)], [c / max(1, row["factors"]) for c in cumulative], label=name, **style)
    smoothing = f"moving avg {summary['smoothing_window']} steps, mean over seeds"
    for ax, xlabel, ylabel in (
        (ax_step, "step", f"training loss ({smoothing})"),
        (ax_time, "training CPU time (s), mean over seeds", f"training loss ({smoothing})"),
        (ax_clean, "step", f"{summary['clean_loss_is']} (mean over seeds)"),
    ):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    ax_step.legend(fontsize=8, ncol=2)
    ax_cum.set_xlabel("step")
    ax_cum.set_ylabel("cumulative refreshes / factors")
    ax_cum.set_yscale("symlog", linthresh=1)
    ax_cum.grid(alpha=0.3, which="both")
    names = list(rows)
    ax_refr.bar(names, [rows[n]["full_refreshes"] for n in names], color=[colors[n] for n in names])
    ax_refr.set_ylabel("refreshes per run (factor refreshes / factors)")
    ax_refr.set_yscale("symlog", linthresh=1)
    refresh = [rows[n]["refresh_cpu_s"] for n in names]
    decide = [rows[n]["decision_cpu_s"] for n in names]
    other_opt = [max(0.0, rows[n]["optimizer_cpu_s"] - r - d) for n, r, d in zip(names, refresh, decide)]
    model = [max(0.0, rows[n]["train_cpu_s"] - rows[n]["optimizer_cpu_s"]) for n in names]
    bottom = [0.0] * len(names)
    for label, values, color in (
        ("forward/backward/data", model, "#bbbbbb"),
        ("optimizer step (rest)", other_opt, "#6699cc"),
        ("schedule decision (drift)", decide, "#ee9944"),
        ("refresh", refresh, "#cc3333"),
    ):
        ax_cost.bar(names, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_cost.plot(names, [rows[n]["train_time_s"] for n in names], "k_", ms=14, label="wall-clock (total)")
    ax_cost.set_ylabel("training CPU time per run (s), mean over seeds")
    ax_cost.legend(fontsize=8)
    for ax in (ax_refr, ax_cost):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"[{task}] {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
