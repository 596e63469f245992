"""Replay agrees with real training: the same configurations, the same pruning and early-stopping
decisions and the same values, for the same seeds, on the real digits objective."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, write_study

from hpo.compare._results import collect_results, load_results
from hpo.storage import open_storage

# (15 epochs: with the digits curves of this seed, lr=0.03 at batch 16 then stops early at epoch 10.)
# Categorical values (every one tabulated), so that random search and TPE ask for exactly the
# configurations the table holds and the replay needs no nearest-neighbour approximation.
AGREE = """
name: agree
objective: digits_mlp
data: {val_fraction: 0.3, subset: 0.2}
settings: {hidden_units: 16, hidden_layers: 1, optimizer: adam, scheduler: none}
search_space:
  lr: {type: categorical, choices: [0.01, 0.03, 0.1]}
  batch_size: {type: categorical, choices: [16, 64]}
metric: val_loss
direction: minimize
n_trials: 6
budget: {max_epochs: 15}
early_stopping: {rule: consecutive_worse}
sampler: {name: tpe, options: {n_startup_trials: 2}}
pruner: {name: median, options: {n_startup_trials: 2, n_warmup_steps: 1}}
"""


@pytest.mark.slow
@pytest.mark.postgres
def test_replay_makes_the_same_trials_and_pruning_decisions_as_training(
    tmp_path: Path, postgres_url: str
) -> None:
    study = write_study(tmp_path, AGREE)
    checkpoints = ["--checkpoint-dir", str(tmp_path / "ck"), "--device", "cpu"]
    table = tmp_path / "agree.json"
    tabulated = run_cli(
        [
            "tabulate",
            str(study),
            "--storage",
            f"sqlite:///{tmp_path / 't.db'}",
            "-o",
            str(table),
            *checkpoints,
        ]
    )
    assert tabulated.returncode == 0, tabulated.stderr
    comparison = ["--samplers", "grid,random,tpe", "--seeds", "2"]
    real = run_cli(
        ["compare", str(study), *comparison, "--storage", postgres_url, "--no-report", *checkpoints]
    )
    assert real.returncode == 0, real.stderr
    replay = run_cli(
        ["compare", str(study), *comparison, "--replay", str(table), "-o", str(tmp_path / "r"), "--no-png"]
    )
    assert replay.returncode == 0, replay.stderr

    trained = collect_results(open_storage(postgres_url), "agree")
    replayed = load_results(tmp_path / "r" / "results.json")
    assert len(trained.runs) == len(replayed.runs) == 6
    pruned = stopped_early = 0
    for real_run, replay_run in zip(trained.runs, replayed.runs, strict=True):
        assert (real_run.sampler, real_run.seed) == (replay_run.sampler, replay_run.seed)
        assert len(real_run.trials) == len(replay_run.trials) == 6
        for a, b in zip(real_run.trials, replay_run.trials, strict=True):
            where = f"{real_run.study_name} trial {a.number}"
            assert dict(a.params) == dict(b.params), where
            assert (a.state, a.epochs) == (b.state, b.epochs), where
            if a.state == "COMPLETE":
                assert b.value == pytest.approx(a.value, rel=1e-5), where
            pruned += a.state == "PRUNED"
            stopped_early += a.state == "COMPLETE" and a.epochs < 15
    # the agreement covers both kinds of decision
    assert pruned > 0 and stopped_early > 0, (pruned, stopped_early)
