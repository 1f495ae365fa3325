"""The contact sheet's choice of images and the Grad-CAM maps (captum) on a real network."""

import numpy as np
import pandas as pd
import torch

from synermix import explain
from synermix.models import build_model


def table() -> pd.DataFrame:
    rows = [
        # path, actual, predicted, confidence, correct, decision
        ("a.png", "crack", "ok", 0.95, False, "accept"),  # escape, most confident
        ("b.png", "crack", "ok", 0.60, False, "accept"),  # escape
        ("c.png", "crack", "crack", 0.99, True, "reject"),  # right
        ("d.png", "ok", "crack", 0.70, False, "reject"),  # overkill
        ("e.png", "ok", "ok", 0.55, True, "reject"),  # overkill though classified right
        ("f.png", "ok", "crack", 0.90, False, "review"),  # a person looks: neither
        ("g.png", "ok", "ok", 0.99, True, "accept"),
    ]
    return pd.DataFrame(rows, columns=["path", "actual", "predicted", "confidence", "correct", "decision"])


def test_pick_takes_the_most_confident_escapes_and_overkills():
    picked = explain.pick(table(), ["crack"], per_kind=8)
    assert picked["path"].tolist() == ["a.png", "b.png", "d.png", "e.png"]
    assert picked["kind"].tolist() == ["escape", "escape", "overkill", "overkill"]
    assert explain.pick(table(), ["crack"], per_kind=1)["path"].tolist() == ["a.png", "d.png"]


def test_pick_without_defect_classes_takes_the_most_confident_mistakes():
    picked = explain.pick(table().drop(columns="decision"), [], per_kind=2)
    assert picked["path"].tolist() == ["a.png", "f.png"] and set(picked["kind"]) == {"mistake"}
    assert explain.pick(table()[table()["correct"]], [], per_kind=2).empty


def test_gradcam_is_the_textbook_grad_cam_of_the_last_stage_for_the_given_class():
    """Against Grad-CAM written out (Selvaraju et al. 2017) on the same network: weights are
    the spatial mean of d logit_target / d A for the last stage's map A; the map is
    ReLU(sum_k w_k A_k), upsampled and scaled to a peak of 1. Another layer or target differs."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, in_channels=1, width=8).eval()
    x = torch.randn(2, 1, 64, 64)
    targets = [2, 0]
    maps = explain.gradcam(model, x.clone(), targets)
    assert maps.shape == (2, 64, 64) and maps.min() >= 0

    held = {}
    hook = model.stages[-1].register_forward_hook(lambda m, i, out: held.update(a=out))
    logits = model(x)
    hook.remove()
    a = held["a"]
    grads = torch.autograd.grad(logits[torch.arange(2), targets].sum(), a)[0]
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0].detach().numpy()
    peak = cam.reshape(2, -1).max(1).reshape(-1, 1, 1)
    expected = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    other = explain.gradcam(model, x.clone(), [1, 1])
    assert np.abs(other - maps).max() > 0.05
