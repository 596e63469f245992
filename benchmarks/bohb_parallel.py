"""BOHB with simulated parallel workers: the constant liar against no liar, in the same run.

``W`` simulated workers share one BOHB study (multi-fidelity Branin, fidelity ``epoch / 27``, budgets
1 to 27 epochs, eta 3). Time is simulated: a trial of ``e`` epochs occupies its worker for ``e``
time units; a worker that becomes free asks the study for its next trial at once, so while it
proposes, the other ``W - 1`` workers' trials are still running. Every trial reports its value at
each epoch (the evidence of ``every_epoch``, the default). Workers stop taking trials once the
epochs started reach the budget (default 405, one Hyperband cycle: the cost of 15 full-length
trials); the trials running then finish.

Both arms run the same seeds: BOHB with ``constant_liar: true`` (other workers' running trials
join the "bad" density of each new proposal) and ``constant_liar: false``.
The score is the regret of the best value observed at the full budget (27 epochs; value minus
Branin's minimum 0.397887). Printed per number of workers: median and interquartile range over the
seeds of each arm, the ratio of the medians (liar / no liar; below 1: the liar is ahead), and on how
many seeds the liar's regret was lower / equal / higher, and the p-value of Wilcoxon's signed-rank
test on the paired regrets. With one worker nothing else is ever
running, so the two arms must be identical: that is checked on the first 3 seeds, and only the liar
arm runs on the others (its figures stand for both).

The plan is hpbandster's endless one (``n_trials`` not given), so no simulated worker ever waits
for a slot: a worker that finds every open bracket waiting opens a new one, as hpbandster does.

``--compare evidence`` runs the other pair of arms the same way: ``evidence: every_epoch`` against
``evidence: paper`` (the constant liar on in both).

Run:  .venv/bin/python benchmarks/bohb_parallel.py              (20 seeds, 2 processes: 2.7 CPU-minutes,
                                                               8 minutes measured on 2 busy cores)
      .venv/bin/python benchmarks/bohb_parallel.py --seeds 100  (11.7 CPU-minutes)
      .venv/bin/python benchmarks/bohb_parallel.py --compare evidence --workers 1 4
"""

from __future__ import annotations

import argparse
import heapq
import logging
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from hpo_bohb_objectives import BRANIN_MINIMUM, branin

from hpo.bohb import MODEL_PICK_ATTR, BOHBSampler, budget_epochs, trial_budget
from hpo.space import parse_space, suggest

SPACE = parse_space(
    {"x": {"type": "float", "low": -5, "high": 10}, "y": {"type": "float", "low": 0, "high": 15}}, "branin"
)
MAX_EPOCHS = 27
# Seeds are spread apart (a prime stride) so the runs share no random stream.
SEED_STRIDE = 1_000_003
# With one worker, on how many seeds both arms run (they must be identical trial for trial).
IDENTITY_CHECKS = 3


# --compare: the option both arms set, the first arm's value and the second's (the baseline).
ARMS: dict[str, tuple[str, Any, Any]] = {
    "liar": ("constant_liar", True, False),
    "evidence": ("evidence", "every_epoch", "paper"),
}


Result = tuple[float, list[tuple[float, float]], list[float]]


def run(workers: int, seed: int, options: dict[str, Any], budget: int) -> Result:
    """One simulated run: the regret of the best full-budget value, every trial's parameters, and
    for each configuration the model proposed while other trials ran, its distance to the nearest
    running configuration (in the unit square of the search space)."""
    sampler = BOHBSampler(SPACE, min_budget=1, max_budget=MAX_EPOCHS, eta=3, seed=seed, **options)
    study = optuna.create_study(sampler=sampler)
    running: list[tuple[int, int, optuna.Trial, float, float, int]] = []  # (end, number, trial, ...)
    started, now, best = 0, 0, math.inf
    spread: list[float] = []

    def start() -> None:
        nonlocal started
        trial = study.ask()
        params: dict[str, Any] = suggest(trial, SPACE)
        epochs = budget_epochs(trial_budget(trial) or MAX_EPOCHS)
        started += epochs
        attrs = study._storage.get_trial_system_attrs(trial._trial_id)
        if attrs.get(MODEL_PICK_ATTR) is True and running:
            spread.append(
                min(math.hypot((params["x"] - r[3]) / 15, (params["y"] - r[4]) / 15) for r in running)
            )
        heapq.heappush(
            running, (now + epochs, trial.number, trial, float(params["x"]), float(params["y"]), epochs)
        )

    for _ in range(workers):
        start()
    while running:
        now, _, trial, x, y, epochs = heapq.heappop(running)
        for epoch in range(1, epochs + 1):
            trial.report(branin(x, y, epoch / MAX_EPOCHS), epoch)
        value = branin(x, y, epochs / MAX_EPOCHS)
        study.tell(trial, value)
        if epochs == MAX_EPOCHS:
            best = min(best, value)
        if started < budget:
            start()
    params = [(t.params["x"], t.params["y"]) for t in study.get_trials(deepcopy=False)]
    return best - BRANIN_MINIMUM, params, spread


Job = tuple[int, int, bool, int, str]  # workers, seed, first arm?, budget, --compare


def _job(args: Job) -> tuple[tuple[int, int, bool], Result]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("hpo.bohb").setLevel(logging.ERROR)
    workers, seed, first, budget, compare = args
    option, one, other = ARMS[compare]
    return (workers, seed, first), run(workers, seed, {option: one if first else other}, budget)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def _signed_rank(first: list[float], second: list[float]) -> str:
    """Wilcoxon's signed-rank test of the paired regrets (two-sided; seeds with equal regret left out)."""
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a != b and math.isfinite(a - b)]
    if len(pairs) < 6:
        return "(too few differing seeds for a rank test)"
    from scipy.stats import wilcoxon

    result = wilcoxon([a for a, _ in pairs], [b for _, b in pairs])
    return f"Wilcoxon p={float(result.pvalue):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--budget", type=int, default=405, help="epochs per run (405: one Hyperband cycle)")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument(
        "--compare",
        choices=sorted(ARMS),
        default="liar",
        help="liar: constant_liar true vs false (default); evidence: every_epoch vs paper",
    )
    args = parser.parse_args()
    seeds = [SEED_STRIDE * i for i in range(args.seeds)]
    liar = args.compare == "liar"
    # With one worker the liar's arms are identical (checked on the first seeds): one arm runs there.
    jobs: list[Job] = [
        (w, s, first, args.budget, args.compare)
        for w in args.workers
        for i, s in enumerate(seeds)
        for first in (True, False)
        if not liar or w > 1 or first or i < IDENTITY_CHECKS
    ]
    started = time.monotonic()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_job, jobs, chunksize=4))
    else:
        results = [_job(job) for job in jobs]
    regret = {key: result[0] for key, result in results}
    params = {key: result[1] for key, result in results}
    spread = {key: result[2] for key, result in results}
    print(
        f"multi-fidelity Branin, budgets 1-{MAX_EPOCHS} epochs, eta 3, {args.budget} epochs per run, "
        f"{args.seeds} seeds; regret of the best full-budget value (median [IQR])"
    )
    _, one, other = ARMS[args.compare]
    a, b = ("liar", "no liar") if liar else (str(one), str(other))
    print(f"{'workers':>7}  {a:>22}  {b:>22}  {a + '/' + b:>12}  {a} lower/equal/higher")
    for w in args.workers:
        on = [regret[(w, s, True)] for s in seeds]
        if w == 1 and liar:
            checked = seeds[:IDENTITY_CHECKS]
            same = all(params[(1, s, True)] == params[(1, s, False)] for s in checked)
            assert same, "with one worker the liar must change nothing"
            print(
                f"  (one worker: liar and no liar identical trial for trial on {len(checked)} seeds checked)"
            )
        off = [regret.get((w, s, False), regret[(w, s, True)]) for s in seeds]
        m_on, lo_on, hi_on = _quartiles(on)
        m_off, lo_off, hi_off = _quartiles(off)
        lower = sum(a < b for a, b in zip(on, off, strict=True))
        equal = sum(a == b for a, b in zip(on, off, strict=True))
        print(
            f"{w:>7}  {m_on:6.3f} [{lo_on:6.3f}-{hi_on:6.3f}]  {m_off:6.3f} [{lo_off:6.3f}-{hi_off:6.3f}]  "
            f"{m_on / m_off:12.2f}  {lower}/{equal}/{len(seeds) - lower - equal}  {_signed_rank(on, off)}"
        )
        if w > 1:
            near = [
                statistics.median(d for s in seeds for d in spread.get((w, s, arm), []))
                for arm in (True, False)
            ]
            print(
                f"{'':>7}  distance of a model proposal to the nearest running configuration, median: "
                f"{near[0]:.3f} ({a}) vs {near[1]:.3f} ({b})"
            )
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
