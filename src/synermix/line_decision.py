"""The evaluate stage's line decision: the operating point fitted on val, the unknown-part
distance fitted on train and val, their rates on test; stored in models/decision for export.

``models/decision/decision.json`` holds the operating point (:mod:`synermix.decision`) and
the unknown-part threshold; ``models/decision/novelty.npz`` the class centroids and the
whitening map of the shared covariance (:mod:`synermix.novelty`). The export stage builds
both into the ONNX model, so predict, serve, pilot-eval and the bundle decide the same way.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synermix import decision as dc
from synermix.config import Params
from synermix.errors import UserError
from synermix.evaluation import Scores, json_safe
from synermix.novelty import Novelty, fit_novelty, fit_threshold
from synermix.paths import DECISION_DIR, DECISION_JSON, MODEL_DIR, NOVELTY_NPZ

log = logging.getLogger(__name__)


@dataclass
class LineDecision:
    """What evaluate fitted and measured; ``point`` / ``novelty`` None when switched off."""

    point: dc.OperatingPoint | None
    novelty: Novelty | None
    unknown_above: float | None
    unknown: dict[str, Any] = field(default_factory=dict)
    #: test-split rates (decision.decision_rates), {} when there is no operating point
    test: dict[str, Any] = field(default_factory=dict)
    val: dict[str, Any] = field(default_factory=dict)
    test_decisions: list[str] = field(default_factory=list)
    test_distances: np.ndarray | None = None
    note: str = ""

    def metrics(self) -> dict[str, float | None]:
        """Headline test figures for the gates and dvc metrics."""
        out = dc.rate_metrics(self.test) if self.test else {}
        if self.unknown:
            out["unknown_false_reject_rate"] = self.unknown.get("test_false_reject_rate")
        return out

    def to_summary(self) -> dict[str, Any]:
        return json_safe(
            {
                "operating_point": None if self.point is None else self.point.to_dict(),
                "unknown": self.unknown or None,
                "test": _brief(self.test),
                "val": _brief(self.val),
                "note": self.note,
            }
        )


def _brief(rates: dict[str, Any]) -> dict[str, Any]:
    """The rates without per-class rows (reports/evaluation.json stays readable)."""
    if not rates:
        return {}
    out = {k: rates[k] for k in ("images", "escape", "overkill", "review", "unknown")}
    out["per_class"] = {
        name: {
            row["error_kind"]: row["error"]["rate"],
            "review": row["review"]["rate"],
            "images": row["images"],
        }
        for name, row in rates["per_class"].items()
    }
    return out


def fit_line_decision(
    params: Params,
    names: list[str],
    val: Scores | None,
    test: Scores,
    train_features: tuple[np.ndarray, np.ndarray] | None,
) -> LineDecision:
    """Fit the operating point (val) and the unknown-part distance (train, threshold on val);
    measure both on test. ``val`` / ``test`` carry calibrated logits. A bad setting or an
    infeasible limit stops with one line (UserError, exit 2)."""
    spec = params.decision
    novelty = unknown_above = val_d = test_d = None  # distances: computed once, used below
    unknown: dict[str, Any] = {}
    if spec.unknown.enabled and train_features is not None and val is not None and len(val.labels):
        features, labels = train_features
        try:
            novelty = fit_novelty(features, labels, len(names), spec.unknown.shrinkage)
        except ValueError as exc:
            raise UserError(f"decision.unknown: {exc}; or set decision.unknown.enabled: false") from None
        val_d = novelty.distances(val.features)
        unknown_above = fit_threshold(val_d, spec.unknown.false_reject)
        test_d = novelty.distances(test.features)
        unknown = {
            "threshold": unknown_above,
            "false_reject_target": spec.unknown.false_reject,
            "fitted_on_train_images": novelty.images,
            "threshold_fitted_on_val_images": len(val_d),
            "shrinkage": spec.unknown.shrinkage,
            "val_false_reject_rate": float((val_d > unknown_above).mean()),
            "test_false_reject_rate": float((test_d > unknown_above).mean()),
            "test_distance_median": float(np.median(test_d)),
        }
        log.info(
            "unknown-part distance: threshold %.4g (val false-reject %.4f), test false-reject %.4f",
            unknown_above,
            unknown["val_false_reject_rate"],
            unknown["test_false_reject_rate"],
        )
    elif spec.unknown.enabled:
        unknown = {"note": "not fitted: no val images"}
    defects = params.defect_classes
    if not defects:
        note = (
            "no decision: no defect classes (decision.defect_classes is empty, or null for a source "
            "without its own); class labels only, decision gates skipped. Name the defect classes "
            "in decision.defect_classes"
        )
        log.info(note)
        decisions = dc.decide(None, unknown_above, test.probabilities, test_d)
        return LineDecision(
            None, novelty, unknown_above, unknown, test_decisions=decisions, test_distances=test_d, note=note
        )
    try:
        dc.check_defect_classes(defects, names, "decision.defect_classes")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if spec.review_band is not None:
        low, high = spec.review_band
        point = dc.OperatingPoint(
            names,
            list(defects),
            low,
            high,
            fit={"fitted_on": "", "fixed": "decision.review_band"},
        )
    else:
        if val is None or not len(val.labels):
            raise UserError(
                "decision: the val split is empty, so no operating point can be fitted; "
                "give val images (data.split) or fix the thresholds with decision.review_band"
            )
        try:
            point = dc.fit_operating_point(
                val.probabilities,
                val.labels,
                names,
                defects,
                max_escape_rate=spec.max_escape_rate,
                max_overkill_rate=spec.max_overkill_rate,
                max_review_rate=spec.max_review_rate,
                review=spec.review,
                costs=spec.costs,
            )
        except dc.Infeasible as exc:
            raise UserError(str(exc)) from None
    val_rates = {}
    if val is not None and len(val.labels):
        val_rates = dc.decision_rates(
            point, dc.decide(point, unknown_above, val.probabilities, val_d), val.labels
        )
    decisions = dc.decide(point, unknown_above, test.probabilities, test_d)
    rates = dc.decision_rates(point, decisions, test.labels)
    log.info(
        "operating point: accept P(defect) < %.4f, review up to %.4f; test escape %.4f, overkill %.4f, "
        "review %.4f, unknown %.4f",
        point.accept_below,
        point.reject_from,
        rates["escape"]["rate"],
        rates["overkill"]["rate"],
        rates["review"]["rate"],
        rates["unknown"]["rate"],
    )
    return LineDecision(point, novelty, unknown_above, unknown, rates, val_rates, decisions, test_d)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_decision(root: Path, line: LineDecision, weights_sha256: str) -> None:
    """models/decision/{decision.json, novelty.npz} (each written atomically)."""
    out = root / DECISION_DIR
    out.mkdir(parents=True, exist_ok=True)
    stored = {
        "weights_sha256": weights_sha256,
        "operating_point": None if line.point is None else line.point.to_dict(),
        "unknown_above": line.unknown_above,
        "unknown": line.unknown or None,
    }
    _atomic_write(root / DECISION_JSON, (json.dumps(json_safe(stored), indent=2) + "\n").encode())
    if line.novelty is not None:
        import io

        buffer = io.BytesIO()
        np.savez(
            buffer,
            centroids=line.novelty.centroids,
            whitening=line.novelty.whitening,
            images=np.int64(line.novelty.images),
            shrinkage=np.float64(line.novelty.shrinkage),
        )
        _atomic_write(root / NOVELTY_NPZ, buffer.getvalue())
    else:
        (root / NOVELTY_NPZ).unlink(missing_ok=True)


@dataclass(frozen=True)
class StoredDecision:
    point: dc.OperatingPoint | None
    unknown_above: float | None
    novelty: Novelty | None


def read_decision(root: Path, class_names: list[str], weights_sha256: str) -> StoredDecision:
    """What evaluate stored for these weights; no file: no decision (a model exported unevaluated)."""
    path = root / DECISION_JSON
    if not path.is_file():
        log.warning("no %s: exporting without an operating point or unknown-part distance", DECISION_JSON)
        return StoredDecision(None, None, None)
    fix = f"rerun the evaluate stage (dvc repro); it writes {DECISION_JSON}"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; {fix}")
    if data.get("weights_sha256") != weights_sha256:
        raise UserError(f"{path} was fitted for other weights than {MODEL_DIR}'s; {fix}")
    try:
        point = data.get("operating_point")
        point = None if point is None else dc.OperatingPoint.from_dict(point, class_names)
        unknown_above = dc.check_unknown_above(data.get("unknown_above"))
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; {fix}") from None
    novelty = None
    if unknown_above is not None:
        try:
            with np.load(root / NOVELTY_NPZ) as npz:
                novelty = Novelty(
                    np.asarray(npz["centroids"], dtype=np.float64),
                    np.asarray(npz["whitening"], dtype=np.float64),
                    int(npz["images"]),
                    float(npz["shrinkage"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"{root / NOVELTY_NPZ}: cannot be read ({exc}); {fix}") from None
        if novelty.centroids.shape[0] != len(class_names):
            raise UserError(
                f"{root / NOVELTY_NPZ} holds {novelty.centroids.shape[0]} class centroids, the model "
                f"has {len(class_names)} classes; {fix}"
            )
    return StoredDecision(point, unknown_above, novelty)
