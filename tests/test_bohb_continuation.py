"""BOHB continuation (issue 13): a promoted configuration resumes its parent's checkpoint instead of
retraining from epoch 0, its curve continues the parent's, it ends where an uninterrupted run ends,
and no checkpoint is left behind once the bracket no longer needs it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import run_cli
from optuna.trial import FrozenTrial, TrialState

from hpo import training
from hpo._continuation import (
    CHECKPOINT_FILE,
    CONTINUE_FROM_ATTR,
    KEEP_CHECKPOINT_ATTR,
    release_checkpoints,
    take_over_parent_checkpoint,
)
from hpo.bohb import SLOT_ATTR, BOHBSampler
from hpo.bohb._continuation import continuation_attrs, unpromoted_kept
from hpo.bohb._schedule import Assignment, SlotRun
from hpo.compare._results import _epochs as compare_epochs
from hpo.space import parse_space

STUDY = """name: {name}
objective: digits_mlp
data: {{val_fraction: 0.2}}
settings: {{hidden_units: 32, hidden_layers: 1, scheduler: step, step_size: 2, gamma: 0.5}}
search_space:
  lr: {{type: float, low: 0.001, high: 0.2, log: true}}
  weight_decay: {{type: float, low: 0.00001, high: 0.01, log: true}}
metric: val_loss
direction: minimize
n_trials: 4
budget: {{max_epochs: 3}}
seed: 5
sampler: {{name: bohb, seed: 11, options: {{eta: 3, continuation: {continuation}}}}}
"""


def test_the_checkpoint_file_name_is_trainings() -> None:
    assert CHECKPOINT_FILE == training.CHECKPOINT_FILE  # not imported there, to keep torch out


def _run(n: int, bracket: int, stage: int, slot: int, config: tuple[int, int, int], loss: float) -> SlotRun:
    return SlotRun(
        number=n, bracket=bracket, stage=stage, slot=slot, config=config, finished=True, loss=loss, attempt=0
    )


def test_a_promoted_slot_names_its_parent_and_lower_budgets_keep_their_checkpoints() -> None:
    runs = [
        _run(0, 0, 0, 0, (0, 0, 0), 1.0),
        _run(1, 0, 0, 1, (0, 0, 1), 0.5),
        _run(2, 0, 0, 2, (0, 0, 2), 2.0),
    ]
    promoted = Assignment(bracket=0, stage=1, slot=0, config=(0, 0, 1), budget=3.0, promoted=True)
    assert continuation_attrs(promoted, runs, max_budget=3.0) == {CONTINUE_FROM_ATTR: 1}
    first = Assignment(bracket=0, stage=0, slot=0, config=(0, 0, 0), budget=1.0, promoted=False)
    assert continuation_attrs(first, [], max_budget=3.0) == {KEEP_CHECKPOINT_ATTR: True}
    # A retry of the parent's slot (a higher number, same slot) is the one continued.
    retried = [*runs, _run(7, 0, 0, 1, (0, 0, 1), 0.4)]
    assert continuation_attrs(promoted, retried, max_budget=3.0) == {CONTINUE_FROM_ATTR: 7}


def test_only_decided_and_unpromoted_trials_are_released(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    for _ in range(3):
        trial = study.ask()
        trial.storage.set_trial_system_attr(trial._trial_id, KEEP_CHECKPOINT_ATTR, True)
        study.tell(trial, 1.0)
    trials = study.get_trials()
    runs = [_run(t.number, 0, 0, t.number, (0, 0, t.number), 1.0) for t in trials]
    assert unpromoted_kept(trials, runs, {}) == []  # undecided: every checkpoint may still be needed
    released = unpromoted_kept(trials, runs, {(0, 1): ((0, 0, 1),)})
    assert sorted(t.number for t in released) == [0, 2]


def _trial(
    study: optuna.Study, attrs: dict[str, object], state: TrialState = TrialState.COMPLETE
) -> FrozenTrial:
    trial = study.ask()
    for key, value in attrs.items():
        trial.storage.set_trial_system_attr(trial._trial_id, key, value)
    if state == TrialState.COMPLETE:
        study.tell(trial, 1.0)
    elif state != TrialState.RUNNING:
        study.tell(trial, state=state)
    return study._storage.get_trial(trial._trial_id)


def _checkpoint(folder: Path, content: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CHECKPOINT_FILE).write_bytes(content)


def test_a_child_takes_over_its_parents_checkpoint_once(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    root = tmp_path / "ckpt"
    parent = _trial(study, {KEEP_CHECKPOINT_ATTR: True})
    _checkpoint(root / f"trial-{parent.number}", b"parent at epoch 1")
    child = _trial(study, {CONTINUE_FROM_ATTR: parent.number}, TrialState.RUNNING)
    (root / f"trial-{child.number}").mkdir()  # an attempt that died before its first epoch
    storage, sid = study._storage, study._study_id

    assert take_over_parent_checkpoint(storage, sid, root, child.number, child.system_attrs) == parent.number
    assert (root / f"trial-{child.number}" / CHECKPOINT_FILE).read_bytes() == b"parent at epoch 1"
    assert not (root / f"trial-{parent.number}").exists()
    assert [p.name for p in root.iterdir()] == [f"trial-{child.number}"]  # no staging folder left

    # The child's own progress is never replaced by a second take-over (a retry resumes its own).
    _checkpoint(root / f"trial-{child.number}", b"child at epoch 2")
    assert take_over_parent_checkpoint(storage, sid, root, child.number, child.system_attrs) is None
    assert (root / f"trial-{child.number}" / CHECKPOINT_FILE).read_bytes() == b"child at epoch 2"


def test_a_child_whose_parent_left_no_checkpoint_trains_from_scratch(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    parent = _trial(study, {KEEP_CHECKPOINT_ATTR: True})
    child = _trial(study, {CONTINUE_FROM_ATTR: parent.number}, TrialState.RUNNING)
    root = tmp_path / "ckpt"
    assert (
        take_over_parent_checkpoint(study._storage, study._study_id, root, child.number, child.system_attrs)
        is None
    )
    assert not root.exists()


def test_a_folder_shared_by_a_retry_goes_only_with_its_latest_attempt(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    root = tmp_path / "ckpt"
    first = _trial(study, {KEEP_CHECKPOINT_ATTR: True}, TrialState.FAIL)
    retry = _trial(study, {KEEP_CHECKPOINT_ATTR: True, "failed_trial": first.number}, TrialState.RUNNING)
    _checkpoint(root / f"trial-{first.number}", b"shared")
    # The failed attempt is released, but its retry (still running) trains in that folder.
    assert release_checkpoints(root, study.get_trials(), {first.number}) == 0
    study.tell(retry.number, 1.0)
    assert release_checkpoints(root, study.get_trials(), {first.number}) == 0  # the retry is not released
    assert release_checkpoints(root, study.get_trials(), {retry.number}) == 1
    assert not (root / f"trial-{first.number}").exists()


def test_continuation_is_a_checked_option() -> None:
    space = parse_space({"x": {"type": "float", "low": 0, "high": 1}}, "test")
    with pytest.raises(ValueError, match="continuation must be true or false"):
        BOHBSampler(space, min_budget=1, max_budget=3, continuation="yes")  # type: ignore[arg-type]


def _promoted(study: optuna.Study) -> FrozenTrial:
    (trial,) = [t for t in study.trials if t.system_attrs[SLOT_ATTR]["promoted"]]
    return trial


def test_a_promoted_trial_continues_its_parents_curve_through_the_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    checkpoints = tmp_path / "ckpt"
    studies, outputs = {}, {}
    for name, continuation in (("continued", "true"), ("retrained", "false")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(STUDY.format(name=name, continuation=continuation))
        result = run_cli(
            ["worker", str(path), "--storage", url, "--no-progress", "--checkpoint-dir", str(checkpoints)]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[name] = result.stdout
        studies[name] = optuna.load_study(study_name=name, storage=url)
        assert [t.state for t in studies[name].trials] == [TrialState.COMPLETE] * 4, result.stdout

    continued, retrained = _promoted(studies["continued"]), _promoted(studies["retrained"])
    parent = studies["continued"].trials[continued.system_attrs[CONTINUE_FROM_ATTR]]
    assert parent.params == continued.params
    assert f"trial {continued.number} continues trial {parent.number}'s checkpoint" in outputs["continued"]
    assert "continues trial" not in outputs["retrained"]
    # The same seeds pick the same configurations; only how the promoted one trains differs.
    assert continued.params == retrained.params
    assert CONTINUE_FROM_ATTR not in retrained.system_attrs
    # The curve goes on from the parent's epoch 1 (re-recorded, not retrained) ...
    assert continued.user_attrs["resumed_from_epoch"] == 1
    assert continued.intermediate_values[1] == parent.intermediate_values[1]
    # ... and ends where training the configuration from scratch for 3 epochs ends.
    assert sorted(continued.intermediate_values) == [1, 2, 3]
    for epoch, value in retrained.intermediate_values.items():
        assert continued.intermediate_values[epoch] == pytest.approx(value, rel=1e-5)
    assert continued.value == pytest.approx(retrained.value, rel=1e-5)

    def epochs_trained(study: optuna.Study) -> int:  # as `hpo compare` counts a run's budget
        return sum(compare_epochs(t) for t in study.trials)

    assert (epochs_trained(studies["continued"]), epochs_trained(studies["retrained"])) == (5, 6)
    # Nothing is left on disk once the bracket is done: released, taken over or finished.
    assert list(checkpoints.rglob(CHECKPOINT_FILE)) == []


def test_a_bad_continuation_in_a_study_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(STUDY.format(name="bad", continuation='"yes"'))
    result = run_cli(["create-study", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "sampler.options" in line and "continuation must be true or false" in line, line
