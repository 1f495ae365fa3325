"""The search logic of synermix.tuning without training: the tune params' checks, the study
storage, the per-class cap, study names, the trial budget and the re-runs of the top trials, on
real Optuna studies (SQLite). The tune stage itself: tests/stages/test_tune.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from synermix.config import parse_params
from synermix.engine import TrainingDiverged
from synermix.errors import UserError
from synermix.tuning import (
    ATTR_FAIL_REASON,
    ATTR_SURPLUS,
    BASELINE,
    RERUN_PREFIX,
    BudgetState,
    best_candidate,
    cap_train_rows,
    choose,
    counted_trials,
    is_counted,
    margin_over_baseline,
    open_storage,
    rerun_seeds,
    rerun_top,
    seed_spread,
    study_name,
    trial_base,
)

# marked integration as it was (module-wide) before the tests were split by module, so
# `make test-unit` runs the same tests as before
pytestmark = pytest.mark.integration


# -- params ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"beta": {"low": -0.1, "high": 1.0}}, "beta range \\[-0.1, 1\\] leaves \\[0, 1\\]"),
        ({"beta": {"low": 0.0, "high": 1.5}}, "beta range \\[0, 1.5\\] leaves \\[0, 1\\]"),
        ({}, "tune.space = {}: empty search space"),
        ({"beta": None}, "empty search space: beta is always searched"),
        ({"beta": {"low": 0.4, "high": 0.4}}, "tune.space.beta = .*low \\(0.4\\) must be < high"),
        ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log-scale range needs low > 0"),
        ({"weight_decay": {"low": 0.0, "high": 3.0}}, "train.weight_decay: input should be less than"),
        ({"inter_method": []}, "give at least one of mixup, manifold_mixup"),
        ({"inter_method": ["cutmix"]}, "tune.space.inter_method.0 = cutmix"),
        ({"bta": {"low": 0, "high": 1}}, "unknown key 'tune.space.bta': did you mean 'beta'"),
    ],
)
def test_bad_search_space_is_refused_with_one_clear_line(space, message):
    with pytest.raises(UserError, match=message) as caught:
        parse_params({"tune": {"space": space}})
    assert str(caught.value).startswith("params.yaml: ") and len(str(caught.value).splitlines()) == 1


def test_tuning_needs_a_method_that_uses_beta_and_trials_past_warmup():
    with pytest.raises(UserError, match=r"train.method 'mixup' does not use"):
        parse_params({"train": {"method": "mixup"}})
    parse_params({"train": {"method": "mixup"}, "tune": {"enabled": False}})
    with pytest.raises(UserError, match=r"tune.epochs \(1\) is shorter than train.warmup_epochs \(2\)"):
        parse_params({"tune": {"epochs": 1}, "train": {"warmup_epochs": 2}})
    with pytest.raises(UserError, match=r"tune.storage = localhost/db: must be a database URL"):
        parse_params({"tune": {"storage": "localhost/db"}})


def test_bad_rerun_params_are_refused_with_one_clear_line():
    with pytest.raises(UserError, match=r"^params.yaml: tune.rerun_seeds = 0: must be at least 1") as caught:
        parse_params({"tune": {"rerun_seeds": 0}})
    assert "tune.rerun_top_k: 0 to switch re-runs off" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(UserError, match=r"tune.rerun_top_k = -1: Input should be greater than or equal to 0"):
        parse_params({"tune": {"rerun_top_k": -1}})
    assert parse_params({"tune": {"rerun_top_k": 0, "rerun_seeds": 5}}).tune.rerun_top_k == 0


def test_unreachable_storage_names_it_without_the_password():
    tune = parse_params({}).tune
    with pytest.raises(UserError) as caught:
        open_storage("postgresql://tuner:s3cret@127.0.0.1:1/study", tune)
    text = str(caught.value)
    assert "postgresql://tuner:***@127.0.0.1:1/study" in text and "s3cret" not in text
    assert "check the server is running" in text


# -- pure parts ------------------------------------------------------------------------


def _rows(counts: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"path": f"{label}/{i:03d}.png", "label": label, "sha256": f"{label}{i}"}
            for label, n in counts.items()
            for i in range(n)
        ]
    )


def test_per_class_cap_is_seeded_and_keeps_small_classes_whole():
    rows = _rows({"a": 30, "b": 5})
    capped = cap_train_rows(rows, 10, seed=1)
    assert capped["label"].value_counts().to_dict() == {"a": 10, "b": 5}
    assert capped.equals(cap_train_rows(rows.sample(frac=1, random_state=3), 10, seed=1))
    assert not capped.equals(cap_train_rows(rows, 10, seed=2))
    assert cap_train_rows(rows, None, seed=1) is rows


def test_study_name_follows_data_and_space_but_not_the_budget(tmp_path):
    params = parse_params({})
    base = trial_base(params.train, params.tune)
    train, val = _rows({"a": 4, "b": 4}), _rows({"a": 2, "b": 2})
    for path in pd.concat([train, val])["path"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(path.encode())

    def name_of(train=train, seed=1, base=base, tune=params.tune):
        return study_name(tmp_path, train, val, ["a", "b"], seed, base, tune)

    name = name_of()
    assert name.startswith("synermix-tune-")
    assert name_of(tune=parse_params({"tune": {"n_trials": 50, "timeout_minutes": 5}}).tune) == name
    # the prepared pixels changed (e.g. another data.image_size): a new study
    (tmp_path / train["path"].iloc[0]).write_bytes(b"resized")
    assert name_of() != name
    (tmp_path / train["path"].iloc[0]).write_bytes(train["path"].iloc[0].encode())
    assert name_of() == name
    assert name_of(train=train.iloc[1:]) != name
    assert name_of(tune=parse_params({"tune": {"space": {"beta": {"low": 0, "high": 0.5}}}}).tune) != name
    assert name_of(seed=2) != name
    # train.beta and train.lr are searched: their values in params.yaml do not matter
    assert name_of(base=base.model_copy(update={"beta": 0.7, "lr": 0.3})) == name
    assert name_of(base=base.model_copy(update={"momentum": 0.8})) != name


def test_budget_counts_complete_pruned_and_diverged_but_not_crashed_or_surplus():
    dist = {"beta": optuna.distributions.FloatDistribution(0, 1)}

    def trial(state, **attrs):
        value = 0.5 if state == TrialState.COMPLETE else None
        return create_trial(
            state=state, value=value, params={"beta": 0.3}, distributions=dist, user_attrs=attrs
        )

    trials = [
        trial(TrialState.COMPLETE),
        trial(TrialState.PRUNED),
        trial(TrialState.FAIL, **{ATTR_FAIL_REASON: "diverged: loss is nan"}),
        trial(TrialState.FAIL),  # a dead worker's trial, retried
        trial(TrialState.FAIL, **{ATTR_SURPLUS: True}),
        trial(TrialState.WAITING),
    ]
    for number, t in enumerate(trials):
        t.number = number
    assert [is_counted(t) for t in trials] == [True, True, True, False, False, False]
    state = BudgetState.of(trials)
    assert (state.counted, state.running, state.waiting) == (3, 0, 1)
    assert [t.number for t in counted_trials(trials, 2)] == [0, 1]


# -- re-runs of the top trials -----------------------------------------------------------


def test_rerun_seeds_are_derived_from_the_seed_and_the_rerun_index():
    seeds = rerun_seeds(123, 2)
    assert seeds == rerun_seeds(123, 2) and len(set(seeds)) == 2 and 123 not in seeds
    # more re-runs keep the first ones (their stored results stay valid); another seed, others
    assert rerun_seeds(123, 4)[:2] == seeds
    assert not set(rerun_seeds(124, 2)) & set(seeds)
    # fixed values: a change of the derivation would silently orphan stored re-runs
    assert seeds == [int(np.random.SeedSequence([123, 0x52455255, i]).generate_state(1)[0]) for i in (1, 2)]


def _injected_study(tmp_path: Path, values: list[float]) -> optuna.Study:
    """A study in SQLite holding complete trials with these values (trial n: values[n])."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    dist = {"beta": optuna.distributions.FloatDistribution(0, 1)}
    for n, value in enumerate(values):
        study.add_trial(
            create_trial(state=TrialState.COMPLETE, value=value, params={"beta": n / 10}, distributions=dist)
        )
    return study


def test_top_k_rerun_chooses_on_the_mean_not_the_single_best(tmp_path):
    # trial 0 is the single best (0.90) but a lucky seed; trial 1 is steadily good
    study = _injected_study(tmp_path, [0.90, 0.80, 0.70, 0.60, 0.85])
    tune = parse_params({"tune": {"rerun_top_k": 3, "rerun_seeds": 2}}).tune
    s1, s2 = rerun_seeds(123, 2)
    results = {
        (0, s1): 0.50, (0, s2): 0.55,  # mean 0.65
        (4, s1): 0.80, (4, s2): 0.78,  # mean 0.81
        (1, s1): 0.82, (1, s2): 0.81,  # mean 0.81: ties trial 4, the lower number wins
    }  # fmt: skip
    calls = []

    def rerun(trial, seed):
        calls.append((trial.number, seed))
        return results[(trial.number, seed)]

    counted = study.get_trials()
    candidates = rerun_top(study, counted, tune, 123, rerun)
    assert [c.number for c in candidates] == [0, 4, 1]  # the top 3 by value; 2 and 3 not re-run
    assert sorted(calls) == sorted(results)
    pick = choose(candidates)
    assert pick.number == 1 and pick.mean == pytest.approx(0.81)
    assert [r.seed for r in pick.runs] == [123, s1, s2] and pick.values == [0.80, 0.82, 0.81]
    assert candidates[0].std == pytest.approx(np.std([0.90, 0.50, 0.55], ddof=1))
    pooled = np.sqrt(sum(np.var(c.values, ddof=1) for c in candidates) / 3)  # equal dof per candidate
    assert seed_spread(candidates) == pytest.approx(pooled)
    # the single best trial would have been trial 0; with re-runs off it still is
    off = parse_params({"tune": {"rerun_top_k": 0}}).tune
    assert rerun_top(study, counted, off, 123, rerun) == []

    # a candidate whose re-run diverged ranks after every candidate without one
    (tmp_path / "b").mkdir()
    study = _injected_study(tmp_path / "b", [0.9, 0.5])

    def diverges(trial, seed):
        if trial.number == 0 and seed == s1:
            raise TrainingDiverged("loss is nan")
        return 0.95 if trial.number == 0 else 0.5

    candidates = rerun_top(study, study.get_trials(), tune, 123, diverges)
    assert candidates[0].failed == 1 and candidates[0].values == [0.9, 0.95]
    assert choose(candidates).number == 1


def test_params_yaml_values_are_kept_unless_beaten_beyond_the_seed_spread(tmp_path):
    """The baseline (params.yaml's values) is trained on the trials' seed and the re-run seeds;
    the best candidate replaces it only when its mean is more than one seed spread better."""
    study = _injected_study(tmp_path, [0.90, 0.80, 0.70])
    tune = parse_params({"tune": {"rerun_top_k": 2, "rerun_seeds": 2}}).tune
    s1, s2 = rerun_seeds(123, 2)
    noisy = {0: (0.80, 0.86), 1: (0.84, 0.78)}  # trial 0: mean 0.853, trial 1: 0.807

    def rerun(values):
        calls = []

        def run(trial, seed):
            calls.append((trial.number, seed, dict(trial.params)))
            if trial.number == BASELINE:
                return values[(123, s1, s2).index(seed)]
            return noisy[trial.number][(s1, s2).index(seed)]

        return run, calls

    run, calls = rerun((0.84, 0.83, 0.85))  # baseline mean 0.84: 0.013 behind, spread ~0.04
    candidates = rerun_top(study, study.get_trials(), tune, 123, run, baseline={"beta": 0.3})
    assert [c.number for c in candidates] == [0, 1, BASELINE]
    base = candidates[-1]
    assert [r.seed for r in base.runs] == [123, s1, s2] and base.trial.params == {"beta": 0.3}
    assert [c for c in calls if c[0] == BASELINE] == [(BASELINE, s, {"beta": 0.3}) for s in (123, s1, s2)]
    gap, spread = margin_over_baseline(candidates)
    assert gap == pytest.approx(np.mean([0.90, 0.80, 0.86]) - 0.84) and 0 < gap < spread
    assert choose(candidates) is base  # a win smaller than the seed spread is noise
    assert best_candidate(candidates).number == 0  # what the best mean alone would have taken

    (tmp_path / "b").mkdir()
    study = _injected_study(tmp_path / "b", [0.90, 0.80, 0.70])
    run, _ = rerun((0.60, 0.62, 0.61))  # far behind: the search has found something
    candidates = rerun_top(study, study.get_trials(), tune, 123, run, baseline={"beta": 0.3})
    gap, spread = margin_over_baseline(candidates)
    assert gap > spread and choose(candidates).number == 0
    # stored like the re-runs: a second call trains nothing
    again, calls = rerun((0.0, 0.0, 0.0))
    assert rerun_top(study, study.get_trials(), tune, 123, again, baseline={"beta": 0.3}) == candidates
    assert calls == []
    # params.yaml changed since (the study does not hash the searched knobs): its values are
    # trained again on the same seeds, the trials' stored re-runs are not
    changed, calls = rerun((0.95, 0.96, 0.97))
    candidates = rerun_top(study, study.get_trials(), tune, 123, changed, baseline={"beta": 0.4})
    assert calls == [(BASELINE, s, {"beta": 0.4}) for s in (123, s1, s2)]
    assert candidates[-1].trial.params == {"beta": 0.4} and candidates[-1].values == [0.95, 0.96, 0.97]
    assert choose(candidates) is candidates[-1]
    # without a baseline the choice is the best mean, as before
    assert choose([c for c in candidates if c.number != BASELINE]).number == 0


def test_stored_reruns_are_resumed_not_redone(tmp_path):
    study = _injected_study(tmp_path, [0.9, 0.8, 0.7])
    tune = parse_params({"tune": {"rerun_top_k": 2, "rerun_seeds": 3}}).tune
    calls = []

    def killed_on_the_third(trial, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the stage is killed during the third re-run
        calls.append((trial.number, seed))
        return 0.5 + trial.number / 100 + seed % 7 / 1000

    with pytest.raises(KeyboardInterrupt):
        rerun_top(study, study.get_trials(), tune, 123, killed_on_the_third)
    assert len(calls) == 2
    assert len([k for k in study.user_attrs if k.startswith(RERUN_PREFIX)]) == 2  # stored as they end

    resumed = []

    def rerun(trial, seed):
        resumed.append((trial.number, seed))
        return 0.5 + trial.number / 100 + seed % 7 / 1000

    first = rerun_top(study, study.get_trials(), tune, 123, rerun)
    assert len(resumed) == 6 - 2 and not set(resumed) & set(calls)
    assert rerun_top(study, study.get_trials(), tune, 123, rerun) == first and len(resumed) == 4
    # a third candidate later (a larger rerun_top_k) re-runs only the new one
    more = parse_params({"tune": {"rerun_top_k": 3, "rerun_seeds": 3}}).tune
    assert [c.number for c in rerun_top(study, study.get_trials(), more, 123, rerun)] == [0, 1, 2]
    assert resumed[4:] == [(2, s) for s in rerun_seeds(123, 3)]
