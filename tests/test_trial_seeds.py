"""Per-trial sampler seeds (hpo.samplers.trial_seed): studies seeded s and s + 1 are independent,
the same seed gives the same trials, for every sampler, through ``hpo worker`` as a user runs it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import run_cli
from studyfiles import quadratic_study

from hpo.samplers import trial_seed


def test_trial_seeds_are_deterministic_and_neighbouring_study_seeds_share_none() -> None:
    assert trial_seed(7, 3) == trial_seed(7, 3)
    for seed in (0, 1, 7, 41, -3, 2**40):
        mine = {trial_seed(seed, n) for n in range(500)}
        neighbour = {trial_seed(seed + 1, n) for n in range(500)}
        assert len(mine) == 500 and not mine & neighbour, seed
        # what seed + number did: seed s + 1's trial n was seed s's trial n + 1
        assert trial_seed(seed + 1, 0) != trial_seed(seed, 1)
    assert all(0 <= trial_seed(s, n) < 2**32 for s in (-1, 0, 2**63) for n in (0, 9))
    with pytest.raises(ValueError):
        trial_seed(0, -1)


def _run_study(tmp_path: Path, storage: str, name: str, sampler: str, seed: int) -> list[dict[str, float]]:
    path = quadratic_study(tmp_path, name=name, sampler=sampler, n_trials=5, epochs=1)
    path.write_text(path.read_text().replace("seed: 7", f"seed: {seed}"))
    result = run_cli(["worker", str(path), "--storage", storage, "--checkpoint-dir", str(tmp_path / "ck")])
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 5
    return [dict(t.params) for t in sorted(trials, key=lambda t: t.number)]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "tpe"])  # tpe: its 5 trials are start-up trials
def test_studies_seeded_s_and_s_plus_1_share_no_trial_and_equal_seeds_repeat(
    tmp_path: Path, sampler: str
) -> None:
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    first = _run_study(tmp_path, storage, "s7", sampler, 7)
    again = _run_study(tmp_path, storage, "s7-again", sampler, 7)
    neighbour = _run_study(tmp_path, storage, "s8", sampler, 8)
    assert again == first  # same seed, same trials
    values = {value for params in first for value in params.values()}
    assert not values & {value for params in neighbour for value in params.values()}
