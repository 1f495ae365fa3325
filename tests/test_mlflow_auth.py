"""The release policy on MLflow's basic auth (``mlflow server --app-name synermix-auth``):
the rules one by one, then a real server on loopback with three users (team, release,
read-only) doing what synermix does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from synermix.mlflow_auth import refusal, role_of

from .helpers.mlflow_server import running_mlflow_server

OPEN = frozenset({"candidate"})
DOCKER = Path(__file__).resolve().parents[1] / "docker"


def refused(role, action, method="POST", current=None, **params):
    return refusal(role, method, action, params, OPEN, lambda name, key: current)


def intent(alias: str) -> str:
    return json.dumps({"alias": alias, "version": "3", "action": "promote"})


def test_roles_by_name_admins_release():
    env = {"SYNERMIX_RELEASE_USERS": "qa-lead, anna", "SYNERMIX_READ_ONLY_USERS": "line3"}
    assert role_of("anna", False, env) == "release"
    assert role_of("admin", True, env) == "release"
    assert role_of("line3", False, env) == "read-only"
    assert role_of("pipeline", False, env) == "team"
    assert role_of("qa", False, {}) == "team"


@pytest.mark.parametrize(
    ("action", "params", "current"),
    [
        ("SetRegisteredModelAlias", {"name": "synermix", "alias": "candidate", "version": "3"}, None),
        ("DeleteRegisteredModelAlias", {"name": "synermix", "alias": "candidate"}, None),
        (
            "SetRegisteredModelTag",
            {"name": "synermix", "key": "alias_intent.ab", "value": intent("candidate")},
            None,
        ),
        (
            "SetRegisteredModelTag",
            {"name": "synermix", "key": "alias_log.1.ab", "value": intent("candidate")},
            None,
        ),
        ("DeleteRegisteredModelTag", {"name": "synermix", "key": "alias_intent.ab"}, intent("candidate")),
        ("SetModelVersionTag", {"name": "synermix", "version": "3", "key": "alias.candidate.at"}, None),
        ("SetModelVersionTag", {"name": "synermix", "version": "3", "key": "held.candidate"}, None),
        ("DeleteRegisteredModel", {"name": "synermix.alias-lock"}, None),
        ("DeleteRegisteredModel", {"name": "synermix.alias-lock.break"}, None),
        (
            "CreateModelVersion",
            {"name": "synermix", "tags": [{"key": "gates_passed", "value": "true"}]},
            None,
        ),
        ("CreateRun", {"experiment_id": "1"}, None),
        (None, {}, None),  # an artifact upload
    ],
)
def test_the_team_registers_and_moves_candidate(action, params, current):
    assert refused("team", action, current=current, **params) is None


@pytest.mark.parametrize(
    ("action", "params", "current", "named"),
    [
        (
            "SetRegisteredModelAlias",
            {"name": "synermix", "alias": "production", "version": "3"},
            None,
            "moving @production of 'synermix'",
        ),
        ("DeleteRegisteredModelAlias", {"name": "synermix", "alias": "pilot"}, None, "moving @pilot"),
        (
            "SetRegisteredModelTag",
            {"name": "synermix", "key": "alias_intent.ab", "value": intent("production")},
            None,
            "recording a move of @production",
        ),
        (
            "SetRegisteredModelTag",
            {"name": "synermix", "key": "alias_log.1.ab", "value": "not json"},
            None,
            "recording a move of @?",
        ),
        (
            "DeleteRegisteredModelTag",
            {"name": "synermix", "key": "alias_intent.ab"},
            intent("pilot"),
            "finishing a move of @pilot",
        ),
        ("SetRegisteredModelTag", {"name": "synermix", "key": "owner", "value": "x"}, None, "(tag 'owner')"),
        (
            "DeleteRegisteredModelTag",
            {"name": "synermix", "key": "alias_log.1.ab"},
            intent("candidate"),
            "DeleteRegisteredModelTag on 'synermix'",
        ),
        (
            "SetModelVersionTag",
            {"name": "synermix", "version": "3", "key": "gates_passed"},
            None,
            "tag 'gates_passed' on 'synermix' version 3",
        ),
        (
            "SetModelVersionTag",
            {"name": "synermix", "version": "3", "key": "held.production"},
            None,
            "held.production",
        ),
        (
            "SetModelVersionTag",
            {"name": "synermix", "version": "3", "key": "alias.candidatex.at"},
            None,
            "candidatex",
        ),
        (
            "DeleteModelVersionTag",
            {"name": "synermix", "version": "3", "key": "pilot_eval.run_id"},
            None,
            "pilot_eval.run_id",
        ),
        ("DeleteRegisteredModel", {"name": "synermix"}, None, "DeleteRegisteredModel on 'synermix'"),
        ("DeleteModelVersion", {"name": "synermix", "version": "3"}, None, "DeleteModelVersion"),
        ("RenameRegisteredModel", {"name": "synermix", "new_name": "x"}, None, "RenameRegisteredModel"),
    ],
)
def test_release_actions_are_the_release_roles(action, params, current, named):
    why = refused("team", action, current=current, **params)
    assert why is not None and named in why and "SYNERMIX_RELEASE_USERS" in why
    assert refused("release", action, current=current, **params) is None


def test_read_only_users_only_read():
    for action, method in [
        ("GetRegisteredModel", "GET"),
        ("SearchRuns", "POST"),
        ("ListArtifacts", "GET"),
        (None, "GET"),
        ("GraphQL", "POST"),  # the UI's run pages: queries and searches only
    ]:
        assert refused("read-only", action, method) is None
    for action in ["CreateRun", "LogBatch", "SetRegisteredModelAlias", "CreateModelVersion", None]:
        why = refused("read-only", action, "POST", name="synermix", alias="candidate")
        assert why is not None and "read-only" in why


# --------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """``mlflow server --app-name synermix-auth`` on SQLite, with the stack's auth ini; users
    ``pipeline`` (team), ``qa`` (release) and ``line3`` (read-only) created by the admin."""
    root = tmp_path_factory.mktemp("auth-server")
    ini = (DOCKER / "mlflow-auth.ini").read_text()
    ini = ini.replace("sqlite:////var/lib/mlflow-auth/basic_auth.db", f"sqlite:///{root / 'auth.db'}")
    assert str(root / "auth.db") in ini
    (root / "auth.ini").write_text(ini)
    secrets = {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-test-password-1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        "SYNERMIX_RELEASE_USERS": "qa",
        "SYNERMIX_READ_ONLY_USERS": "line3",
    }
    server = running_mlflow_server(
        root, f"sqlite:///{root / 'mlflow.db'}", app_name="synermix-auth", env=secrets, probe_api=False
    )
    with server as uri:
        # the stack's one-shot user setup, twice: the second run changes nothing
        setup = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SYNERMIX_"))},
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": "admin-test-password-1",
            **{f"PW_{user.upper()}": f"{user}-password-1" for user in ("pipeline", "qa", "line3")},
        }
        specs = ["pipeline=PW_PIPELINE", "qa=PW_QA", "line3=PW_LINE3"]
        for expected in ("users created: pipeline, qa, line3", "users created: none"):
            done = subprocess.run(
                [str(Path(sys.executable).parent / "synermix-mlflow-users"), "users", *specs],
                env=setup, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr
        yield uri


@pytest.mark.integration
@pytest.mark.slow  # starts an MLflow server with auth (~40 s here): run by make test-slow and CI
def test_only_the_release_role_moves_pilot_and_production(auth_server, monkeypatch, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    from synermix import registry
    from synermix.tracking import client

    def as_user(user: str):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", f"{user}-password-1")
        return client(auth_server)

    def denied(call, *args, **kwargs) -> str:
        with pytest.raises(MlflowException) as caught:
            call(*args, **kwargs)
        assert caught.value.error_code == "PERMISSION_DENIED", caught.value
        return caught.value.message

    # no credentials: MLflow's own auth answers 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(auth_server + "/api/2.0/mlflow/registered-models/search", timeout=10)
    assert anonymous.value.code == 401

    # the pipeline registers a version with tags and moves @candidate the way register does
    c = as_user("pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
    experiment = c.create_experiment("auth-test")
    (tmp_path / "weights.txt").write_text("not a model")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(tmp_path / "weights.txt"), artifact_path="model")
    registry.ensure_model(c, "synermix")
    mv = c.create_model_version(
        "synermix", f"{run.info.artifact_uri}/model", run.info.run_id, tags={"gates_passed": "true"}
    )
    v = str(mv.version)
    assert registry.move_alias(c, "synermix", "candidate", v, action="register", reason="t") is not None
    assert registry.aliases_of(c, "synermix") == {"candidate": v}
    # ... but not @production: the intent is refused first, so nothing moves and the lock is freed
    message = denied(registry.move_alias, c, "synermix", "production", v, action="promote", reason="t")
    assert "pipeline: recording a move of @production of 'synermix' is a release action" in message
    assert "production" not in registry.aliases_of(c, "synermix")
    assert registry.get_model(c, "synermix.alias-lock") is None
    assert not registry.pending_intents(c, "synermix")
    # nor by one plain MLflow call, nor a forged tag, nor deleting the model
    assert "moving @production" in denied(c.set_registered_model_alias, "synermix", "production", v)
    assert "tag 'pilot_eval.images'" in denied(
        c.set_model_version_tag, "synermix", v, "pilot_eval.images", "99"
    )
    assert "DeleteRegisteredModel on 'synermix'" in denied(c.delete_registered_model, "synermix")

    # the release user moves @production (and the line reads it)
    qa = as_user("qa")
    assert registry.move_alias(qa, "synermix", "production", v, action="promote", reason="t", by="qa")
    assert registry.last_move(qa, "synermix", "production").version == v
    line = as_user("line3")
    assert registry.aliases_of(line, "synermix") == {"candidate": v, "production": v}
    assert line.get_model_version("synermix", v).tags["gates_passed"] == "true"
    assert "read-only" in denied(line.create_experiment, "line-writes")
    assert "read-only" in denied(
        registry.move_alias, line, "synermix", "candidate", v, action="x", reason="t"
    )
