"""The MLflow calls the model registry code relies on, against a real tracking server.

``mlflow_server`` (conftest) runs ``mlflow server`` on PostgreSQL with artifacts served by the
server (``mlflow-artifacts:/``); the client runs in an empty working folder to show it needs
no file access to the artifact store. A second test makes the same registry error calls on a
local ``sqlite:///`` store, to show the error codes the registry code keys on are the same.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

#: a ~2000-character JSON document, like the alias history the registry keeps in a tag
ALIAS_HISTORY = json.dumps(
    [
        {"alias": "champion", "version": str(i), "at": f"2025-01-01T00:00:{i % 60:02d}Z", "by": "ci"}
        for i in range(1, 31)
    ]
)

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


def tiny_onnx(path: Path) -> Path:
    """A 4 -> 2 linear layer exported with the legacy TorchScript exporter, opset 18."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated
        torch.onnx.export(
            model,
            (torch.zeros(1, 4),),
            str(path),
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return path


def expect_error(code: str, call, *args, **kwargs):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        call(*args, **kwargs)
    assert caught.value.error_code == code, caught.value
    return caught.value


def check_registry_errors(client) -> None:
    """Creating an existing registered model / deleting a missing one: the codes we key on."""
    client.create_registered_model("mutex")
    expect_error("RESOURCE_ALREADY_EXISTS", client.create_registered_model, "mutex")
    expect_error("RESOURCE_DOES_NOT_EXIST", client.delete_registered_model, "no-such-model")
    client.delete_registered_model("mutex")
    expect_error("RESOURCE_DOES_NOT_EXIST", client.get_registered_model, "mutex")
    client.create_registered_model("mutex")  # free again once deleted
    client.delete_registered_model("mutex")


@pytest.mark.slow  # PostgreSQL and an MLflow server: make test-slow and CI run it
def test_tracking_and_registry_through_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import onnx
    from mlflow import MlflowClient
    from onnx.reference import ReferenceEvaluator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    inputs, downloads, cwd = (tmp_path / name for name in ("inputs", "downloads", "cwd"))
    for folder in (inputs, downloads, cwd):
        folder.mkdir()
    monkeypatch.chdir(cwd)
    client = MlflowClient()
    assert client.tracking_uri == mlflow_server

    # --- tracking: experiment, run, param, metric, artifact round trip. set_experiment sets a
    # process-wide active experiment (and MLFLOW_EXPERIMENT_ID): put both back afterwards, or
    # a later test's stage run in another store is refused ("active experiment ID does not
    # match")
    import mlflow.tracking.fluent

    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    experiment = mlflow.set_experiment("server-smoke")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")
    notes = inputs / "notes.json"
    notes.write_text(json.dumps({"hello": "server"}))
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.01)
        mlflow.log_metric("accuracy", 0.5, step=1)
        mlflow.log_artifact(str(notes), artifact_path="reports")
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"lr": "0.01"}
    assert stored.data.metrics == {"accuracy": 0.5}
    assert stored.info.artifact_uri.startswith("mlflow-artifacts:/")
    got = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="reports/notes.json", dst_path=str(downloads / "run")
    )
    assert json.loads(Path(got).read_text()) == {"hello": "server"}

    # --- a real ONNX model, registered from its LoggedModel (models:/<model_id>)
    onnx_path = tiny_onnx(inputs / "tiny.onnx")
    card = inputs / "model_card.json"
    card.write_text(json.dumps({"classes": ["a", "b"]}))
    with mlflow.start_run() as run:
        info = mlflow.onnx.log_model(
            onnx_model=onnx.load(str(onnx_path)),
            name="model",
            save_as_external_data=False,
            extra_files=[str(card)],
            onnx_execution_providers=["CPUExecutionProvider"],  # no CUDA on test machines
        )
    assert info.model_id and info.model_uri == f"models:/{info.model_id}"
    assert info.run_id == run.info.run_id
    logged = client.get_logged_model(info.model_id)
    assert logged.source_run_id == run.info.run_id
    assert logged.artifact_location.startswith("mlflow-artifacts:/")

    client.create_registered_model("x")
    version = client.create_model_version(
        "x", source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id
    )
    assert version.version == "1" and version.status == "READY"
    assert version.source == info.model_uri and version.run_id == run.info.run_id
    # the SQL registry store has no model_id column: ModelVersion.model_id comes back None even
    # though it was passed; the link is the source URI, the download URI (the LoggedModel's
    # artifact location) and a tag the server sets on the LoggedModel
    assert client.get_model_version("x", "1").model_id is None
    assert client.get_model_version_download_uri("x", "1") == logged.artifact_location
    linked = json.loads(client.get_logged_model(info.model_id).tags["mlflow.modelVersions"])
    assert linked == [{"name": "x", "version": 1}]  # an int here, a str in ModelVersion
    client.set_registered_model_alias("x", "champion", version.version)
    assert client.get_registered_model("x").aliases == {"champion": "1"}
    assert client.get_model_version_by_alias("x", "champion").version == "1"

    model_dir = Path(
        mlflow.artifacts.download_artifacts("models:/x@champion", dst_path=str(downloads / "model"))
    )
    assert (model_dir / "model.onnx").is_file()
    assert json.loads((model_dir / "extra_files" / "model_card.json").read_text()) == {"classes": ["a", "b"]}
    pyfunc = mlflow.pyfunc.load_model("models:/x@champion")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    prediction = pyfunc.predict(x)
    outputs = ReferenceEvaluator(str(onnx_path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(prediction["y"]), outputs, rtol=1e-5, atol=1e-6)

    # --- tags: a ~2000-character JSON value survives on both kinds of registry tag
    assert 1800 < len(ALIAS_HISTORY) < 2500
    client.set_registered_model_tag("x", "alias_history", ALIAS_HISTORY)
    client.set_model_version_tag("x", "1", "alias_history", ALIAS_HISTORY)
    assert client.get_registered_model("x").tags["alias_history"] == ALIAS_HISTORY
    assert client.get_model_version("x", "1").tags["alias_history"] == ALIAS_HISTORY
    client.delete_registered_model_tag("x", "alias_history")
    assert "alias_history" not in client.get_registered_model("x").tags

    # MLflow validates both at 100,000 characters, but registered_model_tags.value is still a
    # VARCHAR(5000) column (model_version_tags.value became TEXT in a migration), so PostgreSQL
    # refuses longer registered-model tags while model-version tags take 100,000
    client.set_registered_model_tag("x", "long", "a" * 5000)
    # psycopg StringDataRightTruncation, mapped to BAD_REQUEST (SQLite would take it)
    expect_error("BAD_REQUEST", client.set_registered_model_tag, "x", "long", "a" * 5001)
    client.set_model_version_tag("x", "1", "long", "a" * 100_000)
    assert len(client.get_model_version("x", "1").tags["long"]) == 100_000
    expect_error("INVALID_PARAMETER_VALUE", client.set_model_version_tag, "x", "1", "long", "a" * 100_001)
    expect_error("INVALID_PARAMETER_VALUE", client.set_registered_model_tag, "x", "long", "a" * 100_001)

    # --- the errors the registry code uses as a mutex / for cleanup, over HTTP
    check_registry_errors(client)

    # the client wrote nothing in its working folder: artifacts went through the server
    assert list(cwd.iterdir()) == []


def test_registry_errors_on_sqlite(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    check_registry_errors(client)
    # SQLite does not enforce VARCHAR(5000): there registered-model tags take 100,000 characters
    client.create_registered_model("x")
    client.set_registered_model_tag("x", "long", "a" * 100_000)
    assert len(client.get_registered_model("x").tags["long"]) == 100_000
    expect_error("INVALID_PARAMETER_VALUE", client.set_registered_model_tag, "x", "long", "a" * 100_001)
