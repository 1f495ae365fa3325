"""The train stage end to end in-process: real MLflow (SQLite) store, real images; the tuned
params it takes from best_params.yaml."""

import json

import pandas as pd
import pytest
import torch

from synermix import tracking
from synermix.config import parse_params
from synermix.errors import CheckFailed, UserError
from synermix.paths import MODEL_DIR, TRAIN_CHECKPOINT, TRAIN_HISTORY, TRAIN_METRICS
from synermix.stages.prepare import run_prepare
from synermix.stages.train import apply_tuned, run_train
from synermix.training import load_trained_model

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


@pytest.fixture
def stage_params(tmp_path, make_dataset, make_params, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working folder
    root = make_dataset({"scratch": 20, "crack": 20, "ok": 20}, mode="RGB")
    return make_params(
        data={"source": f"folder:{root}"},
        train={"image_size": 32, "epochs": 2, "batch_size": 16, "warmup_epochs": 0.5},
        mlflow={"experiment": "stage-test"},
    )


def test_train_stage_writes_model_reports_and_mlflow_run(tmp_path, stage_params):

    run_prepare(stage_params, tmp_path)
    metrics = run_train(stage_params, tmp_path)

    model, meta = load_trained_model(tmp_path / MODEL_DIR)
    assert meta["class_names"] == ["crack", "ok", "scratch"] and meta["in_channels"] == 3
    assert meta["preprocessing"]["image_size"] == 32 and len(meta["preprocessing"]["std"]) == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)

    history = pd.read_csv(tmp_path / TRAIN_HISTORY)
    assert history["epoch"].tolist() == [1, 2]
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_recall", "lr", "images_per_s"} <= set(
        history
    )
    saved = json.loads((tmp_path / TRAIN_METRICS).read_text())
    assert saved == metrics and saved["epochs"] == 2 and 0 <= saved["val_accuracy"] <= 1
    assert (tmp_path / TRAIN_CHECKPOINT).is_file()

    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"])
    assert run.data.params["train.method"] == "synermix" and run.data.params["train.beta"] == "0.3"
    assert run.data.tags["weights_sha256"] == meta["weights_sha256"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/weights.pt", "model/model.json"}


def test_train_stage_refuses_a_class_without_training_images(tmp_path, stage_params, make_params):
    run_prepare(stage_params, tmp_path)
    params = make_params(
        data={"source": stage_params.data.source, "classes": ["crack", "ok", "scratch", "dent"]},
        train={"image_size": 32, "epochs": 1},
    )
    with pytest.raises(CheckFailed, match="no training images for class\\(es\\) dent"):
        run_train(params, tmp_path)


def test_undeclared_class_is_left_out_when_its_rule_is_off(tmp_path, stage_params, make_params, caplog):
    run_prepare(stage_params, tmp_path)
    params = make_params(
        data={"source": stage_params.data.source, "classes": ["crack", "ok"]},
        validate={"rules": {"declared_labels": {"severity": "off"}}},
        train={"image_size": 32, "epochs": 1, "batch_size": 16},
    )
    with caplog.at_level("WARNING"):
        run_train(params, tmp_path)
    assert "leaving out 20 image(s) of class(es) not in data.classes: scratch" in caplog.text
    _, meta = load_trained_model(tmp_path / MODEL_DIR)
    assert meta["class_names"] == ["crack", "ok"]


def test_cli_has_every_stage():
    from synermix.cli import _parser

    for command in ("params", "prepare", "validate", "tune", "train", "evaluate", "export"):
        assert _parser().parse_args([command]).command == command
    assert _parser().parse_args(["predict", "photos/"]).paths == ["photos/"]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"init": "missing/weights.pt"}, "missing/weights.pt"),
        ({"class_weights": {"dent": 2.0}}, "train.class_weights names 'dent'"),
        (
            {"arch": "convnext_tiny", "width": None, "image_size": 16},
            "train.image_size 16 is too small for convnext_tiny",
        ),
    ],
)
def test_bad_training_input_stops_before_anything_is_written(
    tmp_path, stage_params, make_params, train, message
):

    from synermix.errors import UserError

    run_prepare(stage_params, tmp_path)
    params = make_params(
        data={"source": stage_params.data.source},
        train={"image_size": 32, "epochs": 1, "batch_size": 16, **train},
        mlflow={"experiment": "stage-test"},
    )
    with pytest.raises(UserError, match=message) as caught:
        run_train(params, tmp_path)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert not (tmp_path / MODEL_DIR).exists() and not (tmp_path / TRAIN_CHECKPOINT).exists()
    assert not (tmp_path / TRAIN_METRICS).exists()
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stage-test")
    # prepare's run may exist; no train run was started
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs if r.info.run_name == "train"] == []


def test_warm_start_from_a_state_dict_is_recorded(tmp_path, stage_params, make_params):
    import hashlib

    run_prepare(stage_params, tmp_path)
    run_train(stage_params, tmp_path)
    source = tmp_path / "previous.pt"
    source.write_bytes((tmp_path / MODEL_DIR / "weights.pt").read_bytes())
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    params = make_params(
        data={"source": stage_params.data.source},
        train={
            "image_size": 32,
            "epochs": 1,
            "batch_size": 16,
            "init": str(source),
            "backbone_lr_scale": 0.1,
        },
        mlflow={"experiment": "stage-test"},
    )
    run_train(params, tmp_path)
    _, meta = load_trained_model(tmp_path / MODEL_DIR)
    assert meta["init"]["kind"] == "file" and meta["init"]["sha256"] == sha
    run = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(meta["mlflow_run_id"])
    assert run.data.tags["init_sha256"] == sha and run.data.params["init.kind"] == "file"
    assert run.data.params["train.backbone_lr_scale"] == "0.1"


def test_a_damaged_best_params_file_is_refused(tmp_path):
    train = parse_params({}).train
    path = tmp_path / "best_params.yaml"
    path.write_text("tuned: true\nparams: {arch: resnet50}\n")
    with pytest.raises(UserError, match=r"cannot set train.arch"):
        apply_tuned(train, path)
    path.write_text("tuned: true\nparams: {beta: 2.0}\n")
    with pytest.raises(UserError, match=r"beta = 2.0: Input should be less than or equal to 1"):
        apply_tuned(train, path)
    assert apply_tuned(train, tmp_path / "missing.yaml") == (train, {})
