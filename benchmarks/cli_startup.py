"""Start-up time of ``hpo --help`` and ``hpo COMMAND --help`` against ``optuna --help``.

Each command line runs as a fresh process (what a user waits for), alternating between them, several
rounds; the median wall time of each and its ratio to ``optuna --help`` are printed (machines here
are noisy: compare only within a run). The ``hpo`` and ``optuna`` scripts are taken from this
Python's environment.

    python benchmarks/cli_startup.py [--rounds 10] [--commands worker,status,...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
DEFAULT_COMMANDS = "worker,status,compare,dashboard,serve-storage,retrain,extend"


def wall_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="runs of each command line (default 10)")
    parser.add_argument(
        "--commands",
        default=DEFAULT_COMMANDS,
        help=f"hpo commands whose --help is timed besides hpo --help (default {DEFAULT_COMMANDS})",
    )
    args = parser.parse_args()
    lines = {"optuna --help": [str(BIN / "optuna"), "--help"], "hpo --help": [str(BIN / "hpo"), "--help"]}
    for command in filter(None, args.commands.split(",")):
        lines[f"hpo {command} --help"] = [str(BIN / "hpo"), command, "--help"]
    for argv in lines.values():  # warm the file cache once; not counted
        wall_seconds(argv)
    times: dict[str, list[float]] = {label: [] for label in lines}
    for _ in range(args.rounds):
        for label, argv in lines.items():
            times[label].append(wall_seconds(argv))
    baseline = statistics.median(times["optuna --help"])
    print(f"{args.rounds} rounds, median wall time of a fresh process")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:28s} {median:6.3f} s   {median / baseline:5.2f}x optuna --help")


if __name__ == "__main__":
    main()
