"""Whether a registered version's evidence holds: read again from the MLflow runs its tags
name and from the recorded alias moves, never taken from the version's tags alone.

Anyone who can write to the registry can set a tag or an alias with one plain MLflow call.
So a version that follows an alias into use (``serve``, ``predict`` and ``pilot-eval`` on
``models:/<name>@<alias>``, ``bundle --alias``) and every ``promote`` is checked here:

- **the move is recorded**: the last move of the alias in the registry's history
  (:mod:`synermix.registry`) is to this version; an alias set outside synermix is refused;
- **the gates passed, by the evaluate run**: the version's ``evaluate_run_id`` is an
  evaluate run that finished with its gates passed, judged these weights
  (``weights_sha256``) and measured the ``metric.*`` numbers the version carries; its
  ``export_run_id`` exported this ONNX file (``onnx_sha256``);
- **for ``production``, the pilot evidence, by the pilot-eval run**: the version held
  ``pilot`` by a recorded move, and its ``pilot_eval.run_id`` is a pilot evaluation of
  this version whose image hash and numbers are the ``pilot_eval.*`` tags.

A fixed version (``models:/<name>/<n>``, ``--version N``) is the user's explicit choice and
is not checked. The evidence is as strong as the store's write permissions: the compose
stack runs MLflow with authentication (docs/registry.md).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from synermix import model_tags, registry
from synermix.errors import UserError

#: the aliases whose holders must have passed their gates; production needs pilot evidence too
GATED = ("candidate", "pilot", "production")
#: numbers a tag and its run must agree on (tags keep six decimals)
TOLERANCE = 1.01e-6


def _run(client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _number_problems(tags: dict[str, str], metrics: dict[str, float], pairs, run_label: str) -> list[str]:
    """Tags whose number is not the one the run logged."""
    problems = []
    for tag, metric in pairs:
        if tag not in tags:
            continue
        try:
            claimed = float(tags[tag])
        except ValueError:
            problems.append(f"tag {tag} is not a number ({tags[tag][:20]!r})")
            continue
        measured = metrics.get(metric)
        if measured is None:
            problems.append(f"tag {tag} = {tags[tag]} but {run_label} logged no {metric}")
        elif not (math.isnan(claimed) and math.isnan(measured)) and not abs(claimed - measured) <= TOLERANCE:
            problems.append(f"tag {tag} = {tags[tag]} is not what {run_label} measured ({measured:.6f})")
    return problems


def gate_problems(client: Any, mv: Any) -> list[str]:
    """Why the version's release verdict does not hold up against its runs ([] when it does)."""
    tags = dict(mv.tags or {})
    problems = []
    if not model_tags.gates_passed(tags):
        problems.append("its gates_passed tag is not true")
    run_id = tags.get("evaluate_run_id", "")
    run = _run(client, run_id) if run_id else None
    if run is None:
        problems.append(
            f"its evaluate run {run_id} is not in this MLflow store" if run_id else "it names no evaluate run"
        )
    else:
        label = f"evaluate run {run_id[:12]}"
        rtags, metrics = dict(run.data.tags), dict(run.data.metrics)
        if rtags.get("stage") != "evaluate":
            problems.append(f"run {run_id[:12]} named as its evaluation is not an evaluate run")
        elif (
            run.info.status != "FINISHED"
            or rtags.get("gates_passed") != "true"
            or metrics.get("gates_passed") != 1.0
        ):
            problems.append(f"its {label} did not pass its gates (status {run.info.status})")
        if rtags.get("weights_sha256", "") != tags.get("weights_sha256", "-"):
            problems.append(f"its {label} judged other weights than the version carries")
        pairs = [
            (model_tags.metric(split, m), f"{split}_{m}")
            for split in ("test", "val")
            for m in model_tags.HEADLINE
        ]
        problems += _number_problems(tags, metrics, pairs, label)
    export_id = tags.get("export_run_id", "")
    export = _run(client, export_id) if export_id else None
    if export is None:
        problems.append(
            f"its export run {export_id} is not in this MLflow store"
            if export_id
            else "it names no export run"
        )
    elif dict(export.data.tags).get("onnx_sha256") != tags.get(model_tags.ONNX_SHA256, "-"):
        problems.append(f"its export run {export_id[:12]} exported another ONNX file than onnx_sha256 names")
    return problems


def pilot_problems(client: Any, name: str, mv: Any) -> list[str]:
    """Why the version's pilot evidence does not hold up ([] when it does, or when there is
    none yet: the production gates refuse a version without evidence on their own)."""
    tags = dict(mv.tags or {})
    version = str(mv.version)
    problems = []
    held = any(m.version == version for m in registry.alias_history(client, name, "pilot"))
    if tags.get(model_tags.held("pilot")) == "true" and not held:
        problems.append("its held.pilot tag is true but no recorded move gave it @pilot")
    run_id = tags.get(model_tags.pilot("run_id"), "")
    if not run_id:
        if any(k.startswith(model_tags.PILOT_PREFIX) for k in tags):
            problems.append("its pilot_eval.* tags name no pilot-eval run")
        return problems
    run = _run(client, run_id)
    if run is None:
        return [*problems, f"its pilot-eval run {run_id} is not in this MLflow store"]
    label = f"pilot-eval run {run_id[:12]}"
    rtags = dict(run.data.tags)
    if (rtags.get("stage"), rtags.get("model_name"), rtags.get("model_version")) != (
        "pilot-eval",
        name,
        version,
    ):
        problems.append(f"run {run_id[:12]} is not a pilot evaluation of {name} version {version}")
    if run.data.params.get("images_sha256") != tags.get(model_tags.pilot("images_sha256")):
        problems.append(f"its pilot_eval.images_sha256 is not the image hash {label} recorded")
    numbers = [
        k for k in model_tags.PILOT_KEYS if k in ("images", "errors") or "accuracy" in k or "recall" in k
    ]
    numbers += ["macro_f1", "production_macro_f1"]
    problems += _number_problems(
        tags, dict(run.data.metrics), [(model_tags.pilot(k), k) for k in numbers], label
    )
    return problems


def move_state(client: Any, name: str, alias: str, version: str) -> tuple[str, str]:
    """How ``alias`` came to ``version``: ("recorded", ""), ("cut_off", why) for a synermix
    move cut off before its record, or ("outside", why) for an alias set by other means."""
    last = registry.last_move(client, name, alias)
    if last is not None and last.version == str(version):
        return "recorded", ""
    if any(
        (m.alias, m.version) == (alias, str(version)) for m in registry.pending_intents(client, name).values()
    ):
        return (
            "cut_off",
            f"its move to @{alias} was cut off before it was recorded (synermix status reconciles it)",
        )
    recorded = f"the last recorded move gave it to version {last.version}" if last else "none is recorded"
    return "outside", f"@{alias} was moved to it outside synermix ({recorded})"


def alias_problems(client: Any, name: str, alias: str, version: str) -> list[str]:
    """Why the version holding ``alias`` must not be used through it ([] when it may)."""
    state, why = move_state(client, name, alias, version)
    problems = [why] if state != "recorded" else []
    mv = registry.get_version(client, name, version)
    if alias in GATED:
        problems += gate_problems(client, mv)
    if alias == "production":
        problems += pilot_problems(client, name, mv)
        if not model_tags.pilot_number(dict(mv.tags or {}), "images"):
            problems.append("it has no pilot evidence (synermix pilot-eval)")
    return problems


def checked_alias(client: Any, name: str, alias: str, version: str | None = None) -> str:
    """The version holding ``alias`` (read here unless the caller read it: ``version``), once
    its move and evidence hold up; else a UserError naming every problem and the way out."""
    version = version or registry.aliases_of(client, name).get(alias)
    if version is None:
        raise UserError(f"no version of '{name}' holds @{alias}")
    problems = alias_problems(client, name, alias, version)
    if problems:
        raise UserError(
            f"models:/{name}@{alias} is version {version}, which is refused: {'; '.join(problems)}. "
            f"Move aliases with synermix promote / rollback (they check and record the move), "
            f"e.g. synermix rollback {alias} --reason ..., or name a version explicitly"
        )
    return version


def check_file(path: Path, mv: Any) -> None:
    """The downloaded ONNX file is the one the version's ``onnx_sha256`` names."""
    expected = dict(mv.tags or {}).get(model_tags.ONNX_SHA256)
    if not expected:
        return
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise UserError(
            f"version {mv.version} of '{mv.name}': its model.onnx (sha256 {actual[:12]}) is not the file "
            f"its onnx_sha256 tag names ({expected[:12]}); the stored model was replaced"
        )
