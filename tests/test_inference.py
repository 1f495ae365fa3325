"""ONNX export and onnxruntime inference on randomly initialised models (no training needed):
preprocessing parity with training, logit parity, metadata, batches, providers, `predict`."""

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from synermix import onnx_export as ox
from synermix.data.images import encode_png, inspect_image, resize_shorter_side
from synermix.data.transforms import Preprocessing, load_resized, normalize
from synermix.inference import Classifier, ModelInfo
from synermix.models import build_model

from .helpers import huge_png_header, noise_image, png_bytes

CLASSES = ["crack", "ok", "scratch"]


def export_random_model(folder, channels: int, image_size: int = 32, prepare_image_size=None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("resnet18", len(CLASSES), channels).eval()
    pre = Preprocessing(image_size, channels, tuple([0.45] * channels), tuple([0.22] * channels))
    meta = {
        "arch": "resnet18",
        "class_names": CLASSES,
        "preprocessing": pre.to_dict(),
        "prepare_image_size": prepare_image_size,
        "weights_sha256": "ab" * 32,
        "mlflow_run_id": "run123",
        "method": "synermix",
        "beta": 0.3,
    }
    path = folder / f"model{channels}.onnx"
    ox.export_onnx(model, channels, image_size, path, "dynamo", 18, ox.model_metadata(meta, "dynamo", 18))
    return model, pre, meta, path


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    return export_random_model(tmp_path_factory.mktemp("grey"), channels=1)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    return export_random_model(tmp_path_factory.mktemp("rgb"), channels=3, prepare_image_size=48)


def odd_images() -> dict[str, bytes]:
    """Files of several sizes and modes, as a line camera or a user folder may hold them."""
    rng = np.random.default_rng(3)
    grey16 = Image.fromarray(rng.integers(0, 65535, (61, 83), dtype=np.uint16))
    palette = noise_image(5, (40, 90), "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA")
    jpeg = io.BytesIO()
    noise_image(6, (300, 200), "RGB").save(jpeg, format="JPEG", quality=90)
    return {
        "grey_50x70.png": png_bytes(noise_image(1, (50, 70), "L")),
        "rgb_300x200.jpg": jpeg.getvalue(),
        "rgba_64.png": png_bytes(rgba),
        "palette_40x90.png": png_bytes(palette),
        "grey16_83x61.png": png_bytes(grey16),
        "bilevel_33x33.png": png_bytes(noise_image(7, (33, 33), "L").convert("1")),
    }


def training_view(data: bytes, pre: Preprocessing, prepare_image_size, tmp_path) -> np.ndarray:
    """What prepare + training make of the file: canonical PNG (resized) -> load_resized -> normalise."""
    image = inspect_image(data, 40_000_000).image
    if prepare_image_size:
        image = resize_shorter_side(image, prepare_image_size)
    path = tmp_path / "prepared.png"
    path.write_bytes(encode_png(image))
    return normalize(load_resized(path, pre.image_size, pre.channels), pre).numpy()


@pytest.mark.parametrize("which", ["grey_model", "rgb_model"])
def test_production_preprocessing_and_logits_match_training_and_pytorch(which, request, tmp_path):
    model, pre, meta, path = request.getfixturevalue(which)
    classifier = Classifier(path, provider="cpu")
    files = odd_images()
    inputs = []
    for name, data in files.items():
        got = classifier.preprocess(data)
        expected = training_view(data, pre, meta["prepare_image_size"], tmp_path)
        assert got.dtype == np.float32 and got.shape == (pre.channels, 32, 32), name
        assert np.array_equal(got, expected), f"{name}: production input differs from training's"
        inputs.append(got)
    files_list = [tmp_path / name for name in files]
    for file, data in zip(files_list, files.values(), strict=True):
        file.write_bytes(data)
    parity = ox.check_parity(model, classifier, files_list, [torch.from_numpy(x) for x in inputs])
    assert parity.images == 6 and parity.top1_agreement == 1.0
    assert parity.max_abs_diff <= 1e-4 and parity.preprocessing_max_abs_diff == 0.0
    assert parity.passed(1e-4) and not parity.passed(parity.max_abs_diff / 10 if parity.max_abs_diff else -1)
    drifted = ox.Parity(
        images=6, max_abs_diff=0.0, mean_abs_diff=0.0, top1_agreement=1.0, preprocessing_max_abs_diff=0.5
    )
    assert not drifted.passed(1e-4)  # a preprocessing drift fails parity even when the runtimes agree


def test_one_session_takes_batches_of_1_7_and_64(grey_model):
    model, _, _, path = grey_model
    classifier = Classifier(path, provider="cpu")
    rng = np.random.default_rng(0)
    for batch in (1, 7, 64):
        x = rng.normal(size=(batch, 1, 32, 32)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = classifier.logits(x)
        assert got.shape == (batch, 3) and np.abs(got - expected).max() <= 1e-4
        assert classifier.probabilities(x).sum(axis=1) == pytest.approx(np.ones(batch))


def test_the_file_is_single_checked_and_carries_its_metadata(rgb_model):
    _, pre, _, path = rgb_model
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # dynamic batch
    assert list(path.parent.iterdir()) == [path]  # no external data files
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES and props["architecture"] == "resnet18"
    assert (
        props["input_size"] == "32" and props["channels"] == "3" and json.loads(props["mean"]) == [0.45] * 3
    )
    assert props["training_run_id"] == "run123" and props["weights_sha256"] == "ab" * 32

    info = ModelInfo.from_metadata(props)
    assert info.class_names == CLASSES and info.prepare_image_size == 48
    assert (info.image_size, info.channels, info.mean, info.std) == (32, 3, pre.mean, pre.std)
    assert info.extra["exporter"] == "dynamo" and info.extra["opset"] == 18
    with pytest.raises(ValueError, match="no 'synermix' metadata"):
        ModelInfo.from_metadata({"class_names": "[]"})


def test_provider_really_used_is_reported(grey_model, caplog):
    path = grey_model[3]
    with caplog.at_level(logging.INFO, logger="synermix.inference"):
        assert Classifier(path, provider="cpu").provider == "CPUExecutionProvider"
    assert "on CPUExecutionProvider (model1.onnx)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synermix.inference"):
        used = Classifier(path, provider="cuda").provider
    if torch.cuda.is_available():
        assert used == "CUDAExecutionProvider"
    else:  # onnxruntime-gpu offers CUDA here but falls back: that must not be silent
        assert used == "CPUExecutionProvider"
        assert "asked onnxruntime for CUDAExecutionProvider but the session runs on CPUExecutionProvider" in (
            caplog.text
        )


def run_cli(*args, cwd, env=None, timeout=None):
    return subprocess.run(
        [sys.executable, "-m", "synermix.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env or os.environ,
        timeout=timeout,
    )


@pytest.mark.integration  # runs the CLI in a subprocess
def test_predict_reports_bad_files_per_file_and_abstains(rgb_model, tmp_path):
    path = rgb_model[3]
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "good.png").write_bytes(png_bytes(noise_image(11, (60, 60), "RGB")))
    (inbox / "sub" / "grey.png").write_bytes(
        png_bytes(noise_image(12, (60, 45), "L"))
    )  # grey to an RGB model
    (inbox / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inbox / "empty.png").write_bytes(b"")
    (inbox / "huge.png").write_bytes(huge_png_header(50_000, 50_000))
    (inbox / "notes.txt").write_text("not an image, not listed")

    proc = run_cli(
        "predict", str(inbox), "--model", str(path), "--out", str(tmp_path / "p.csv"), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    rows = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("path")
    assert sorted(rows.index) == sorted(
        str(inbox / n) for n in ("good.png", "sub/grey.png", "corrupt.jpg", "empty.png", "huge.png")
    )
    for name in ("good.png", "sub/grey.png"):
        row = rows.loc[str(inbox / name)]
        assert row["status"] == "ok" and row["class"] in CLASSES
        scores = [float(row[f"score_{c}"]) for c in CLASSES]
        assert sum(scores) == pytest.approx(1.0, abs=1e-5) and float(row["confidence"]) == max(scores)
    assert "unreadable image header" in rows.loc[str(inbox / "corrupt.jpg"), "error"]
    assert "empty file" in rows.loc[str(inbox / "empty.png"), "error"]
    assert "decompression-bomb guard" in rows.loc[str(inbox / "huge.png"), "error"]
    assert "3 could not be scored" in proc.stderr

    # everything below a probability of 1 abstains; JSON output keeps the provider
    proc = run_cli(
        "predict",
        str(inbox / "good.png"),
        "--model",
        str(path),
        "--abstain",
        "0.999",
        "--format",
        "json",
        cwd=tmp_path,
    )
    out = json.loads(proc.stdout)
    assert out["provider"] == "CPUExecutionProvider" and out["predictions"][0]["status"] == "abstain"
    assert out["predictions"][0]["class"] in CLASSES  # still says what it would have said

    missing = run_cli("predict", str(tmp_path / "nope.png"), "--model", str(path), cwd=tmp_path)
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    no_model = run_cli("predict", str(inbox), "--model", str(tmp_path / "m.onnx"), cwd=tmp_path)
    assert no_model.returncode == 2 and "no ONNX model there" in no_model.stderr
    not_onnx = run_cli("predict", str(inbox), "--model", str(inbox / "good.png"), cwd=tmp_path)
    assert not_onnx.returncode == 2 and "not a model this command can run" in not_onnx.stderr
    assert "Traceback" not in not_onnx.stderr


@pytest.mark.integration  # a subprocess without torch
def test_the_model_file_alone_runs_without_torch_or_the_training_code(grey_model, tmp_path):
    path = grey_model[3]
    image = tmp_path / "cell.png"
    image.write_bytes(png_bytes(noise_image(21, (80, 80), "L")))
    blocked = [
        "torch",
        "torchvision",
        "synermix.training",
        "synermix.models",
        "synermix.engine",
        "synermix.stages",
    ]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # importing any of them now fails\n"
        "from pathlib import Path\n"
        "from synermix.inference import Classifier\n"
        f"clf = Classifier(Path({str(path)!r}), provider='cpu')\n"
        f"[result] = clf.predict([('cell', Path({str(image)!r}).read_bytes())])\n"
        "print(result.status, result.label, clf.class_names)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    status, label, _ = proc.stdout.split(" ", 2)
    assert status == "ok" and label in CLASSES


def test_predict_names_fifos_and_dangling_links_and_never_truncates_its_output(rgb_model, tmp_path):
    """A FIFO argument used to hang predict; under a folder FIFOs and dangling links
    vanished from the results; a failed write truncated the previous results file."""
    import os

    import pandas as pd

    path = rgb_model[3]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.png").write_bytes(png_bytes(noise_image(11, (60, 60), "RGB")))
    os.mkfifo(inbox / "pipe.png")
    (inbox / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "p.csv"
    proc = run_cli(
        "predict", str(inbox), str(inbox / "pipe.png"), "--model", str(path), "--out", str(out),
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(out, keep_default_na=False)
    errors = dict(zip(rows["path"], rows["error"], strict=True))
    assert errors[str(inbox / "pipe.png")] == "cannot read the file: a FIFO"
    assert errors[str(inbox / "gone.png")] == "cannot read the file: a link to nothing (dangling)"
    assert rows["status"].tolist().count("ok") == 1
    # a write that fails (here: --out names a folder) is one line, and leaves nothing behind
    (tmp_path / "taken").mkdir()
    proc = run_cli("predict", str(inbox / "good.png"), "--model", str(path), "--out", str(tmp_path / "taken"),
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "cannot write the results" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob(".taken.*"))
    # the results go to a temporary file renamed over the old one: never a truncated file
    before = out.read_bytes()
    proc = run_cli("predict", str(inbox / "good.png"), "--model", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0 and out.read_bytes() != before and not list(tmp_path.glob(".p.csv.*"))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"format_version": 1, "preprocessing": {}}', "malformed: no 'class_names'"),
        ('{"format_version": 1, "class_names": "ab", "preprocessing": {}}', "list of class names"),
        (
            '{"format_version": 1, "class_names": ["a"], "preprocessing": {"image_size": 8}}',
            "malformed: no 'channels'",
        ),
        (
            '{"format_version": 1, "class_names": ["a"], "preprocessing": '
            '{"image_size": 0, "channels": 1, "mean": [0.5], "std": [0.2]}}',
            "image_size 0 is not 1-8192",
        ),
        (
            '{"format_version": 1, "class_names": ["a"], "preprocessing": '
            '{"image_size": 8, "channels": 3, "mean": [0.5], "std": [0.2]}}',
            "1/1 values for 3 channel(s)",
        ),
        (
            '{"format_version": 1, "class_names": ["a"], "preprocessing": '
            '{"image_size": 8, "channels": 1, "mean": [0.5], "std": [0]}}',
            "std finite and positive",
        ),
        ("[" * 100_000 + "]" * 100_000, "not"),
        (  # an operating point stored for other classes than the model's
            '{"format_version": 1, "class_names": ["a", "b"], "preprocessing": '
            '{"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.2]}, "decision": '
            '{"operating_point": {"class_names": ["x", "b"], "defect_classes": ["x"], '
            '"accept_below": 0.2, "reject_from": 0.6}}}',
            "stored for classes x, b, the model has a, b",
        ),
        (
            '{"format_version": 1, "class_names": ["a", "b"], "preprocessing": '
            '{"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.2]}, "decision": '
            '{"unknown_above": -3}}',
            "unknown-part threshold -3 is not a distance",
        ),
    ],
)
def test_malformed_model_metadata_is_one_line(value, words):
    with pytest.raises(ValueError, match=None) as caught:
        ModelInfo.from_metadata({"synermix": value})
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_malformed_metadata_in_a_model_file_is_one_line_from_predict(grey_model, tmp_path):
    proto = onnx.load(str(grey_model[3]))
    next(p for p in proto.metadata_props if p.key == "synermix").value = '{"format_version": 1}'
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(noise_image(1)))
    proc = run_cli("predict", str(image), "--model", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "metadata is malformed" in proc.stderr and "Traceback" not in proc.stderr


def test_decision_and_unknown_distance_travel_in_the_onnx_file(tmp_path):
    """Calibrated logits, the distance and the stored operating point: onnxruntime answers what
    PyTorch and numpy compute, and predict's decision is the one decision.decide gives."""
    from synermix import decision as dc
    from synermix.metrics import softmax
    from synermix.novelty import fit_novelty, fit_threshold, novelty_module

    torch.manual_seed(0)
    net = build_model("resnet18", len(CLASSES), 1).eval()
    pre = Preprocessing(32, 1, (0.45,), (0.22,))
    files = {f"img{i}.png": png_bytes(noise_image(i)) for i in range(24)}
    x = np.stack([normalize(load_resized_bytes(b, tmp_path, pre), pre).numpy() for b in files.values()])
    with torch.no_grad():
        feats = net.features(torch.from_numpy(x)).double().numpy()
    labels = np.arange(len(x)) % 3
    novelty = fit_novelty(feats, labels, 3, shrinkage=0.5)
    dist = novelty.distances(feats)
    fitted = fit_threshold(dist, 0.25)
    # the fitted threshold is one image's own distance: move it to the middle of its gap, so
    # onnxruntime's float32 rounding cannot put that image on the other side on some CPU
    threshold = float((dist[dist <= fitted].max() + dist[dist > fitted].min()) / 2)
    point = dc.OperatingPoint(CLASSES, ["crack", "scratch"], 0.5, 0.8)
    meta = {
        "arch": "resnet18",
        "class_names": CLASSES,
        "preprocessing": pre.to_dict(),
        "weights_sha256": "cd" * 32,
    }
    decision = {"operating_point": point.to_dict(), "unknown_above": threshold}
    wrapped = ox.LineModel(net, 1.7, novelty_module(novelty)).eval()
    path = tmp_path / "model.onnx"
    ox.export_onnx(
        wrapped,
        1,
        32,
        path,
        "dynamo",
        18,
        ox.model_metadata(meta, "dynamo", 18, temperature=1.7, decision=decision),
    )
    classifier = Classifier(path, provider="cpu")
    assert classifier.output_names == ["logits", "distance"]
    assert classifier.info.operating_point == point and classifier.info.unknown_above == threshold
    logits, distance = classifier.outputs(x)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).double().numpy() / 1.7
    assert np.abs(logits - expected).max() <= 1e-4
    assert distance == pytest.approx(novelty.distances(feats), rel=1e-4)
    expected_decisions = dc.decide(point, threshold, softmax(expected), novelty.distances(feats))
    assert "unknown" in expected_decisions and len(set(expected_decisions)) >= 2
    results = classifier.predict(list(files.items()), batch_size=5)
    assert [r.decision for r in results] == expected_decisions
    row = results[0].to_row(CLASSES)
    assert row["decision"] == expected_decisions[0] and row["distance"] == pytest.approx(
        distance[0], rel=1e-5
    )
    (tmp_path / "files").mkdir()
    for name, data in files.items():
        (tmp_path / "files" / name).write_bytes(data)
    parity = ox.check_parity(
        wrapped, classifier, [tmp_path / "files" / name for name in files], [torch.from_numpy(v) for v in x]
    )
    assert parity.distance_max_rel_diff is not None and parity.passed(1e-4)


def load_resized_bytes(data: bytes, folder, pre):
    path = folder / "one.png"
    path.write_bytes(data)
    return load_resized(path, pre.image_size, pre.channels)
