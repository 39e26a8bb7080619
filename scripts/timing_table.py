#!/usr/bin/env python3
"""The README's table of run times, one row per finished run directory, from what the run recorded.

    python scripts/timing_table.py runs/<run> [runs/<other run> ...]

Each row: the notebook, the machine (config.json: the CPU with its vector instructions and any cap,
or the GPU), the wall time of `make run` (the executed notebook's papermill start and end), the
minutes of training, the seconds an epoch, and when the per-epoch quality first reached the notebook's
mark (a classifier score of 9 for MNIST digits; a Frechet distance of 50 for colour images, whose
real images score only 3.3), with the final FD. Run it on a run of each machine and
paste the rows under the README's header.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gan/ and gan_utils.py

from gan.runs import read_metrics_csv  # noqa: E402

HEADER = ("| notebook | machine | `make run` wall time | training | per epoch | quality first reached | final FD |\n"
          "|---|---|---|---|---|---|---|")
# notebook -> (column of metrics.csv, its name in the table, mark, whether higher is better)
QUALITY_MARK = {"Vanilla_GAN.ipynb": ("score", "score", 9.0, True), "DCGAN.ipynb": ("fd", "FD", 50.0, False)}


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def wall_seconds(executed: Path) -> float | None:
    """From papermill's record in the executed notebook (None when the run was not `make run`)."""
    if not executed.is_file():
        return None
    meta = json.loads(executed.read_text()).get("metadata", {}).get("papermill", {})
    if not meta.get("start_time") or not meta.get("end_time"):
        return None
    return (datetime.fromisoformat(meta["end_time"]) - datetime.fromisoformat(meta["start_time"])).total_seconds()


def machine(config: dict) -> str:
    device = config.get("device_resolved", "cpu")
    where = config.get("cpu") or config.get("versions", {}).get("processor", "unknown CPU")
    return where if device == "cpu" else f"{device} (host: {where})"


def row(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    history = read_metrics_csv(run / "metrics.csv")
    notebook = config.get("notebook", "Vanilla_GAN.ipynb")
    column, label, mark, higher_is_better = QUALITY_MARK[notebook]
    training = history[-1]["train_seconds"]
    reached = next((r for r in history if column in r and (r[column] >= mark if higher_is_better else r[column] <= mark)), None)
    first = (f"{label} {mark:g} after {reached['train_seconds'] / 60:.1f} min (epoch {int(reached['epoch'])})"
             if reached else f"{label} not {mark:g} in {len(history)} epochs")
    final = json.loads((run / "metrics.json").read_text())["results"] if (run / "metrics.json").is_file() else {}
    fd = next((r["fd"] for name, r in final.items() if "this run" in name), None)
    wall = wall_seconds(run / notebook)
    return (f"| {notebook} | {machine(config)}, {config.get('threads', '?')} threads | "
            f"{minutes(wall) if wall else '-'} | {training / 60:.1f} min | {training / len(history):.1f} s | "
            f"{first} | {f'{fd:.2f}' if fd is not None else '-'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (runs/<date-time>/)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.csv").is_file() or not (r / "config.json").is_file()]
    if missing:
        parser.error(f"not a run directory with metrics.csv and config.json: {', '.join(missing)}")
    print(HEADER)
    for run in args.runs:
        print(row(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
