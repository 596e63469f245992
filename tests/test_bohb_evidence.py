"""BOHB's evidence (every epoch vs the paper's one result per evaluation) and its constant liar
(other workers' running trials count against proposals like them)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import optuna
import pytest
import yaml
from hpo_bohb_objectives import branin
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo.bohb import SLOT_ATTR, BOHBSampler, budget_epochs, trial_budget
from hpo.bohb._configspace import ConfigSpaceCodec
from hpo.bohb._kde import KdeModel, KdeOptions, Observation
from hpo.bohb._trials import planned_observations
from hpo.errors import SpecError
from hpo.samplers import make_sampler
from hpo.space import parse_space, suggest
from hpo.spec import parse_study

SPACE = parse_space(
    {"x": {"type": "float", "low": -5, "high": 10}, "y": {"type": "float", "low": 0, "high": 15}}, "branin"
)
DISTRIBUTIONS: dict[str, BaseDistribution] = {"x": FloatDistribution(-5, 10), "y": FloatDistribution(0, 15)}
BUDGETS = (1.0, 3.0, 9.0)


def past_trial(
    study: optuna.Study,
    state: TrialState,
    budget: float,
    config: tuple[int, int, int],
    steps: dict[int, float],
    value: float | None = None,
) -> int:
    """A finished trial of BOHB's plan, as a worker leaves it in the storage; its number."""
    x, y = 1.0 + len(study.trials), 2.0
    trial = create_trial(
        state=state,
        value=value,
        params={"x": x, "y": y},
        distributions=DISTRIBUTIONS,
        intermediate_values=steps,
        system_attrs={
            SLOT_ATTR: {"bracket": config[0], "stage": 0, "slot": len(study.trials), "config": list(config)}
            | {"budget": budget, "promoted": False}
        },
    )
    study.add_trial(trial)
    return study.trials[-1].number


def test_every_epoch_and_paper_evidence_of_finished_trials() -> None:
    """Each reported epoch is an observation at the budget it corresponds to; the paper's rule keeps
    one result per evaluation, a pruned or failed one a crash."""
    study = optuna.create_study()
    done = past_trial(study, TrialState.COMPLETE, 1.0, (0, 0, 0), {1: 5.0}, value=5.0)
    pruned = past_trial(study, TrialState.PRUNED, 9.0, (3, 0, 0), {1: 7.0, 2: 6.0, 3: 4.0, 4: 3.0})
    promoted = past_trial(study, TrialState.COMPLETE, 3.0, (0, 0, 0), {1: 5.5, 2: 3.0, 3: 2.5}, value=2.0)
    failed = past_trial(study, TrialState.FAIL, 3.0, (1, 0, 1), {1: 8.0})
    late = past_trial(study, TrialState.PRUNED, 3.0, (1, 0, 2), {1: 9.0, 3: 1.5})
    codec = ConfigSpaceCodec(SPACE)
    trials = study.get_trials(deepcopy=False)

    def summary(evidence: Any, sign: float = 1.0) -> list[tuple[int, float, float]]:
        observations = planned_observations(trials, codec, sign, BUDGETS, evidence)
        return [(o.key, o.budget, o.loss) for o in observations]

    inf = math.inf
    assert summary("paper") == [
        (done, 1, 5),
        (pruned, 9, inf),
        (promoted, 3, 2),
        (failed, 3, inf),
        (late, 3, inf),
    ]
    assert summary("every_epoch") == [
        (done, 1, 5),
        (pruned, 1, 7),  # the pruned trial's epochs 1 and 3 are evidence at budgets 1 and 3
        (pruned, 3, 4),
        (pruned, 9, inf),  # it never reached epoch 9: a crash at its own budget, as in the paper
        # config (0, 0, 0) was observed at budget 1 already: its retrained epoch 1 is not counted twice
        (promoted, 3, 2),  # its result, not its last epoch's value
        (failed, 1, 8),
        (failed, 3, inf),
        (late, 1, 9),
        (late, 3, 1.5),  # pruned after its budget's last epoch: that epoch's value
    ]
    assert summary("every_epoch", sign=-1.0)[:2] == [(done, 1, -5), (pruned, 1, -7)]  # maximizing


def run_study(
    sampler: BOHBSampler, n_trials: int, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.Study:
    """Multi-fidelity Branin (fidelity epoch / 9), one value reported per epoch."""
    study = optuna.create_study(sampler=sampler, pruner=pruner)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, SPACE)
        value = math.inf
        for epoch in range(1, budget_epochs(trial_budget(trial) or 9) + 1):
            value = branin(params["x"], params["y"], epoch / 9)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=n_trials)
    return study


def test_every_epoch_observations_reach_the_models_pruned_trials_included() -> None:
    """After a short study with pruned trials, the model holds their epochs (and the promoted and
    larger-budget trials' lower-budget epochs) at the budgets they correspond to."""
    held: dict[str, dict[float, int]] = {}
    for evidence in ("every_epoch", "paper"):
        sampler = BOHBSampler(SPACE, min_budget=1, max_budget=9, eta=3, seed=0, evidence=evidence)
        pruner = optuna.pruners.ThresholdPruner(upper=60.0, n_warmup_steps=1)
        study = run_study(sampler, 40, pruner)
        trials = study.get_trials(deepcopy=False)
        assert Counter(t.state for t in trials)[TrialState.PRUNED] >= 2
        observations = sampler.observations(study)
        model = KdeModel(ConfigSpaceCodec(SPACE), KdeOptions())
        model.feed(observations)
        held[evidence] = model.observations_by_budget
        by_number = {t.number: t for t in trials}
        if evidence == "paper":
            assert len(observations) == len(trials)
            assert all(
                math.isinf(o.loss) == (by_number[o.key].state != TrialState.COMPLETE) for o in observations
            )
            continue
        below = [o for o in observations if o.budget < trial_budget(by_number[o.key])]  # type: ignore[operator]
        for obs in below:  # each one the trial's own value at that budget's last epoch
            assert obs.loss == by_number[obs.key].intermediate_values[budget_epochs(obs.budget)]
        from_pruned = [o for o in below if by_number[o.key].state == TrialState.PRUNED]
        assert from_pruned and all(math.isfinite(o.loss) for o in from_pruned)
        assert len({(o.key, o.budget) for o in observations}) == len(observations)
    # hpbandster drops observations below its largest model's budget; more still reach the lower ones
    assert held["every_epoch"][1.0] > held["paper"][1.0]
    assert held["every_epoch"][3.0] > held["paper"][3.0]


def branin_params(sampler: BOHBSampler, n_trials: int) -> list[tuple[float, float]]:
    return [(float(t.params["x"]), float(t.params["y"])) for t in run_study(sampler, n_trials).trials]


def test_one_worker_runs_are_the_same_with_or_without_the_liar() -> None:
    """Sequentially no other trial is ever running: the liar changes nothing."""
    runs = {
        liar: branin_params(BOHBSampler(SPACE, min_budget=1, max_budget=9, seed=2, constant_liar=liar), 30)
        for liar in (True, False)
    }
    assert runs[True] == runs[False]


def simultaneous_proposals(constant_liar: bool, workers: int = 6) -> list[tuple[float, float]]:
    """``workers`` samplers with the same seed each ask a trial of one study before any is told."""

    def sampler(seed: int) -> BOHBSampler:
        # random_fraction 0: every proposal is the model's; one stage at budget 9: all new configurations
        return BOHBSampler(
            SPACE, min_budget=9, max_budget=9, seed=seed, random_fraction=0.0, constant_liar=constant_liar
        )

    study = optuna.create_study(sampler=sampler(0))
    # 30 finished trials: a model to propose from
    study.optimize(lambda trial: branin(*suggest(trial, SPACE).values()), n_trials=30)
    proposals = []
    for _ in range(workers):
        study.sampler = sampler(7)
        params: dict[str, Any] = suggest(study.ask(), SPACE)  # left running: trials in flight
        proposals.append((float(params["x"]), float(params["y"])))
    return proposals


def test_simultaneous_proposals_differ_with_the_liar_and_repeat_without() -> None:
    without = simultaneous_proposals(constant_liar=False)
    assert len(set(without)) == 1  # same seed, same model: the same configuration six times
    with_liar = simultaneous_proposals(constant_liar=True)
    assert with_liar[0] == without[0]  # nothing was running yet
    assert len(set(with_liar)) >= 3, with_liar


def test_the_liar_changes_only_the_bad_density_and_only_for_one_proposal() -> None:
    codec = ConfigSpaceCodec(SPACE)
    model = KdeModel(codec, KdeOptions(random_fraction=0.0))
    observations = []
    for number in range(25):
        x, y = -5 + 15 * ((number * 7) % 25) / 25, 15 * ((number * 11) % 25) / 25
        observations.append(Observation(number, (("x", x), ("y", y)), 9.0, branin(x, y)))
    model.feed(observations)
    first, _ = model.propose(9.0, seed=3)
    lied, _ = model.propose(9.0, seed=3, pending=[first])
    assert lied != first
    assert model.propose(9.0, seed=3) == (first, True)  # the lie is gone again
    empty = KdeModel(ConfigSpaceCodec(SPACE), KdeOptions(random_fraction=0.0))
    assert empty.propose(9.0, seed=3, pending=[first]) == empty.propose(9.0, seed=3)  # no model: the prior


STUDY = """
name: bohb_options
objective: hpo_bohb_objectives:branin_epochs
search_space:
  x: {type: float, low: -5, high: 10}
  y: {type: float, low: 0, high: 15}
metric: loss
direction: minimize
n_trials: 20
budget: {max_epochs: 9, min_epochs: 1}
"""


def test_study_file_options_and_their_defaults() -> None:
    def sampler(options: str) -> Any:
        data = yaml.safe_load(STUDY) | {"sampler": yaml.safe_load(f"{{name: bohb, options: {options}}}")}
        return make_sampler(parse_study(data, "study.yaml"))

    default = sampler("{}")
    assert (default.evidence, default.constant_liar) == ("every_epoch", True)
    paper = sampler("{evidence: paper, constant_liar: false}")
    assert (paper.evidence, paper.constant_liar) == ("paper", False)
    for options, message in (
        ("{evidence: epochs}", "evidence must be one of every_epoch, paper, got 'epochs'"),
        ("{constant_liar: 1}", "constant_liar must be true or false, got 1"),
    ):
        with pytest.raises(SpecError) as caught:
            sampler(options)
        assert caught.value.field == "sampler.options" and message in str(caught.value)
        assert "\n" not in str(caught.value)
