"""The pilot line's labelled photos (synermix.pilot); pilot-eval on a registered model runs in
the rollout flow of tests/test_rollout.py."""

import pytest

from synermix import pilot as pilot_line
from synermix.errors import UserError

from .helpers import noise_image

# marked integration as it was (module-wide) before the tests were split by module, so
# `make test-unit` runs the same tests as before
pytestmark = pytest.mark.integration


def test_pilot_eval_refuses_unlabelled_or_unknown_folders(tmp_path):
    names = ["crack", "ok"]
    (tmp_path / "line" / "crack").mkdir(parents=True)
    noise_image(1).save(tmp_path / "line" / "crack" / "a.png")
    assert pilot_line.labelled_images(tmp_path / "line", names) == [(tmp_path / "line/crack/a.png", "crack")]
    noise_image(2).save(tmp_path / "line" / "loose.png")
    with pytest.raises(UserError, match="carry no label"):
        pilot_line.labelled_images(tmp_path / "line", names)
    (tmp_path / "line" / "loose.png").unlink()
    (tmp_path / "line" / "dent").mkdir()
    with pytest.raises(UserError, match="dent are not classes of this model"):
        pilot_line.labelled_images(tmp_path / "line", names)
    with pytest.raises(UserError, match="no such folder"):
        pilot_line.labelled_images(tmp_path / "missing", names)


def test_pilot_rates_are_those_of_the_operating_point_stored_in_the_model(tmp_path):
    """pilot-eval's escape / overkill / review rates come from the decisions the ONNX model's
    own operating point makes (what serve answers), counted against the folder labels; a
    model without one records a note instead, which the production gates read."""
    import numpy as np
    import torch

    from synermix import decision as dc
    from synermix import onnx_export as ox
    from synermix.data.transforms import Preprocessing
    from synermix.inference import Classifier, read_files

    from .test_bundle import CLASSES, TinyNet

    torch.manual_seed(0)
    meta = {
        "arch": "tiny",
        "class_names": CLASSES,
        "preprocessing": Preprocessing(16, 1, (0.5,), (0.25,)).to_dict(),
        "weights_sha256": "ef" * 32,
    }
    point = dc.OperatingPoint(CLASSES, [CLASSES[0]], 0.3, 0.6)
    files = []
    for i in range(30):
        path = tmp_path / f"{i}.png"
        noise_image(i, size=(16, 16)).save(path)
        files.append(path)
    labels = [CLASSES[i % len(CLASSES)] for i in range(30)]
    for stored, expect_rates in ((point, True), (None, False)):
        decision = {"operating_point": None if stored is None else stored.to_dict(), "unknown_above": None}
        path = tmp_path / f"model-{expect_rates}.onnx"
        metadata = ox.model_metadata(meta, "torchscript", 18, decision=decision)
        ox.export_onnx(TinyNet(), 1, 16, path, "torchscript", 18, metadata)
        classifier = Classifier(path, provider="cpu")
        results = classifier.predict(read_files(files))
        got = pilot_line._decision_rates(classifier, results, labels)
        if not expect_rates:
            assert "no operating point" in got["decision_note"] and "escape_rate" not in got
            continue
        y = np.array([CLASSES.index(c) for c in labels])
        want = dc.decision_rates(point, point.decide(np.array([list(r.scores.values()) for r in results])), y)
        assert got["escape_rate"] == want["escape"]["rate"] and got["review_rate"] == want["review"]["rate"]
        assert got["overkill_rate"] == want["overkill"]["rate"]
        assert got["decisions"]["escape"]["of"] == sum(c == CLASSES[0] for c in labels)
