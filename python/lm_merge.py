"""Merge the results of several ``train_lm.py`` invocations into one comparison.

A grid can be split over processes or machines (one seed or one optimizer each, e.g. two
single-threaded runs side by side on a 2-core machine); this program puts their runs together and
recomputes what ``train_lm.py`` reports for one invocation: each optimizer's best LR (lowest mean
final validation loss over seeds), steps and wall-clock to AdamW's final validation loss, the table,
``results.json`` and ``loss_curves.png``. The inputs must share the training configuration (model,
batch, steps, context, schedule, corpus); only seeds, LR grids and optimizers may differ. A run
(optimizer, lr, seed) present in several inputs is taken from the first one given.

    python python/lm_merge.py runs/a/results.json runs/b/results.json --out runs/merged
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm.report import format_table, plot_curves, summarize  # noqa: E402
from train_lm import ALL_OPTIMIZERS  # noqa: E402

# config keys that may differ between the merged invocations
PER_INVOCATION = {"seeds", "lr_grid", "optimizers", "threads", "lapack_threads", "checkpoint_every",
                  "peers", "skipped_peers", "upstream_soap"}


def merge(results: list[dict]) -> dict:
    """One results dict from several; raises ``ValueError`` when the training configs differ."""
    if not results:
        raise ValueError("nothing to merge")
    base = {k: v for k, v in results[0]["config"].items() if k not in PER_INVOCATION}
    for i, r in enumerate(results[1:], start=2):
        other = {k: v for k, v in r["config"].items() if k not in PER_INVOCATION}
        differ = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if differ:
            raise ValueError(f"input {i} was trained with a different configuration ({', '.join(differ)}): "
                             "only seeds, LR grids and optimizers may differ")
    runs, seen = [], set()
    for r in results:
        for run in r["runs"]:
            key = (run["optimizer"], run["lr"], run["seed"])
            if key not in seen:
                seen.add(key)
                runs.append(run)
    present = {run["optimizer"] for run in runs}
    optimizers = [name for name in ALL_OPTIMIZERS if name in present]
    summary = summarize(runs, optimizers)
    config = dict(results[0]["config"])
    config.update(
        optimizers=optimizers,
        seeds=sorted({run["seed"] for run in runs}),
        lr_grid={name: sorted({run["lr"] for run in runs if run["optimizer"] == name}) for name in optimizers},
        peers={k: v for r in results for k, v in r["config"].get("peers", {}).items() if k in optimizers},
    )
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "lm_merge.py of: " + " | ".join(r.get("command", "?") for r in results),
        "complete": all(r.get("complete", False) for r in results),  # every input ran its whole grid
        "inputs": [
            {"command": r.get("command"), "complete": r.get("complete", False), "runs": len(r["runs"])} for r in results
        ],
        "config": config,
        "environment": results[0].get("environment"),
        "total_time_s": sum(r.get("total_time_s", 0.0) for r in results),
        "summary": summary,
        "table": format_table(summary),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="lm_merge.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="results.json files written by train_lm.py")
    p.add_argument("--out", type=Path, required=True, help="folder for the merged results.json and loss_curves.png")
    p.add_argument("--title", default="", help="plot title (default: from the configuration)")
    p.add_argument("--no-wall-clock", action="store_true",
                   help="plot validation loss against steps only (when the runs shared or paused their cores, "
                   "their wall-clock says nothing about the optimizers)")
    args = p.parse_args(argv)
    loaded = []
    for path in args.results:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (give the results.json that train_lm.py wrote)")
        loaded.append(json.loads(path.read_text()))
    try:
        merged = merge(loaded)
    except ValueError as exc:
        raise SystemExit(f"lm_merge.py: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(merged, indent=1))
    c = merged["config"]
    title = args.title or (f"batch {c.get('batch_size')}x{c.get('ctx')}, {c.get('steps')} steps, "
                           f"mean over seeds {c['seeds']}")
    plot_curves(merged["summary"], args.out / "loss_curves.png", title=title, wall_clock=not args.no_wall_clock)
    print(merged["table"])
    print(f"wrote {args.out / 'results.json'} and {args.out / 'loss_curves.png'}")
    return merged


if __name__ == "__main__":
    main()
