"""benchmarks/bohb_compare.py: the table's structure, and the cost accounting in epochs trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from _bohb_methods import run_hpo, run_random, run_tpe_hyperband  # noqa: E402
from _bohb_problems import PROBLEMS  # noqa: E402


def test_table_from_one_command(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    command = [sys.executable, str(BENCH / "bohb_compare.py"), "--seeds", "2", "--problems", "branin"]
    command += ["--methods", "hpo-continuation", "hpo-paper", "random", "hpbandster"]
    command += ["--budget", "6", "--checkpoints", "3", "6", "--venv-dir", str(tmp_path), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert f"hpbandster 0.7.4 BOHB skipped: {tmp_path}/venv-hpbandster/bin/python missing" in text
    rows = [line for line in text.splitlines() if line.startswith("| branin |")]
    assert [row.split(" | ")[1] for row in rows] == [
        "hpo BOHB, continuation + every_epoch",
        "hpo BOHB, paper (retrain, evidence=paper)",
        "random search (full budget)",
    ]
    header = next(line for line in text.splitlines() if line.startswith("| problem |"))
    assert "regret at 3R: median [IQR]" in header and "p vs random at 6R" in header
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert len(cells) == header.count("|") - 1 and cells[2].strip() == "2"
    # random search trains 6 full-budget trials in 6R: 6 evaluations, a finite regret at 3R
    random_row = rows[2].split(" | ")
    assert random_row[3] == "6" and not random_row[4].startswith("none")
    assert "Goal 1:" in text and "- branin: target" in text


def test_continuation_pays_only_added_epochs_for_the_same_proposals() -> None:
    branin = PROBLEMS["branin"]
    # evidence=paper in both: continuation changes only what is trained, so proposals are identical
    kwargs = {"evidence": "paper", "evaluations": 60}
    retrain = run_hpo(branin, 1_000_003, 10**9, continuation=False, **kwargs)
    resume = run_hpo(branin, 1_000_003, 10**9, continuation=True, **kwargs)
    assert [(p, r) for p, _, r in retrain.history] == [(p, r) for p, _, r in resume.history]
    assert all(trained == reached for _, trained, reached in retrain.history)
    reached_before: dict[str, int] = {}
    promoted = 0
    for params, trained, reached in resume.history:
        key = repr(sorted(params.items()))
        assert trained == reached - reached_before.get(key, 0)  # only the epochs the promotion adds
        promoted += key in reached_before
        reached_before[key] = reached
    assert promoted >= 9  # the first bracket alone promotes 9 + 3 + 1 configurations
    assert resume.epochs < retrain.epochs
    assert retrain.epochs - resume.epochs == sum(r - t for _, t, r in resume.history)


def test_pruned_trials_pay_the_epochs_they_ran_and_random_pays_the_full_budget() -> None:
    branin = PROBLEMS["branin"]
    tpe = run_tpe_hyperband(branin, 1_000_003, 10 * 27)
    assert all(trained == reached for _, trained, reached in tpe.history)
    assert any(reached < 27 for _, _, reached in tpe.history)
    assert tpe.epochs == sum(t for _, t, _ in tpe.history) >= 10 * 27
    random = run_random(branin, 1_000_003, 5 * 27)
    assert random.epochs == 5 * 27 and random.evaluations == 5


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_problems_give_whole_curves_and_nonnegative_regret(name: str) -> None:
    import numpy as np
    from _bohb_problems import sample_random

    problem = PROBLEMS[name]
    params = sample_random(problem.space, np.random.default_rng(0))
    curve = problem.curve(params, 3)
    assert len(curve) == problem.max_epochs and curve == problem.curve(params, 3)
    assert problem.regret(params, 3) >= 0


def test_replay_problem_looks_up_what_hpo_replays() -> None:
    import numpy as np
    from _bohb_problems import REPLAY_TABLE, sample_random

    from hpo.compare._replay import load_table

    table = load_table(REPLAY_TABLE)
    problem = PROBLEMS["digits_replay"]
    rng = np.random.default_rng(1)
    for _ in range(50):
        params = sample_random(problem.space, rng)
        assert problem.curve(params, 0) == list(table.nearest(params).metrics[table.metric])
