"""The vocabulary of a registered model version's tags, written and read in one place.

The register stage writes the release verdict and evidence (:func:`synermix.stages.register`),
``pilot-eval`` the pilot-line evidence, :mod:`synermix.registry` the alias marks; the
production gates (:func:`synermix.gates.production_checks`), ``synermix status`` and the
bundle's model card read them back. Values are strings (MLflow tags); numbers are
written with six decimals.

- ``gates_passed``: ``true`` / ``false``, the evaluate stage's verdict.
- ``gate.<gate>`` (PASS / FAIL / SKIP), ``gate.<gate>.observed``, ``gate.<gate>.threshold``.
- ``metric.<split>_<metric>`` for the :data:`HEADLINE` metrics of test and val.
- ``onnx_sha256``: the registered file's hash (a re-run of register finds its version by it).
- ``pilot_eval.<key>``: the latest pilot-line evaluation (:data:`PILOT_KEYS`).
- ``held.<alias>``: ``true`` once the version held that alias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GATES_PASSED = "gates_passed"
ONNX_SHA256 = "onnx_sha256"
GATE_PREFIX = "gate."
METRIC_PREFIX = "metric."
PILOT_PREFIX = "pilot_eval."
HELD_PREFIX = "held."
DVC_LOCK_PREFIX = "dvc_lock."

#: the test / val metrics a version carries as ``metric.*`` tags
HEADLINE = (
    *("accuracy", "macro_recall", "macro_f1", "recall_min", "intra_class_variance", "ece"),
    *("escape_rate", "overkill_rate", "review_rate", "unknown_rate"),
)

#: what ``pilot-eval`` records on the version (``pilot_eval.<key>``)
PILOT_KEYS = (
    "run_id",
    "at",
    "by",
    "folder",
    "images",
    "errors",
    "accuracy",
    "macro_recall",
    "macro_f1",
    "recall_min",
    "escape_rate",
    "overkill_rate",
    "review_rate",
    "unknown_rate",
    "decision_note",
    "images_sha256",
    "production_version",
    "production_accuracy",
    "production_macro_recall",
    "production_macro_f1",
    "production_recall_min",
    "production_note",
)


def number(value: float) -> str:
    """A metric as a tag value."""
    return f"{float(value):.6f}"


def gate(name: str, part: str | None = None) -> str:
    """``gate.<name>`` (the status) or ``gate.<name>.<part>`` (observed / threshold)."""
    return f"{GATE_PREFIX}{name}" + (f".{part}" if part else "")


def metric(split: str, name: str) -> str:
    return f"{METRIC_PREFIX}{split}_{name}"


def pilot(key: str) -> str:
    return f"{PILOT_PREFIX}{key}"


def held(alias: str) -> str:
    return f"{HELD_PREFIX}{alias}"


def gates_passed(tags: Mapping[str, str]) -> bool:
    return tags.get(GATES_PASSED) == "true"


def failed_gates(tags: Mapping[str, str]) -> list[str]:
    """The release gates recorded as FAIL, sorted."""
    return sorted(
        key.removeprefix(GATE_PREFIX)
        for key, value in tags.items()
        if key.startswith(GATE_PREFIX) and value == "FAIL"
    )


def group(tags: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The tags under ``prefix``, prefix removed, sorted by key."""
    return {k.removeprefix(prefix): v for k, v in sorted(tags.items()) if k.startswith(prefix)}


def gates_of(tags: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{gate: {"status": …, "observed": …, "threshold": …}}`` from the ``gate.*`` tags."""
    gates: dict[str, dict[str, str]] = {}
    for key, value in group(tags, GATE_PREFIX).items():
        name, _, field = key.partition(".")
        gates.setdefault(name, {})[field or "status"] = value
    return gates


def pilot_number(tags: Mapping[str, str], key: str) -> float | None:
    """A number of the recorded pilot evaluation; None when absent or not a number."""
    try:
        return float(tags[pilot(key)])
    except (KeyError, ValueError):
        return None


def pilot_value(value: Any) -> str:
    """A pilot-evaluation value as a tag value."""
    return number(value) if isinstance(value, float) else str(value)
