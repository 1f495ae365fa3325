"""The evaluate stage: models/model on the test split (and val) -> the gates' verdict,
reports/evaluation.{json,md}, the tables and figures; the champion scored beside it."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from synermix import eval_report, evidence, explain, registry, slices
from synermix import metrics as m
from synermix.config import Params
from synermix.data.transforms import Preprocessing
from synermix.errors import CheckFailed, UserError
from synermix.evaluation import json_safe, predictions_table, scalars_only, score_model, split_report
from synermix.gates import champion_gates, format_table, slice_gates, threshold_gates, verdict
from synermix.line_decision import fit_line_decision, write_decision
from synermix.metrics import mcnemar_exact
from synermix.paths import (
    DECISION_JSON,
    EVAL_DETAILS,
    EVAL_DIR,
    EVAL_METRICS,
    EVAL_REPORT,
    EVAL_TABLES,
    HEADLINE_METRICS,
    MANIFEST,
    MODEL_DIR,
    MODEL_JSON,
    PREPARED_DIR,
)
from synermix.stages.common import evaluation_rows, known_train_rows, model_identity, tag_training_run
from synermix.tracking import (
    client_for,
    flatten,
    log_effective_train_params,
    log_manifest_input,
    mlflow_run,
    publish_verdict,
    tracking_uri,
    ui_fragment,
)
from synermix.training import load_trained_model

log = logging.getLogger(__name__)


def _champion_report(params: Params, root: Path, test_rows: pd.DataFrame, challenger) -> dict:
    """The champion (the version holding gates.champion.alias) scored on the same test images."""
    spec = params.gates.champion
    name = params.registry.model_name
    if not spec.enabled:
        return {"note": "Champion comparison is off (gates.champion.enabled: false).", "skip": "off"}
    uri = tracking_uri(params.mlflow)
    client = client_for(params)
    try:
        found = registry.find_alias(client, name, spec.alias)
    except MlflowException as exc:
        raise UserError(
            f"cannot look up the champion {name}@{spec.alias} in MLflow ({uri}): {exc.message}; "
            "fix mlflow.tracking_uri / MLFLOW_TRACKING_URI, or set gates.champion.enabled: false"
        ) from None
    if found is None:
        note = (
            f"No champion: no version of registered model '{name}' holds the alias @{spec.alias} yet "
            "(a first model), so the champion gates are skipped."
        )
        log.info(note)
        return {"note": note, "skip": f"no version holds @{spec.alias}"}
    # the bar a new model must clear: never one planted by hand (it would lower the bar)
    problems = evidence.alias_problems(client, name, spec.alias, found.version)
    if problems:
        raise UserError(
            f"the champion {found.label} is refused: {'; '.join(problems)}. Move @{spec.alias} back "
            f"with synermix rollback {spec.alias} --reason ..., or set gates.champion.enabled: false"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = registry.download_version(client, found.name, found.version, Path(tmp))
        except MlflowException as exc:
            note = (
                f"{found.label}: its files could not be downloaded ({exc.message}); champion gates skipped."
            )
            log.warning(note)
            return {"note": note, "skip": f"{found.label} cannot be downloaded"}
        files = registry.pytorch_files(folder)
        if files is None:
            note = f"{found.label} has no model.json + weights.pt to score; champion gates skipped."
            log.warning(note)
            return {"note": note, "skip": f"{found.label} cannot be scored"}
        try:
            model, meta = load_trained_model(files)
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            note = f"{found.label}: its model files do not load here ({exc}); champion gates skipped."
            log.warning(note)
            return {"note": note, "skip": f"{found.label} does not load"}
    if meta.get("manifest_sha256") != challenger["manifest_sha256"]:
        # another manifest means another split: today's test images may be its training images
        note = (
            f"{found.label} was trained on another manifest (sha256 {str(meta.get('manifest_sha256'))[:12]}, "
            f"now {challenger['manifest_sha256'][:12]}): some of today's test images may have been its "
            "training images, so its score would be inflated; champion gates skipped."
        )
        log.warning(note)
        return {"note": note, "skip": f"{found.label} trained on another split"}
    if set(meta["class_names"]) != set(challenger["class_names"]):
        note = (
            f"{found.label} knows classes {', '.join(meta['class_names'])}, this model "
            f"{', '.join(challenger['class_names'])}: not comparable, champion gates skipped."
        )
        log.warning(note)
        return {"note": note, "skip": "champion has other classes"}
    log.info("scoring the champion %s on the same %d test images", found.label, len(test_rows))
    ev = params.evaluate
    scores = score_model(
        model,
        Preprocessing.from_dict(meta["preprocessing"]),
        test_rows,
        root / PREPARED_DIR,
        meta["class_names"],
        ev.batch_size,
        ev.device,
        desc="score champion",
    )
    report = split_report(scores, meta["class_names"], ev.calibration_bins)
    paired = mcnemar_exact(challenger["correct"], scores.correct)
    return {
        "label": found.label,
        "version": found.version,
        "alias": spec.alias,
        "run_id": found.run_id,
        "weights_sha256": meta.get("weights_sha256", ""),
        "metrics": {k: report[k] for k in ("accuracy", "macro_recall", "macro_f1", "recall_min")},
        "paired": {
            "only_challenger_right": paired.only_a_right,
            "only_champion_right": paired.only_b_right,
            "p_value": paired.p_value,
        },
    }


def run_evaluate(params: Params, root: Path = Path(".")) -> dict:
    """Score models/model on the test split (and val), check the gates, write the reports.

    Every report and the MLflow run are written before a failed gate stops the stage
    (exit 1); with ``gates.enforce: false`` failures are reported, not raised.
    """
    if not (root / MODEL_JSON).is_file():
        raise UserError(f"no trained model in {MODEL_DIR}; run the train stage first (dvc repro)")
    model, meta = load_trained_model(root / MODEL_DIR)
    names = list(meta["class_names"])
    val_rows, test_rows = evaluation_rows(root, names, meta.get("manifest_sha256"))
    ev = params.evaluate
    pre = Preprocessing.from_dict(meta["preprocessing"])
    image_root = root / PREPARED_DIR

    def score(rows: pd.DataFrame, split: str):
        return score_model(
            model, pre, rows, image_root, names, ev.batch_size, ev.device, desc=f"score {split}"
        )

    raw_test = score(test_rows, "test")
    raw_val = score(val_rows, "val") if len(val_rows) else None
    calibration = _calibrate(ev, raw_val, raw_test)
    temperature = calibration["temperature"]
    # every probability from here on is calibrated, as the exported model's will be; T > 0
    # leaves each argmax (accuracy, recall, the gates) exactly as it was
    test_scores = raw_test.scaled(temperature)
    test = split_report(test_scores, names, ev.calibration_bins)
    unmeasured = [n for n, row in test["per_class"].items() if not row["support"]]
    if unmeasured:
        log.warning(
            "no test image of class(es) %s: their recall is not measured and no gate covers them",
            ", ".join(unmeasured),
        )
    val = (
        split_report(raw_val.scaled(temperature), names, ev.calibration_bins) if raw_val is not None else None
    )
    train_features = None
    if params.decision.unknown.enabled:  # the unknown-part distance: centroids of the training images
        raw_train = score(known_train_rows(root, names), "train")
        train_features = (raw_train.features, raw_train.labels)
    line = fit_line_decision(
        params,
        names,
        raw_val.scaled(temperature) if raw_val is not None else None,
        test_scores,
        train_features,
    )
    test.update(line.metrics())  # escape / overkill / review rates: the gates read them here
    champion = _champion_report(
        params,
        root,
        test_rows,
        {
            "class_names": names,
            "correct": test_scores.correct,
            "manifest_sha256": meta.get("manifest_sha256", ""),
        },
    )
    predictions = predictions_table(test_scores, names, line.test_decisions, line.test_distances)
    columns = slices.slice_columns(ev.slices, params.data.source_spec.kind, list(test_rows.columns))
    by_slice = slices.slice_table(test_rows, predictions, columns, params.defect_classes)
    gates = threshold_gates(test, params.gates, names) + champion_gates(
        test, champion.get("metrics"), params.gates, champion.get("label", ""), champion.get("skip", "")
    )
    gates += slice_gates(by_slice.to_dict("records"), test.get("accuracy"), params.gates)
    passed = verdict(gates)
    enforced = params.gates.enforce

    out_dir = root / EVAL_DIR
    tables = eval_report.write_tables(out_dir, test, predictions)
    by_slice.to_csv(
        out_dir / EVAL_TABLES["slices"].name, index=False, lineterminator="\n", float_format="%.6g"
    )
    tables.append(out_dir / EVAL_TABLES["slices"].name)
    figures = eval_report.write_figures(
        out_dir,
        test,
        names,
        test_scores.features,
        test_scores.labels,
        test_scores.correct,
        display_order=eval_report.display_order(names, params.data.classes, params.data.source_spec.kind),
    )
    picked = explain.pick(predictions, params.defect_classes, ev.contact_sheet_images)
    figures += explain.write(out_dir, picked, model, pre, image_root, names)
    summary = {
        "passed": passed,
        "enforced": enforced,
        "model": model_identity(root),  # export and register refuse a verdict on other weights
        "test": scalars_only(test),
        "val": scalars_only(val) if val else {},
        "calibration": json_safe(calibration),
        "decision": line.to_summary(),
        "slices": json_safe(by_slice.to_dict("records")),
        "gates": {g.gate: json_safe({k: v for k, v in g.to_dict().items() if k != "gate"}) for g in gates},
        "champion": json_safe(
            {k: champion[k] for k in ("version", "alias", "metrics", "paired") if k in champion}
        ),
    }
    write_decision(root, line, meta["weights_sha256"])
    (root / EVAL_METRICS).parent.mkdir(parents=True, exist_ok=True)
    (root / EVAL_METRICS).write_text(json.dumps(summary, indent=2) + "\n")
    details = {
        split: {k: report[k] for k in ("confusion", "calibration", "centroid_distances")}
        for split, report in (("test", test), ("val", val))
        if report
    }
    (root / EVAL_DETAILS).write_text(
        json.dumps(json_safe({"class_names": names, **details}), indent=2) + "\n"
    )
    markdown = eval_report.render_markdown(
        passed=passed,
        enforced=enforced,
        gates=gates,
        test=test,
        val=val,
        class_names=names,
        model=meta,
        champion=champion,
        errors=predictions[~predictions["correct"]],
        max_listed_errors=ev.max_listed_errors,
        calibration_bins=ev.calibration_bins,
        temperature=calibration,
        decision=line,
        slices=by_slice,
    )
    (root / EVAL_REPORT).write_text(markdown)
    headline = eval_report.headline_metrics(test, val, passed, meta)
    (root / HEADLINE_METRICS).write_text(json.dumps(headline, indent=2) + "\n")
    table = format_table(gates)
    failure = None
    if not passed and enforced:
        failure = CheckFailed(
            f"evaluation gates failed on {test['images']} test images:\n{table}\n"
            f"full report: {root / EVAL_REPORT}. Improve the model, or change the thresholds in "
            "gates: (gates.enforce: false reports without failing)"
        )
    files = [*tables, *figures, root / EVAL_DETAILS, root / DECISION_JSON]
    results = {"summary": summary, "test": test, "val": val, "markdown": markdown, "headline": headline}
    _log_evaluation(params, root, meta, results, test_rows, names, files, failure)
    if passed:
        log.info("evaluation passed on %d test images:\n%s\nreport: %s", test["images"], table, EVAL_REPORT)
    else:
        log.warning(
            "gates FAILED (gates.enforce is false, so the stage passes):\n%s\nreport: %s", table, EVAL_REPORT
        )
    return summary


def _calibrate(ev, val, test) -> dict:
    """The temperature (fitted on val, or 1) and NLL / ECE before and after it, on val and test."""
    from synermix.calibration import fit_temperature, nll

    if not ev.calibrate:
        fit = {"temperature": 1.0, "note": "off (evaluate.calibrate: false)"}
    elif val is None:
        fit = {"temperature": 1.0, "note": "not calibrated: the val split is empty"}
    else:
        fit = fit_temperature(val.logits, val.labels).to_dict()
    t = float(fit["temperature"])
    out = {**fit, "fitted_on": "val" if ev.calibrate and val is not None else ""}
    for split, scores in (("val", val), ("test", test)):
        if scores is None or not len(scores.labels):
            continue
        for when, temp in (("before", 1.0), ("after", t)):
            out[f"{split}_nll_{when}"] = nll(scores.logits, scores.labels, temp)
            out[f"{split}_ece_{when}"] = m.calibration(
                m.softmax(scores.logits / temp), scores.labels, ev.calibration_bins
            )[0]
    log.info(
        "temperature %.4f (%s): test NLL %.4f -> %.4f, ECE %.4f -> %.4f",
        t,
        out.get("note") or f"fitted on {fit.get('fitted_on_images', 0)} val images",
        out.get("test_nll_before", math.nan),
        out.get("test_nll_after", math.nan),
        out.get("test_ece_before", math.nan),
        out.get("test_ece_after", math.nan),
    )
    return out


def _metric_key(name: str) -> str:
    """An MLflow-safe metric name part (class names are folder names and may hold anything)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _log_evaluation(
    params: Params,
    root: Path,
    meta: dict,
    results: dict,
    test_rows: pd.DataFrame,
    names: list[str],
    files: list[Path],
    failure: CheckFailed | None,
) -> None:
    """One MLflow run: gate settings, every metric, the reports and figures; links to training.
    The verdict also goes on this repro's pipeline run (:func:`_publish`).

    ``failure`` (failed gates) is raised inside the run, so it and this repro's pipeline run
    end FAILED."""
    summary, test, val = results["summary"], results["test"], results["val"]
    tags = {
        "model_run_id": str(meta.get("mlflow_run_id", "")),
        "weights_sha256": meta["weights_sha256"],
        "gates_passed": str(summary["passed"]).lower(),
        # which gates failed, by name: what `synermix status` and the MLflow UI show first
        "failed_gates": ",".join(_failed_gates(summary)),
        "champion_version": str(summary["champion"].get("version", "")),
    }
    with mlflow_run(params, "evaluate", root, tags) as run:
        mlflow.log_params(
            flatten(
                {
                    "evaluate": params.evaluate.model_dump(mode="json"),
                    "gates": params.gates.model_dump(mode="json"),
                }
            )
        )
        values: dict[str, float] = {}
        for split, report in (("test", test), ("val", val)):
            if not report:
                continue
            for key, value in scalars_only(report).items():
                if key == "worst_class":  # an index: the class name is a tag
                    continue
                if isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
                    values[f"{split}_{key}"] = float(value)
            mlflow.set_tag(f"{split}_worst_class", str(report.get("worst_class_name", "")))
            for name, row in report["per_class"].items():
                for key in ("precision", "recall", "f1", "cohesion"):
                    value = row[key]
                    if value is not None and not math.isnan(value):
                        values[f"{split}_{key}.{_metric_key(name)}"] = float(value)
        for row in summary["slices"]:
            for key in ("accuracy", "escape_rate", "overkill_rate"):
                if row[key] is not None:
                    name = _metric_key(f"{row['column']}.{row['value']}")
                    values[f"test_slice_{key}.{name}"] = float(row[key])
        for gate, result in summary["gates"].items():
            if result["margin"] is not None:
                values[f"gate_margin.{gate}"] = float(result["margin"])
        values["gates_passed"] = float(summary["passed"])
        for key, value in (summary.get("calibration") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                values[f"calibration.{key}"] = float(value)
        mlflow.log_metrics(values)
        mlflow.log_artifact(str(root / EVAL_REPORT))
        mlflow.log_artifact(str(root / EVAL_METRICS))
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        log_manifest_input(test_rows, root / MANIFEST, "test")
        mlflow.log_artifact(str(root / HEADLINE_METRICS))
        _publish(params, run, meta, results)
        tags = {"evaluation_run_id": run.info.run_id, "gates_passed": str(summary["passed"]).lower()}
        tag_training_run(params, meta, tags)
        if failure is not None:
            raise failure


def _failed_gates(summary: dict) -> list[str]:
    """The names of the gates that failed, in the gate table's order."""
    return [g for g, r in summary["gates"].items() if r["status"] == "FAIL"]


def _verdict_name(summary: dict) -> str:
    """``PASSED`` | ``gates FAILED (min_accuracy, beat_majority)`` (``; not enforced``)."""
    if summary["passed"]:
        return "PASSED"
    failed = ", ".join(_failed_gates(summary))
    return f"gates FAILED ({failed}{'' if summary['enforced'] else '; not enforced'})"


def _publish(params: Params, run, meta: dict, report: dict) -> None:
    """The verdict where a person looks first: the top of evaluation.md (with links to the
    runs behind it) as the description of this run and of the pipeline run; on the
    pipeline run, the headline metrics, ``failed_gates``, a name carrying the verdict, the
    training values the model was trained with, and the training run even when an earlier
    repro trained the model."""
    store = client_for(params)
    summary = report["summary"]
    experiment = run.info.experiment_id
    parent = run.data.tags.get("pipeline_run_id", "")
    stage_runs = store.get_run(parent).data.tags if parent else {}
    train_run = str(meta.get("mlflow_run_id") or "")
    links = {stage: stage_runs.get(f"run.{stage}", "") for stage in ("prepare", "validate", "tune")}
    links |= {"train (the model)": train_run, "evaluate": run.info.run_id}
    if parent:
        links["the pipeline run"] = parent
    lines = [f"- {name}: [{rid[:8]}]({ui_fragment(experiment, rid)})" for name, rid in links.items() if rid]
    description = eval_report.verdict_section(report["markdown"]) + "\n## Runs\n\n" + "\n".join(lines) + "\n"
    failed = ",".join(_failed_gates(summary))
    tags = {"failed_gates": failed, "gates_passed": str(summary["passed"]).lower(), "model_run_id": train_run}
    if train_run:
        with contextlib.suppress(MlflowException):  # a deleted training run: model.json still names it
            tags["model_pipeline_run_id"] = store.get_run(train_run).data.tags.get("pipeline_run_id", "")
    headline = {k: v for k, v in report["headline"].items() if k in eval_report.PIPELINE_HEADLINE}
    publish_verdict(
        store,
        run.info.run_id,
        verdict=_verdict_name(summary),
        description=description,
        metrics=headline,
        tags=tags,
    )
    tuned = (meta.get("tuned") or {}).get("params") or {}
    used = {k: meta[k] for k in ("beta", "lr", "inter_method") if k in meta} | tuned
    origin = "model.json of the training run " + train_run + (" (tuned)" if tuned else "")
    log_effective_train_params(store, run.info.run_id, used, origin)
