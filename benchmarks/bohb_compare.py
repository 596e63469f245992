"""BOHB compared honestly: hpo (paper mode, continuation mode) against TPE + Hyperband, random search,
hpbandster 0.7.4, DEHB and Syne Tune, >= 100 seeds, cost counted in epochs actually trained.

Problems (``benchmarks/_bohb_problems.py``): multi-fidelity Branin, counting ones (8 categorical + 8
continuous, fidelity = number of Bernoulli draws), Hartmann-6 with a fidelity (budgets 1, 3, 9, 27
epochs, eta 3), and a replay table of 81 real digits learning curves (25 epochs; budgets 3, 8, 25),
``benchmarks/data/digits_replay.json`` (220 kB, kept in the repository), made once with::

    hpo tabulate studies/digits_compare.yaml --points-per-param 9 --device cpu \\
        -o benchmarks/data/digits_replay.json

Methods, each one simulated worker until the epochs it trained reach the budget (``--budget``
full-budget trials' worth, R = 27 or 25 epochs):

* ``hpo-continuation`` — ``hpo.BOHBSampler(continuation=True, evidence="every_epoch")``: a promoted
  configuration resumes from its parent's checkpoint and pays only the epochs its budget adds;
* ``hpo-paper`` — ``hpo.BOHBSampler(continuation=False, evidence="paper")``: retrains from scratch,
  only each evaluation's own result feeds the model (hpbandster's BOHB);
* ``tpe-hyperband`` — Optuna's TPESampler with its HyperbandPruner (a pruned trial pays its epochs);
* ``random`` — plain random search, every trial at the full budget;
* ``hpbandster``, ``dehb``, ``synetune`` — hpbandster 0.7.4's BOHB, DEHB 0.1.2 and Syne Tune 0.16's
  (asynchronous) BOHB, each in its own virtual environment, run by ``benchmarks/_bohb_external.py``
  (JSON on stdin and stdout); skipped, with the reason printed, when that environment is missing.
  Their set-up (Python 3.11; not part of hpo's dependencies)::

    python3.11 -m venv /tmp/venv-hpbandster && /tmp/venv-hpbandster/bin/pip install \\
        "numpy==1.26.4" "scipy<1.14" "statsmodels<0.15" "ConfigSpace==0.6.1" "hpbandster==0.7.4"
    python3.11 -m venv /tmp/venv-dehb && /tmp/venv-dehb/bin/pip install "dehb==0.1.2"
    python3.11 -m venv /tmp/venv-synetune && /tmp/venv-synetune/bin/pip install "syne-tune==0.16.0"

The score is the regret of the incumbent (the configuration with the lowest value observed at the
full budget; its true full-budget value minus the optimum) once a given number of epochs is
trained: ``--checkpoints`` (default 5, 10, 20 R). Printed per problem and method: median and IQR
over the seeds, the one-sided Mann-Whitney U p-value of the method's regret being lower than random
search's at the last checkpoint, and the epochs after which the method's median regret first reaches
random search's median at the last checkpoint (and that as a fraction of random search's epochs).
Then the issue's two goals, stated from the same runs. Every method runs the same seeds (a prime
stride apart); on counting ones the seed also fixes the Bernoulli draws, so the noise is paired.

Run:  nice -n 10 .venv/bin/python benchmarks/bohb_compare.py --out /tmp/bohb_compare.md
      (100 seeds, all problems and methods: about an hour on 2 busy cores; ``--results FILE`` keeps
      each finished chunk of seeds, and running again with the same FILE continues)
      .venv/bin/python benchmarks/bohb_compare.py --seeds 3 --problems branin   (a quick look)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bohb_problems import PROBLEMS  # noqa: E402
from _bohb_report import Run, goal_lines, table  # noqa: E402

SEED_STRIDE = 1_000_003  # seeds spread apart: no run shares a random stream with another
CHUNK = 10  # seeds per task
LOCAL = ("hpo-continuation", "hpo-paper", "tpe-hyperband", "random")
EXTERNAL = ("hpbandster", "dehb", "synetune")
LABELS = {
    "hpo-continuation": "hpo BOHB, continuation + every_epoch",
    "hpo-paper": "hpo BOHB, paper (retrain, evidence=paper)",
    "tpe-hyperband": "TPE + HyperbandPruner (Optuna)",
    "random": "random search (full budget)",
    "hpbandster": "hpbandster 0.7.4 BOHB",
    "dehb": "DEHB 0.1.2",
    "synetune": "Syne Tune 0.16 BOHB (async)",
}


def _local(method: str, problem: str, seeds: list[int], budget: int) -> list[dict[str, Any]]:
    from _bohb_methods import quiet, run_local

    quiet()
    return [run_local(method, PROBLEMS[problem], seed, budget).to_json() for seed in seeds]


def _external(python: str, method: str, problem: str, seeds: list[int], budget: int) -> list[dict[str, Any]]:
    request = json.dumps({"method": method, "problem": problem, "seeds": seeds, "budget": budget})
    result = subprocess.run(
        [python, str(HERE / "_bohb_external.py")], input=request, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{method} on {problem} failed:\n{result.stderr[-3000:]}")
    trajectories: list[dict[str, Any]] = json.loads(result.stdout)["trajectories"]
    return trajectories


def _python_for(method: str, venv_dir: Path) -> tuple[str | None, str]:
    python = venv_dir / f"venv-{method}" / "bin" / "python"
    if not python.exists():
        return None, f"{python} missing (set it up as the module docstring says)"
    return str(python), ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", choices=LOCAL + EXTERNAL, default=list(LOCAL + EXTERNAL))
    parser.add_argument("--budget", type=float, default=20, help="epochs per run, in R (default 20)")
    parser.add_argument("--checkpoints", type=float, nargs="+", default=[5, 10, 20], help="in R")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2, at most 2)")
    parser.add_argument("--venv-dir", type=Path, default=Path("/tmp"), help="holds venv-hpbandster etc.")
    parser.add_argument(
        "--max-seeds", nargs="*", default=[], metavar="METHOD=N", help="fewer seeds for a slow method"
    )
    parser.add_argument("--results", type=Path, help="JSON-lines file of finished chunks (continued)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument(
        "--table-only", action="store_true", help="run nothing: the table of what --results holds"
    )
    args = parser.parse_args(argv)
    if max(args.checkpoints) > args.budget:
        parser.error("--checkpoints must not exceed --budget")
    checkpoints = sorted(args.checkpoints)
    caps = {m: int(n) for m, n in (item.split("=", 1) for item in args.max_seeds)}
    seeds = [SEED_STRIDE * (i + 1) for i in range(args.seeds)]

    pythons: dict[str, str] = {}
    skipped: list[str] = []
    for method in args.methods:
        if method in EXTERNAL:
            python, reason = _python_for(method, args.venv_dir)
            if python is None:
                skipped.append(f"{LABELS[method]} skipped: {reason}")
                print(skipped[-1], flush=True)
            else:
                pythons[method] = python
    methods = [m for m in args.methods if m in LOCAL or m in pythons]

    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    if args.results and args.results.exists():
        for line in args.results.read_text().splitlines():
            record = json.loads(line)
            done[(record["problem"], record["method"], record["seed"])] = record["run"]

    started = time.monotonic()
    if args.table_only and not args.results:
        parser.error("--table-only needs --results")
    with ProcessPoolExecutor(max(1, min(args.jobs, 2))) as pool:
        futures: list[tuple[str, str, Future[list[dict[str, Any]]]]] = []
        # Chunks of seeds outermost, so that every method has about as many seeds at any time.
        for first in range(0, len(seeds), CHUNK):
            for problem in args.problems:
                budget = int(args.budget * PROBLEMS[problem].max_epochs)
                for method in methods:
                    chunk = [
                        s
                        for i, s in enumerate(seeds[first : first + CHUNK], start=first)
                        if i < caps.get(method, len(seeds)) and (problem, method, s) not in done
                    ]
                    if not chunk or args.table_only:
                        continue
                    if method in LOCAL:
                        future = pool.submit(_local, method, problem, chunk, budget)
                    else:
                        future = pool.submit(_external, pythons[method], method, problem, chunk, budget)
                    futures.append((problem, method, future))
        for problem, method, future in futures:
            runs = future.result()
            if args.results:
                with args.results.open("a") as f:
                    for run in runs:
                        f.write(
                            json.dumps(
                                {"problem": problem, "method": method, "seed": run["seed"], "run": run}
                            )
                        )
                        f.write("\n")
            for run in runs:
                done[(problem, method, run["seed"])] = run
            print(
                f"  {problem} / {method}: {len(runs)} seeds ({time.monotonic() - started:.0f} s)", flush=True
            )

    wanted = set(seeds)
    results: dict[str, dict[str, list[Run]]] = defaultdict(dict)
    for problem in args.problems:
        for method in methods:
            results[problem][method] = [
                Run.from_json(done[(problem, method, s)])
                for s in seeds
                if (problem, method, s) in done and s in wanted
            ]
    max_epochs = {p: PROBLEMS[p].max_epochs for p in args.problems}
    lines = [
        f"Regret of the incumbent (best value observed at the full budget R) after 5/10/20 R epochs trained "
        f"(R = 27 epochs; 25 on digits_replay); {args.seeds} seeds unless the seeds column says fewer; "
        f"p: one-sided Mann-Whitney U, lower than random search; 'none': no full-budget evaluation yet.",
        "",
        *table(results, max_epochs, checkpoints, LABELS),
        "",
        *goal_lines(results, max_epochs, checkpoints, LABELS, "hpo-continuation", "digits_replay"),
    ]
    if skipped:
        lines += ["", *skipped]
    lines += ["", f"Command: {' '.join(['benchmarks/bohb_compare.py', *(argv or sys.argv[1:])])}"]
    lines += [f"({time.monotonic() - started:.0f} s)"]
    text = "\n".join(lines).replace("5/10/20 R", "/".join(f"{c:g}" for c in checkpoints) + " R")
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
