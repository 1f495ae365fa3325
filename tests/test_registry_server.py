"""The same staged rollout against an MLflow tracking server on PostgreSQL with a shared
(server-proxied) artifact store, over HTTP: what a team past one machine runs."""

import pytest

from synermix import registry

from .helpers.registry import build_project, rollout_flow

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


@pytest.mark.slow  # PostgreSQL and an MLflow server: make test-slow and CI run it
def test_register_promote_rollback_over_http(tmp_path, train_project, mlflow_server):
    params, raw, uri = build_project(tmp_path, train_project, tracking_uri=mlflow_server)
    assert uri.startswith("http://")
    state = rollout_flow(tmp_path, params, raw, uri)
    c = state["client"]
    # the artifacts live with the server, not in this folder
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    version = c.get_model_version("synermix", "1")
    assert version.source.startswith("models:/") and version.tags["train_run_id"]
    run = c.get_run(version.tags["train_run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    folder = registry.download_version(c, "synermix", "1", tmp_path / "dl")
    assert (folder / "model.onnx").is_file() and registry.pytorch_files(folder) is not None
