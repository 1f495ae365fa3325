"""Training on real ELPV images: it learns, and a killed run resumes to the same result; the recipe
knobs of a run: best-epoch selection, EMA, class weights and balancing, the input-size check."""

import math
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from synermix.config import TrainParams
from synermix.data.datasets import InspectionImages
from synermix.engine import evaluate, select_device
from synermix.errors import UserError
from synermix.training import check_input_size, class_weight_vector, load_trained_model, save_trained_model

from .helpers import REPO_ROOT, fit, prepare_elpv
from .train_job import TRAIN, rows

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration

TIMING = {"images_per_s", "epoch_seconds"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_elpv(
        tmp_path_factory.mktemp("elpv") / "prepared", seed=123, max_per_class=100, image_size=64
    )


def comparable(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def test_short_run_on_real_images_learns(prepared):
    """Mono- vs polycrystalline cells (the manifest's cell_type): real images, a label that
    a few epochs at 32 px can learn, so a failure means the training loop is broken."""
    from torch.utils.data import DataLoader

    from synermix.data.datasets import InspectionImages
    from synermix.engine import evaluate, select_device

    train, val = (frame.assign(label=frame["cell_type"]) for frame in rows(prepared))
    # the loop, not the recipe: the 64-channel network, plain shuffle and the reference beta/alpha.
    # 8 epochs: at 5 the kept epoch's fit of the training images sat at 0.74-0.81 depending on
    # the float order (channels_last on or off), too near the bar to say anything
    params = TrainParams(
        image_size=32,
        epochs=8,
        batch_size=16,
        warmup_epochs=0.5,
        lr=0.02,
        width=None,
        sampling="shuffle",
        beta=0.1,
        mixup_alpha=1.0,
        select_metric="val_accuracy",
    )
    result = fit(train, val, prepared, ["mono", "poly"], params, seed=1)
    history = result.history
    assert len(history) == 8 and all(math.isfinite(r["train_loss"]) for r in history)
    # the val split is small (one image moves accuracy by 2.5 points) and the float sums of
    # another thread count wobble single epochs, so judge the kept (val-best) epoch, and
    # check that it is the one kept
    accuracies = [r["val_accuracy"] for r in history]
    assert max(accuracies) >= 0.8, accuracies
    assert result.selected_epoch == accuracies.index(max(accuracies)) + 1 and params.keep == "best"
    seen = InspectionImages(train, prepared, ["mono", "poly"], result.preprocessing, 32, 1)
    train_fit = evaluate(result.model, DataLoader(seen, batch_size=64), select_device("cpu"), 2)
    assert train_fit["accuracy"] >= 0.8, train_fit
    assert result.preprocessing.channels == 1 and result.preprocessing.image_size == 32


def test_same_seed_same_metrics_on_cpu(prepared):
    train, val = rows(prepared)
    params = TrainParams(**{**TRAIN, "epochs": 2, "method": "synermix", "inter_method": "manifold_mixup"})
    a = fit(train, val, prepared, ["defective", "functional"], params, seed=3)
    b = fit(train, val, prepared, ["defective", "functional"], params, seed=3)
    assert comparable(a.history) == comparable(b.history)


def test_the_stage_path_and_a_direct_call_train_the_same_weights(prepared):
    """The train stage checks its inputs (which builds a model) before train_model; a direct
    call (benchmarks, tests) has train_model check them. Both must give the same training:
    a benchmark row with the stage's settings is the stage's result."""
    from synermix.training import check_training_inputs

    train, val = rows(prepared)
    names = ["defective", "functional"]
    params = TrainParams(**{**TRAIN, "epochs": 1})
    direct = fit(train, val, prepared, names, params, seed=5)
    init = check_training_inputs(params, names, 1)
    staged = fit(train, val, prepared, names, params, seed=5, init=init)
    assert comparable(direct.history) == comparable(staged.history)
    for (name, a), b in zip(
        direct.model.state_dict().items(), staged.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_kill_and_resume_gives_the_same_result(prepared, tmp_path):
    train, val = rows(prepared)
    params = TrainParams(**TRAIN)
    reference = fit(
        train, val, prepared, ["defective", "functional"], params, 7, checkpoint_path=tmp_path / "ref.pt"
    )

    checkpoint = tmp_path / "killed.pt"
    job = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "train_job.py"), str(prepared), str(checkpoint), "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert job.stdout.readline().strip() == "PAUSED"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    resumed = fit(train, val, prepared, ["defective", "functional"], params, 7, checkpoint_path=checkpoint)
    assert resumed.resumed_from_epoch == 2
    assert comparable(resumed.history) == comparable(reference.history)
    for (name, a), (_, b) in zip(
        resumed.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_of_another_configuration_is_not_resumed(prepared, tmp_path):
    train, val = rows(prepared)
    checkpoint = tmp_path / "last.pt"
    fit(
        train,
        val,
        prepared,
        ["defective", "functional"],
        TrainParams(**{**TRAIN, "epochs": 1}),
        7,
        checkpoint_path=checkpoint,
    )
    other = fit(
        train,
        val,
        prepared,
        ["defective", "functional"],
        TrainParams(**{**TRAIN, "epochs": 1, "lr": 0.01}),
        7,
        checkpoint_path=checkpoint,
    )
    assert other.resumed_from_epoch == 0


def test_saved_model_reloads_with_weights_only(prepared, tmp_path):
    train, val = rows(prepared)
    params = TrainParams(**{**TRAIN, "epochs": 1})
    result = fit(train, val, prepared, ["defective", "functional"], params, 7)
    meta = save_trained_model(result, params, tmp_path / "model", {"mlflow_run_id": "r1"})
    model, loaded = load_trained_model(tmp_path / "model")
    assert loaded == meta and loaded["class_names"] == ["defective", "functional"]
    assert loaded["preprocessing"]["channels"] == 1 and len(loaded["preprocessing"]["mean"]) == 1
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.eval()(x))


def test_a_finished_checkpoint_is_never_reused(prepared, tmp_path):
    train, val = rows(prepared)
    params = TrainParams(**{**TRAIN, "epochs": 1})
    checkpoint = tmp_path / "last.pt"
    first = fit(train, val, prepared, ["defective", "functional"], params, 7, checkpoint_path=checkpoint)
    again = fit(train, val, prepared, ["defective", "functional"], params, 7, checkpoint_path=checkpoint)
    assert again.resumed_from_epoch == 0  # trained again (e.g. after a code change), not copied
    assert comparable(again.history) == comparable(first.history)


@pytest.mark.parametrize("cache", [True, False])
def test_fingerprint_covers_image_bytes_and_params(prepared, tmp_path, cache):
    import shutil

    from synermix.data.datasets import InspectionImages
    from synermix.training import run_fingerprint

    train, val = rows(prepared)
    params = TrainParams(**TRAIN)
    names = ["defective", "functional"]

    def images(root):
        return [InspectionImages(frame, root, names, None, 32, 1, cache=cache) for frame in (train, val)]

    base = run_fingerprint(params, 7, names, *images(prepared))
    assert base == run_fingerprint(params, 7, names, *images(prepared))
    assert base != run_fingerprint(TrainParams(**{**TRAIN, "lr": 0.5}), 7, names, *images(prepared))
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / train["path"].iloc[0]).write_bytes((copy / train["path"].iloc[1]).read_bytes())
    assert base != run_fingerprint(params, 7, names, *images(copy))


# -- the recipe knobs (a smaller ELPV subset) -----------------------------------------------

NAMES = ["defective", "functional"]


@pytest.fixture(scope="module")
def recipe_elpv(tmp_path_factory):
    return prepare_elpv(
        tmp_path_factory.mktemp("elpv-recipe") / "prepared", seed=5, max_per_class=60, image_size=40
    )


def val_score(result, prepared, val):
    images = InspectionImages(val, prepared, NAMES, result.preprocessing, 32, 1)
    return evaluate(result.model, DataLoader(images, batch_size=64), select_device("cpu"), len(NAMES))


def test_best_epoch_selection_returns_the_weights_of_the_best_val_epoch(recipe_elpv):
    train, val = rows(recipe_elpv)
    # a high constant learning rate makes val scores jump from epoch to epoch
    knobs = {**TRAIN, "epochs": 5, "lr": 0.2, "schedule": "step", "gamma": 1.0, "warmup_epochs": 0}
    best = fit(train, val, recipe_elpv, NAMES, TrainParams(**knobs, keep="best"), seed=11)
    last = fit(train, val, recipe_elpv, NAMES, TrainParams(**knobs, keep="last"), seed=11)
    scores = [row["val_macro_recall"] for row in best.history]
    # selection does not change training: the same epochs either way
    assert scores == [row["val_macro_recall"] for row in last.history]
    assert best.selected_epoch == scores.index(max(scores)) + 1
    assert last.selected_epoch == len(scores) and last.selected == last.history[-1]
    got_best, got_last = val_score(best, recipe_elpv, val), val_score(last, recipe_elpv, val)
    assert got_best["macro_recall"] == pytest.approx(best.selected["val_macro_recall"])
    assert got_best["loss"] == pytest.approx(best.selected["val_loss"], rel=1e-5)
    assert got_last["loss"] == pytest.approx(last.history[-1]["val_loss"], rel=1e-5)
    if best.selected_epoch != len(scores):
        assert got_best["loss"] != pytest.approx(got_last["loss"], rel=1e-5)


def test_selection_on_val_accuracy(recipe_elpv):
    train, val = rows(recipe_elpv)
    knobs = {**TRAIN, "epochs": 3, "lr": 0.2, "schedule": "step", "gamma": 1.0, "warmup_epochs": 0}
    result = fit(train, val, recipe_elpv, NAMES, TrainParams(**knobs, select_metric="val_accuracy"), seed=2)
    accuracies = [row["val_accuracy"] for row in result.history]
    assert result.selected_epoch == accuracies.index(max(accuracies)) + 1


def test_ema_weights_are_validated_and_returned(recipe_elpv):
    train, val = rows(recipe_elpv)
    knobs = {**TRAIN, "epochs": 2, "keep": "last"}
    plain = fit(train, val, recipe_elpv, NAMES, TrainParams(**knobs), seed=4)
    ema = fit(train, val, recipe_elpv, NAMES, TrainParams(**knobs, ema_decay=0.9), seed=4)
    # the same training steps; the averaged weights are what is scored and returned
    assert [r["train_loss"] for r in ema.history] == [r["train_loss"] for r in plain.history]
    assert ema.history[-1]["val_loss"] != plain.history[-1]["val_loss"]
    assert val_score(ema, recipe_elpv, val)["loss"] == pytest.approx(ema.history[-1]["val_loss"], rel=1e-5)


def test_balanced_class_weights_average_one_over_the_images():
    params = TrainParams(class_weights="balanced", balance_power=1.0)
    labels = [0] * 30 + [1] * 10
    w = class_weight_vector(params, ["a", "b"], labels)
    assert w[1] / w[0] == pytest.approx(3.0)
    assert float((w[torch.tensor(labels)]).mean()) == pytest.approx(1.0)
    half = class_weight_vector(TrainParams(class_weights="balanced", balance_power=0.5), ["a", "b"], labels)
    assert half[1] / half[0] == pytest.approx(3.0**0.5)
    assert class_weight_vector(TrainParams(), ["a", "b"], labels) is None


def test_named_class_weights_and_an_unknown_class():
    w = class_weight_vector(TrainParams(class_weights={"b": 4.0}), ["a", "b"], [0, 1])
    assert w.tolist() == [1.0, 4.0]
    with pytest.raises(UserError, match=r"'crack'.*the classes are a, b"):
        class_weight_vector(TrainParams(class_weights={"crack": 2.0}), ["a", "b"], [0, 1])


def test_an_input_size_the_backbone_cannot_take():
    with pytest.raises(UserError, match=r"train.image_size 16 is too small for convnext_tiny"):
        check_input_size(TrainParams(arch="convnext_tiny", width=None, image_size=16), 1, 4)
    check_input_size(TrainParams(arch="resnet18", image_size=16, width=8), 1, 4)


def test_freeze_stages_beyond_the_backbone_is_one_clear_error():
    params = TrainParams(arch="mobilenet_v2", width=None, init="imagenet", freeze_stages=3, image_size=64)
    with pytest.raises(UserError, match=r"train.freeze_stages 3: mobilenet_v2 has 3 stages, so at most 2"):
        check_input_size(params, 1, 4)
    check_input_size(params.model_copy(update={"freeze_stages": 2}), 1, 4)
