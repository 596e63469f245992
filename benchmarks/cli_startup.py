"""Start-up time of ``hpo --help`` and ``hpo COMMAND --help`` (every command) against ``optuna --help``.

Each command line runs as a fresh process (what a user waits for), alternating between them, several
rounds; the median wall time of each and its ratio to ``optuna --help`` are printed, then the
slowest ratio against the goal (1.5x: issue 11). Machines here are noisy: compare only within a
run. The ``hpo`` and ``optuna`` scripts are taken from this Python's environment.

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
GOAL = 1.5  # hpo's help at most this many times optuna's


def every_command() -> list[str]:
    """The names of all ``hpo`` commands, as ``hpo --help`` lists them."""
    from hpo.cli import build_parser

    return sorted(build_parser(lazy=True).commands)


def wall_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="runs of each command line (default 10)")
    parser.add_argument(
        "--commands",
        default=None,
        help="comma-separated hpo commands whose --help is timed besides hpo --help (default: all)",
    )
    args = parser.parse_args()
    commands = args.commands.split(",") if args.commands else every_command()
    lines = {"optuna --help": [str(BIN / "optuna"), "--help"], "hpo --help": [str(BIN / "hpo"), "--help"]}
    for command in filter(None, commands):
        lines[f"hpo {command} --help"] = [str(BIN / "hpo"), command, "--help"]
    for argv in lines.values():  # warm the file cache once; not counted
        wall_seconds(argv)
    times: dict[str, list[float]] = {label: [] for label in lines}
    for _ in range(args.rounds):
        for label, argv in lines.items():
            times[label].append(wall_seconds(argv))
    baseline = statistics.median(times["optuna --help"])
    print(f"{args.rounds} rounds, median wall time of a fresh process")
    ratios = {}
    for label, values in times.items():
        median = statistics.median(values)
        ratios[label] = median / baseline
        print(f"{label:28s} {median:6.3f} s   {ratios[label]:5.2f}x optuna --help")
    hpo_ratios = {label: ratio for label, ratio in ratios.items() if label.startswith("hpo")}
    slowest = max(hpo_ratios, key=hpo_ratios.__getitem__)
    verdict = "within" if hpo_ratios[slowest] <= GOAL else "OVER"
    print(f"slowest: {slowest} at {hpo_ratios[slowest]:.2f}x, {verdict} the {GOAL}x goal")


if __name__ == "__main__":
    main()
