"""Staged rollout: candidate -> pilot -> production, each move through its gates.

- The **register** stage records a version that passed its release gates and gives it
  ``candidate`` (``registry.auto_pilot: true``: ``pilot`` too).
- ``promote pilot`` takes a version that passed its gates (default: the candidate).
- ``pilot-eval`` scores the pilot version on labelled images collected at the pilot line
  and records the result on the version, next to the current production version's score
  on the same images.
- ``promote production`` takes a version that held ``pilot`` and whose pilot evidence
  meets ``registry.production_gates`` (:func:`synermix.gates.production_checks`, pure).
- ``rollback`` puts back the version that held the alias before the current one.

Every move goes through :func:`synermix.registry.move_alias`, which records who, when,
why and the previous holder. Every promotion re-reads the version's evidence from the runs
it names (:mod:`synermix.evidence`): tags that disagree with their runs fail the
``evidence_bound`` check. ``status`` shows an alias moved outside synermix as such.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from synermix import evidence, model_tags, registry
from synermix.config import Params
from synermix.errors import CheckFailed, UserError
from synermix.gates import GateResult, format_table, production_checks, verdict
from synermix.tracking import client_for

log = logging.getLogger(__name__)

PROMOTABLE = ("pilot", "production")


def holder(client: Any, name: str, alias: str, what: str) -> str:
    version = registry.aliases_of(client, name).get(alias)
    if version is None:
        raise UserError(f"no version of '{name}' holds @{alias}, so there is no {what}; {_HINTS[alias]}")
    return version


_HINTS = {
    "candidate": "run the pipeline (dvc repro) until a model passes its gates, or pass --version N",
    "pilot": "promote one first (synermix promote pilot --reason ...), or pass --version N",
    "production": "promote one first (synermix promote production --reason ...)",
}


# --------------------------------------------------------------------------- promote
def promote(params: Params, alias: str, version: str | None, reason: str, by: str | None = None) -> dict:
    """Move ``pilot`` or ``production`` to a version, after its checks; returns the record."""
    if alias not in PROMOTABLE:
        raise UserError(f"cannot promote to @{alias}: use one of {', '.join(PROMOTABLE)}")
    if not reason.strip():
        raise UserError("say why: --reason '...' is recorded with the move")
    reg = params.registry
    client = client_for(params)
    name = reg.model_name
    registry.reconcile_now(client, name, reg.lock_wait_seconds, reg.stale_lock_seconds)
    if version is None:
        source = "candidate" if alias == "pilot" else "pilot"
        version = holder(client, name, source, f"{source} to promote")
    mv = registry.get_version(client, name, version)
    tags = dict(mv.tags or {})
    problems = evidence.gate_problems(client, mv)
    if alias == "production":
        problems += evidence.pilot_problems(client, name, mv)
    if alias == "pilot":
        checks = [
            GateResult(
                gate="release_gates",
                metric="",
                rule="",
                threshold=None,
                observed=None,
                passed=model_tags.gates_passed(tags),
                about="passed its release gates at registration",
                note=_failed_gates(tags),
            )
        ]
    else:
        current = registry.aliases_of(client, name).get("production")
        checks = production_checks(tags, reg.production_gates, str(version), current)
    checks.append(
        GateResult(
            gate="evidence_bound",
            metric="",
            rule="",
            threshold=None,
            observed=None,
            passed=not problems,
            about="its tags agree with the evaluate, export and pilot-eval runs they name",
            note="; ".join(problems),
        )
    )
    table = format_table(checks)
    if not verdict(checks):
        raise CheckFailed(f"{name} version {version} cannot be promoted to @{alias}:\n{table}")
    log.info("checks for %s version %s -> @%s:\n%s", name, version, alias, table)
    move = registry.move_alias(
        client,
        name,
        alias,
        str(version),
        action="promote",
        reason=reason,
        by=by,
        wait_seconds=reg.lock_wait_seconds,
        stale_seconds=reg.stale_lock_seconds,
    )
    if move is not None:
        client.set_model_version_tag(
            name, str(version), f"alias.{alias}.checks", json.dumps({c.gate: c.status for c in checks})
        )
    return {
        "moved": move is not None,
        "version": str(version),
        "alias": alias,
        "move": move.to_dict() if move else None,
        "checks": [c.to_dict() for c in checks],
    }


def _failed_gates(version_tags: Mapping[str, str]) -> str:
    failed = model_tags.failed_gates(version_tags)
    if model_tags.gates_passed(version_tags):
        return ""
    return "failed: " + ", ".join(failed) if failed else "no passing gate verdict recorded"


def rollback(params: Params, alias: str, reason: str, by: str | None = None) -> dict:
    """Put back the version that held ``alias`` before the current holder."""
    reg = params.registry
    client = client_for(params)
    name = reg.model_name
    registry.reconcile_now(client, name, reg.lock_wait_seconds, reg.stale_lock_seconds)
    current = holder(client, name, alias, "version to roll back")
    target = registry.rollback_target(registry.alias_history(client, name, alias), current)
    if target is None:
        raise UserError(f"{name}@{alias} (version {current}) has no earlier holder to roll back to")
    registry.get_version(client, name, target)  # refuses a version deleted since
    move = registry.move_alias(
        client,
        name,
        alias,
        target,
        action="rollback",
        reason=reason or "rollback",
        by=by,
        wait_seconds=reg.lock_wait_seconds,
        stale_seconds=reg.stale_lock_seconds,
    )
    return {
        "moved": move is not None,
        "alias": alias,
        "from": current,
        "to": target,
        "move": move.to_dict() if move else None,
    }


# --------------------------------------------------------------------------- status
def status(params: Params, history: int = 10) -> dict:
    """Versions with their aliases, gates, headline metrics and pilot evidence; recent moves."""
    reg = params.registry
    client = client_for(params)
    name = reg.model_name
    registry.reconcile_now(client, name, reg.lock_wait_seconds, reg.stale_lock_seconds)
    aliases = registry.aliases_of(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in registry.list_versions(client, name):
        tags = dict(mv.tags or {})
        rows.append(
            {
                "version": str(mv.version),
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime(
                    "%Y-%m-%d %H:%M"
                ),
                "gates": {"true": "pass", "false": "FAIL"}.get(tags.get(model_tags.GATES_PASSED, ""), "-"),
                "test_accuracy": tags.get(model_tags.metric("test", "accuracy"), ""),
                "test_macro_recall": tags.get(model_tags.metric("test", "macro_recall"), ""),
                "pilot_images": tags.get(model_tags.pilot("images"), ""),
                "pilot_accuracy": tags.get(model_tags.pilot("accuracy"), ""),
                "onnx_sha256": tags.get(model_tags.ONNX_SHA256, "")[:12],
                "train_run_id": tags.get("train_run_id", ""),
            }
        )
    moves = [m.to_dict() for m in registry.alias_history(client, name)][-history:] if history else []
    # what a consumer following each alias would refuse, a move outside synermix first
    refused = {
        alias: problems
        for alias, version in sorted(aliases.items())
        if (problems := evidence.alias_problems(client, name, alias, version))
    }
    outside = {
        alias: version
        for alias, version in sorted(aliases.items())
        if alias in refused and evidence.move_state(client, name, alias, version)[0] == "outside"
    }
    return {
        "model_name": name,
        "last_pipeline": last_pipeline(client, params),
        "aliases": aliases,
        "versions": rows,
        "moves": moves,
        "moved_outside_synermix": outside,
        "refused_aliases": refused,
    }


def last_pipeline(client: Any, params: Params) -> dict[str, Any] | None:
    """The latest `dvc repro` pipeline run of the experiment: when, its stages, how it ended,
    the gates that failed (from its evaluate run) and its UI link; None when there is none."""
    from synermix.tracking import PIPELINE_ROLE, redact_uri, ui_link

    found = client.get_experiment_by_name(params.mlflow.experiment)
    if found is None:
        return None
    experiment = found.experiment_id
    runs = client.search_runs(
        [experiment],
        f"tags.synermix_role = '{PIPELINE_ROLE}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    tags = run.data.tags
    out: dict[str, Any] = {
        "run_id": run.info.run_id,
        "started": datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
        "status": run.info.status,
        "stages": tags.get("stages_ran", ""),
        "failed_stage": tags.get("failed_stage", ""),
        "gates_passed": "",
        "failed_gates": "",
        "ui": ui_link(redact_uri(client.tracking_uri), experiment, run.info.run_id),
    }
    evaluate = tags.get("run.evaluate")
    if evaluate:
        try:
            etags = client.get_run(evaluate).data.tags
        except Exception:  # a deleted child run: the parent still says how the repro ended
            etags = {}
        out["gates_passed"] = etags.get("gates_passed", "")
        out["failed_gates"] = etags.get("failed_gates", "")
    return out


def _pipeline_lines(last: Mapping[str, Any] | None) -> list[str]:
    if not last:
        return ["last pipeline run: none in this experiment yet (run dvc repro)"]
    if last["failed_stage"]:
        verdict = f"FAILED at {last['failed_stage']}"
    elif last["status"] == "RUNNING":
        verdict = "still running (or killed)"
    else:
        verdict = "finished"
    if last["gates_passed"] == "false":
        verdict += f"; gates FAILED: {last['failed_gates'] or '?'} (reports/evaluation.md)"
    elif last["gates_passed"] == "true":
        verdict += "; gates passed"
    return [
        f"last pipeline run: {last['started']} UTC, stages {last['stages'] or '-'}: {verdict}",
        f"  {last['ui']}",
    ]


def format_status(report: Mapping[str, Any]) -> str:
    """The status report as plain-text tables."""

    def table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
        cells = [[title for _, title in columns]]
        for row in rows:
            cells.append([_short(row.get(key, "")) for key, _ in columns])
        widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]

    last = report.get("last_pipeline")
    lines = [
        *_pipeline_lines(last),
        f"registered model {report['model_name']}: "
        + (", ".join(f"@{a} = v{v}" for a, v in sorted(report["aliases"].items())) or "no aliases"),
    ]
    if not report["versions"]:
        if last and last.get("gates_passed") == "false":
            why = "the last pipeline run's model failed its gates, so nothing was registered"
        elif last and last.get("failed_stage"):
            why = f"the last pipeline run failed at {last['failed_stage']} before register"
        else:
            why = "run the pipeline (dvc repro)"
        return "\n".join([*lines, f"no versions yet: {why}"])
    lines += [
        "",
        *table(
            report["versions"],
            [
                ("version", "version"),
                ("aliases", "aliases"),
                ("created", "created (UTC)"),
                ("gates", "gates"),
                ("test_accuracy", "test acc"),
                ("test_macro_recall", "test macro recall"),
                ("pilot_images", "pilot images"),
                ("pilot_accuracy", "pilot acc"),
                ("onnx_sha256", "onnx sha256"),
            ],
        ),
    ]
    for alias, problems in report.get("refused_aliases", {}).items():
        lines += [
            "",
            f"@{alias} = v{report['aliases'][alias]} is REFUSED by serve, predict, pilot-eval and bundle: "
            + "; ".join(problems),
        ]
    if report["moves"]:
        lines += [
            "",
            "recent alias moves (oldest first):",
            *table(
                report["moves"],
                [
                    ("at", "at (UTC)"),
                    ("alias", "alias"),
                    ("previous", "from"),
                    ("version", "to"),
                    ("action", "action"),
                    ("by", "by"),
                    ("reason", "reason"),
                ],
            ),
        ]
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = str(value)
    try:
        if "." in text and text.replace(".", "", 1).replace("-", "", 1).isdigit():
            return f"{float(text):.4f}"
    except ValueError:
        pass
    return text if len(text) <= 60 else text[:57] + "..."
