import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synermix.config import Params, SourceSpec, load_params, parse_params
from synermix.errors import UserError

from .helpers import REPO_ROOT

#: params.yaml's training recipe (ImageNet MobileNetV2 fine-tuned at 160 px, short trials;
#: docs/benchmarks.md) against the library's defaults (a ResNet from scratch, which needs no
#: weights package): the only keys in which the two differ
PIPELINE_RECIPE = {
    "train": {
        "arch": "mobilenet_v2",
        "width": None,
        "init": "imagenet:IMAGENET1K_V1",
        "freeze_stages": 1,
        "image_size": 160,
        "epochs": 10,
        "lr": 0.02,
    },
    "tune": {
        "n_trials": 6,
        "epochs": 2,
        "max_per_class": 60,
        "space": {"lr": {"low": 0.005, "high": 0.05, "log": True}},
        "pruner": {"warmup_epochs": 1},
        "rerun_top_k": 2,
    },
}


def test_project_params_file_is_valid_and_matches_defaults():
    params = load_params(REPO_ROOT / "params.yaml")
    # params.yaml spells out the documented defaults, and the pipeline's recipe over them
    assert params == parse_params(PIPELINE_RECIPE)
    assert params.data == Params().data and params.gates == Params().gates
    assert params.data.source_spec == SourceSpec("elpv")


def error_of(raw) -> str:
    with pytest.raises(UserError) as info:
        parse_params(raw)
    return str(info.value)


def test_typo_in_key_is_one_line_with_suggestion():
    message = error_of({"data": {"sourc": "elpv"}})
    assert message.count("\n") == 0
    assert "unknown key 'data.sourc'" in message
    assert "did you mean 'source'" in message


def test_typo_in_nested_rule_key():
    message = error_of({"validate": {"rules": {"exposure": {"min_mea": 3}}}})
    assert "validate.rules.exposure.min_mea" in message and "min_mean" in message


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"seed": -1}, "seed = -1", "greater than or equal to 0"),
        ({"seed": "abc"}, "seed = abc", "integer"),
        ({"seed": True}, "seed = true", "integer"),
        ({"data": {"image_size": 4}}, "data.image_size = 4", "greater than or equal to 8"),
        ({"data": {"max_per_class": 1.5}}, "data.max_per_class = 1.5", "integer"),
        ({"data": {"source": "s3://bucket"}}, "data.source", "must be 'elpv', 'folder:<path>'"),
        ({"data": {"source": "folder:"}}, "data.source", "needs a path"),
        ({"data": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}}, "data.split", "sum to 1"),
        ({"data": {"classes": ["a", "a"]}}, "data.classes", "unique"),
        (
            {"validate": {"on_bad_images": "delete"}},
            "validate.on_bad_images = delete",
            "'fail' or 'quarantine'",
        ),
        (
            {"validate": {"rules": {"decodable": {"severity": "fatal"}}}},
            "severity = fatal",
            "'error', 'warning'",
        ),
        ({"validate": {"rules": {"size_limits": {"min_side": 50, "max_side": 10}}}}, "size_limits", "<="),
        ({"validate": {"rules": {"exposure": {"min_mean": 200, "max_mean": 100}}}}, "exposure", "<"),
        ({"train": {"arch": "vgg16"}}, "train.arch = vgg16", "'resnet18'"),
        ({"train": {"method": "cutmix"}}, "train.method = cutmix", "'synermix'"),
        ({"train": {"beta": 1.5}}, "train.beta = 1.5", "less than or equal to 1"),
        ({"train": {"epochs": 2, "warmup_epochs": 3}}, "train", "warmup_epochs (3.0) must be <= epochs (2)"),
        ({"train": {"batch_size": 1}}, "train.batch_size = 1", "greater than or equal to 2"),
        ({"train": {"channels": 2}}, "train.channels = 2", "'auto', 1 or 3"),
        ({"mlflow": {"tracking_uri": "file:./mlruns"}}, "mlflow.tracking_uri", "file store is not supported"),
        ({"serve": {"poll_seconds": float("inf")}}, "serve.poll_seconds", "finite number"),
        ({"serve": {"body_timeout_s": 0}}, "serve.body_timeout_s = 0", "greater than 0"),
        ({"serve": {"allowed_hosts": [""]}}, "serve.allowed_hosts", "at least 1 character"),
        ({"tune": {"seed": -1}}, "tune.seed = -1", "greater than or equal to 0"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(raw, key, fragment):
    message = error_of(raw)
    assert message.startswith("params.yaml: ")
    assert key in message
    assert fragment in message


def test_top_level_must_be_a_mapping():
    assert "mapping" in error_of(["seed", 1])


def test_source_spec_parsing():
    assert SourceSpec.parse("folder:photos/line3") == SourceSpec("folder", Path("photos/line3"))
    assert SourceSpec.parse("fashion-mnist").path is None
    assert str(SourceSpec.parse("fashion-mnist:/x").path) == "/x"


def test_load_params_reports_yaml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a folder"):
        load_params(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  source: folder:Prüfung\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_params(latin)


def test_cli_exits_2_with_one_line_on_a_typo(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["validate"]["on_bad_image"] = params["validate"].pop("on_bad_images")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "synermix.cli", "--params", str(path), "params"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown key 'validate.on_bad_image'" in lines[0]
    assert "did you mean 'on_bad_images'" in lines[0]


def test_cli_params_prints_resolved_values():
    proc = subprocess.run(
        [sys.executable, "-m", "synermix.cli", "--params", str(REPO_ROOT / "params.yaml"), "params"],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = yaml.safe_load(proc.stdout)
    assert printed["seed"] == 123 and printed["validate"]["on_bad_images"] == "fail"


def test_yaml_style_exponent_is_read_as_a_number():
    # PyYAML reads 5e-4 (no dot) as a string; the train section accepts it as the number it means
    assert parse_params({"train": {"weight_decay": "5e-4"}}).train.weight_decay == 5e-4


def test_a_key_given_twice_deep_nesting_and_a_huge_file_are_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a second gates: block silently switched
    enforce off. A 5000-deep list overflowed the stack; a 50 MB file took 95 s."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("gates:\n  enforce: true\nseed: 1\ngates:\n  enforce: false\n")
    with pytest.raises(UserError, match=r"key 'gates' appears twice in one mapping \(line 4\)"):
        load_params(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text("gates:\n  enforce: true\n  enforce: false\n")
    with pytest.raises(UserError, match="key 'enforce' appears twice"):
        load_params(inner)
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match="nested more than 32 levels"):
        load_params(deep)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 * 2**20) + "\n")
    with pytest.raises(UserError, match="is not a params file"):
        load_params(huge)
    assert load_params(REPO_ROOT / "params.yaml").seed == 123  # the project's own file still reads


def test_a_password_in_the_tracking_uri_is_refused_and_never_echoed(monkeypatch):
    """MLflow writes the tracking URI into run params, logs and errors."""
    from synermix.tracking import tracking_uri

    message = error_of({"mlflow": {"tracking_uri": "postgresql://mlflow:s3cret-pw@db/mlflow"}})
    assert "holds a password" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "s3cret-pw" not in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ci:s3cret-pw@mlflow.example")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI holds a password") as caught:
        tracking_uri(parse_params({}).mlflow)
    assert "s3cret-pw" not in str(caught.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ci@mlflow.example")  # a user alone is fine
    assert tracking_uri(parse_params({}).mlflow) == "https://ci@mlflow.example"


@pytest.mark.parametrize(
    ("decision", "words"),
    [
        ({"costs": [[0, 1], [1, 0]]}, "decision.costs = [[0, 1], [1, 0]]: must be 2 x 3"),
        ({"costs": [[0, 0.2, 1], [-1, 0.2, 0]]}, "entries must be finite and not negative"),
        ({"costs": [[0, 0.2, 1], [0, 0.2, 5]]}, "accepting a defective part must cost more"),
        ({"review_band": [0.7, 0.2]}, "bounds cross: accept_below 0.7 is above reject_from 0.2"),
        ({"review_band": [0.2, 1.5]}, "bounds must be probabilities"),
        ({"max_escape_rate": 1.5}, "decision.max_escape_rate = 1.5"),
        ({"max_review_rate": -0.1}, "decision.max_review_rate = -0.1"),
        ({"defect_classes": ["crack", "crack"]}, "lists a class twice"),
        ({"unknown": {"false_reject": 0}}, "decision.unknown.false_reject = 0"),
    ],
)
def test_bad_decision_settings_are_one_line(decision, words):
    message = error_of({"decision": decision})
    assert words in message and "\n" not in message


def test_defect_classes_must_be_declared_classes_and_null_means_the_source_s_own():
    message = error_of({"data": {"classes": ["crack", "ok"]}, "decision": {"defect_classes": ["dent"]}})
    assert "decision.defect_classes names 'dent', not in data.classes (crack, ok)" in message
    message = error_of(
        {"data": {"classes": ["crack", "ok"]}, "decision": {"defect_classes": ["crack", "ok"]}}
    )
    assert "lists every class" in message
    assert parse_params({}).defect_classes == ["likely_defective", "defective"]  # ELPV's
    assert parse_params({"data": {"source": "folder:photos"}}).defect_classes == []
    named = parse_params({"data": {"source": "folder:photos"}, "decision": {"defect_classes": ["crack"]}})
    assert named.defect_classes == ["crack"]
