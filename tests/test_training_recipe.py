"""The recipe knobs of a training run: best-epoch selection, EMA, class weights and
balancing, the backbone learning rate, and the input-size check."""

import pytest
import torch
from torch.utils.data import DataLoader

from synermix.config import TrainParams
from synermix.data.datasets import InspectionImages
from synermix.engine import build_optimizer, evaluate, select_device
from synermix.errors import UserError
from synermix.mixup import MixRandom, SynerMixLoss
from synermix.models import build_model
from synermix.training import check_input_size, class_weight_vector

from .helpers import fit, prepare_elpv
from .train_job import TRAIN, rows

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration

NAMES = ["defective", "functional"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_elpv(
        tmp_path_factory.mktemp("elpv-recipe") / "prepared", seed=5, max_per_class=60, image_size=40
    )


def val_score(result, prepared, val):
    images = InspectionImages(val, prepared, NAMES, result.preprocessing, 32, 1)
    return evaluate(result.model, DataLoader(images, batch_size=64), select_device("cpu"), len(NAMES))


def test_best_epoch_selection_returns_the_weights_of_the_best_val_epoch(prepared):
    train, val = rows(prepared)
    # a high constant learning rate makes val scores jump from epoch to epoch
    knobs = {**TRAIN, "epochs": 5, "lr": 0.2, "schedule": "step", "gamma": 1.0, "warmup_epochs": 0}
    best = fit(train, val, prepared, NAMES, TrainParams(**knobs, keep="best"), seed=11)
    last = fit(train, val, prepared, NAMES, TrainParams(**knobs, keep="last"), seed=11)
    scores = [row["val_macro_recall"] for row in best.history]
    # selection does not change training: the same epochs either way
    assert scores == [row["val_macro_recall"] for row in last.history]
    assert best.selected_epoch == scores.index(max(scores)) + 1
    assert last.selected_epoch == len(scores) and last.selected == last.history[-1]
    got_best, got_last = val_score(best, prepared, val), val_score(last, prepared, val)
    assert got_best["macro_recall"] == pytest.approx(best.selected["val_macro_recall"])
    assert got_best["loss"] == pytest.approx(best.selected["val_loss"], rel=1e-5)
    assert got_last["loss"] == pytest.approx(last.history[-1]["val_loss"], rel=1e-5)
    if best.selected_epoch != len(scores):
        assert got_best["loss"] != pytest.approx(got_last["loss"], rel=1e-5)


def test_selection_on_val_accuracy(prepared):
    train, val = rows(prepared)
    knobs = {**TRAIN, "epochs": 3, "lr": 0.2, "schedule": "step", "gamma": 1.0, "warmup_epochs": 0}
    result = fit(train, val, prepared, NAMES, TrainParams(**knobs, select_metric="val_accuracy"), seed=2)
    accuracies = [row["val_accuracy"] for row in result.history]
    assert result.selected_epoch == accuracies.index(max(accuracies)) + 1


def test_ema_weights_are_validated_and_returned(prepared):
    train, val = rows(prepared)
    knobs = {**TRAIN, "epochs": 2, "keep": "last"}
    plain = fit(train, val, prepared, NAMES, TrainParams(**knobs), seed=4)
    ema = fit(train, val, prepared, NAMES, TrainParams(**knobs, ema_decay=0.9), seed=4)
    # the same training steps; the averaged weights are what is scored and returned
    assert [r["train_loss"] for r in ema.history] == [r["train_loss"] for r in plain.history]
    assert ema.history[-1]["val_loss"] != plain.history[-1]["val_loss"]
    assert val_score(ema, prepared, val)["loss"] == pytest.approx(ema.history[-1]["val_loss"], rel=1e-5)


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


def test_class_weights_and_label_smoothing_reach_the_inter_loss():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, small_input_stem=True, width=8)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    weight = torch.tensor([1.0, 2.0, 0.5])
    loss = SynerMixLoss("erm", 3, MixRandom(0), class_weights=weight, label_smoothing=0.1)
    model.eval()
    expected = torch.nn.functional.cross_entropy(model(x), y, weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(loss(model, x, x, y).total, expected)
    plain = SynerMixLoss("erm", 3, MixRandom(0))(model, x, x, y).total
    assert not torch.allclose(plain, expected)


def test_backbone_learning_rate_scale():
    model = build_model("resnet18", 3, 1, width=8)
    optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 0.0, backbone_lr_scale=0.1)
    head, backbone = optimizer.param_groups
    assert head["lr"] == pytest.approx(0.1) and backbone["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}
    assert len(head["params"]) + len(backbone["params"]) == len(list(model.parameters()))
    assert len(build_optimizer(model, "sgd", 0.1, 0.9, 0.0).param_groups) == 1


def test_width_narrows_a_resnet():
    wide, narrow = build_model("resnet18", 4, 1), build_model("resnet18", 4, 1, width=16)
    assert narrow.feature_dim == 128 and wide.feature_dim == 512
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters()) / 10
    assert narrow(torch.randn(2, 1, 64, 64)).shape == (2, 4)
    with pytest.raises(ValueError, match="ResNets only"):
        TrainParams(arch="mobilenet_v3_small", width=16)


def test_an_input_size_the_backbone_cannot_take():
    with pytest.raises(UserError, match=r"train.image_size 16 is too small for convnext_tiny"):
        check_input_size(TrainParams(arch="convnext_tiny", width=None, image_size=16), 1, 4)
    check_input_size(TrainParams(arch="resnet18", image_size=16, width=8), 1, 4)
