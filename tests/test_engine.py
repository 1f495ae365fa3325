import itertools
import math

import pytest
import torch

from synermix.engine import (
    TrainingDiverged,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
    select_device,
    train_one_epoch,
)
from synermix.mixup import MixRandom, SynerMixLoss
from synermix.models import build_model


def test_warmup_then_cosine_to_zero():
    f = [lr_factor(s, 10, 5, "cosine", 1.0, 10, 0.5) for s in range(50)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[30] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(f[10:])) and f[-1] < 0.01


def test_step_schedule_halves_every_step_size_epochs():
    f = lambda s: lr_factor(s, 10, 30, "step", 0.0, 10, 0.5)  # noqa: E731
    assert (f(0), f(99), f(100), f(199), f(200)) == (1.0, 1.0, 0.5, 0.5, 0.25)


def test_scheduler_drives_the_optimizer():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "adamw", 0.01, 0.9, 0.0)
    sched = build_scheduler(opt, 4, 2, "cosine", 0.5, 10, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # first warm-up step
    for _ in range(8):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fall-back")
def test_cpu_selected_without_cuda():
    setup = select_device("auto")
    assert setup.device.type == "cpu" and setup.amp_dtype is None and setup.channels_last
    assert not select_device("auto", channels_last=False).channels_last


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_asking_for_cuda_without_one_is_a_clear_error():
    from synermix.errors import UserError

    with pytest.raises(UserError, match=r"no CUDA device is visible; set train.device: auto"):
        select_device("cuda")


def loader(n=8, inf=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, 16, generator=g)
    if inf:
        x[0, 0, 0, 0] = float("inf")
    y = torch.arange(n) % 2
    return [(x, x.clone(), y)]


def test_nan_loss_stops_with_a_clear_message():
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1, small_input_stem=True)
    opt = build_optimizer(model, "sgd", 0.1, 0.9, 0.0)
    sched = build_scheduler(opt, 1, 3, "cosine", 0.0, 10, 0.5)
    loss = SynerMixLoss("synermix", 2, MixRandom(0), beta=0.5)
    with pytest.raises(TrainingDiverged, match=r"loss became nan in epoch 1 .*lower train.lr \(now 0.1\)"):
        train_one_epoch(model, loss, opt, sched, loader(inf=True), select_device("cpu"), 0)


def test_train_one_epoch_reports_means():
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1, small_input_stem=True)
    opt = build_optimizer(model, "sgd", 0.01, 0.9, 0.0)
    sched = build_scheduler(opt, 1, 3, "cosine", 0.0, 10, 0.5)
    stats = train_one_epoch(
        model, SynerMixLoss("synermix", 2, MixRandom(0)), opt, sched, loader(), select_device("cpu"), 0
    )
    assert math.isfinite(stats["train_loss"]) and math.isfinite(stats["train_intra_loss"])
    assert stats["images_per_s"] > 0


class FixedLogits(torch.nn.Module):
    """Predicts class 0 for the first 3 images of a batch and class 1 for the others."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 2)
        logits[:3, 0] = 5.0
        logits[3:, 1] = 5.0
        return logits


def test_evaluate_accuracy_macro_and_per_class_recall():
    x = torch.zeros(5, 1, 2, 2)
    y = torch.tensor([0, 0, 1, 1, 1])  # predictions 0, 0, 0, 1, 1
    result = evaluate(FixedLogits(), [(x, y)], select_device("cpu"), num_classes=2)
    assert result["accuracy"] == pytest.approx(4 / 5)
    assert result["per_class_recall"] == pytest.approx([1.0, 2 / 3])
    assert result["macro_recall"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["images"] == 5


def test_evaluate_class_absent_from_the_split_has_no_recall():
    x = torch.zeros(5, 1, 2, 2)
    y = torch.tensor([0, 0, 1, 1, 1])
    result = evaluate(FixedLogits(), [(x, y)], select_device("cpu"), num_classes=3)
    assert math.isnan(result["per_class_recall"][2])
    assert result["macro_recall"] == pytest.approx((1 + 2 / 3) / 2)


def test_checkpoint_roundtrip_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(2), "rng": MixRandom(0).state_dict()})
    save_checkpoint(path, {"epoch": 2, "w": torch.zeros(2), "rng": MixRandom(0).state_dict()})
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and not list(path.parent.glob("*.tmp"))

    real_save = torch.save

    def killed_while_writing(obj, target):
        real_save(obj, target)
        with open(target, "r+b") as handle:  # half a file, then the process dies
            handle.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 3})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 2  # the previous checkpoint is intact
    path.write_bytes(b"garbage")
    assert load_checkpoint(path) is None
    assert load_checkpoint(tmp_path / "none.pt") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_with_autocast_and_channels_last():
    setup = select_device("cuda")
    assert setup.device.type == "cuda" and setup.amp_dtype in (torch.bfloat16, torch.float16)
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1, small_input_stem=True).to(setup.device)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, "sgd", 0.01, 0.9, 0.0)
    sched = build_scheduler(opt, 1, 3, "cosine", 0.0, 10, 0.5)
    scaler = torch.amp.GradScaler("cuda") if setup.amp_dtype == torch.float16 else None
    stats = train_one_epoch(
        model, SynerMixLoss("synermix", 2, MixRandom(0)), opt, sched, loader(), setup, 0, scaler
    )
    assert math.isfinite(stats["train_loss"])
    result = evaluate(model, [(loader()[0][0], loader()[0][2])], setup, 2)
    assert 0.0 <= result["accuracy"] <= 1.0


# marked integration as it was (module-wide) before the tests were split by module, so
# `make test-unit` runs the same tests as before
@pytest.mark.integration
def test_backbone_learning_rate_scale():
    model = build_model("resnet18", 3, 1, width=8)
    optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 0.0, backbone_lr_scale=0.1)
    head, backbone = optimizer.param_groups
    assert head["lr"] == pytest.approx(0.1) and backbone["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}
    assert len(head["params"]) + len(backbone["params"]) == len(list(model.parameters()))
    assert len(build_optimizer(model, "sgd", 0.1, 0.9, 0.0).param_groups) == 1
