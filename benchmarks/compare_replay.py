"""Benchmark: a replayed comparison on the digits replay table.

Measures, in one run:
1. tabulating ``studies/digits_compare.yaml`` (real training of the table's grid, CPU) unless
   ``--table`` names an existing table;
2. the wall time of a replayed comparison, 4 samplers x 30 seeds x 20 trials (``hpo compare
   --replay``, a subprocess, as a user runs it), against its baseline measured in the same run: the
   simulated time those trials would have trained for (from the tabulated per-epoch seconds);
3. on that table, each algorithm's median best after 20 trials, and the epochs BOHB (and each other
   algorithm) needs to reach random search's final median best.

Run:  .venv/bin/python benchmarks/compare_replay.py [--table storage/tables/digits_compare.json]
Prints a ratio, never asserts. Samplers: grid, random, tpe and bohb when registered (else gp).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo.compare._results import load_results  # noqa: E402
from hpo.compare._stats import summarize  # noqa: E402
from hpo.samplers import SAMPLER_BUILDERS  # noqa: E402

STUDY = ROOT / "studies" / "digits_compare.yaml"


def hpo(*args: str) -> float:
    """Run ``hpo ARGS`` in a subprocess; its wall time in seconds (raises if it fails)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OPTUNA_STORAGE", None)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "hpo", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"hpo {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=None, help="reuse a replay table instead of tabulating")
    parser.add_argument("--points-per-param", type=int, default=9, help="table density (default 9)")
    parser.add_argument("--seeds", type=int, default=30)
    args = parser.parse_args()
    fourth = "bohb" if "bohb" in SAMPLER_BUILDERS else "gp"
    samplers = ["grid", "random", "tpe", fourth]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.table:
            table = Path(args.table).resolve()
            tabulate_s = math.nan
            print(f"table: {table} (given)")
        else:
            table = work / "digits_compare.json"
            tabulate_s = hpo(
                "tabulate",
                str(STUDY),
                "--storage",
                f"sqlite:///{work / 'table.db'}",
                "-o",
                str(table),
                "--points-per-param",
                str(args.points_per_param),
                "--device",
                "cpu",
                "--checkpoint-dir",
                str(work / "ck"),
            )
            print(f"tabulating the grid (real training, CPU): {tabulate_s:.1f} s")
        out = work / "report"
        replay_s = hpo(
            "compare",
            str(STUDY),
            "--replay",
            str(table),
            "--samplers",
            ",".join(samplers),
            "--seeds",
            str(args.seeds),
            "-o",
            str(out),
            "--no-png",
        )
        results = load_results(out / "results.json")

    trials = sum(len(r.trials) for r in results.runs)
    simulated_s = sum(t.seconds for r in results.runs for t in r.trials)
    print(
        f"replayed comparison: {len(samplers)} samplers x {args.seeds} seeds x {results.n_trials} trials "
        f"= {trials} trials in {replay_s:.1f} s wall (process start and report included)"
    )
    print(
        f"baseline, same run: those trials would have trained for {simulated_s / 3600:.2f} h "
        f"on this machine -> replay is {simulated_s / replay_s:,.0f}x faster"
    )
    if not math.isnan(tabulate_s):
        print(
            f"tabulating once took {tabulate_s:.1f} s = {tabulate_s / replay_s:.1f}x the replayed comparison"
        )
    rows = summarize(results)
    target = rows[0].target
    print(
        f"\nmedian best {results.metric} after {results.n_trials} trials (IQR), and epochs to reach random "
        f"search's final median best ({target:.4g}):"
    )
    for row in rows:
        reach = row.epochs_to_target_median
        reached = "-" if reach is None else ("not reached" if math.isinf(reach) else f"{reach:g} epochs")
        print(
            f"  {row.sampler:7s} {row.best_median:.4f} [{row.best_q25:.4f}, {row.best_q75:.4f}]  "
            f"target: {reached} ({row.reached_target}/{row.runs} runs)  "
            f"epochs per run (median): {row.epochs_median:g}  "
            f"pruned: {row.trials_pruned}/{row.trials_finished}"
        )


if __name__ == "__main__":
    main()
