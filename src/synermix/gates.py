"""Release gates: thresholds from ``gates:`` in params.yaml checked against test metrics.

Pure (no MLflow, DVC or torch): the evaluate stage, the registry's promotion checks and
a pilot-line evaluation share it. Each gate yields a :class:`GateResult` with the rule,
the threshold, the observed value and the margin (positive = inside the limit), so a
report can show a quality engineer why a model passed or failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from synermix import model_tags
from synermix.config import GateParams, ProductionGates

#: (params key, metric in the report, direction, what it measures)
THRESHOLD_GATES = (
    ("min_accuracy", "accuracy", ">=", "share of test images classified correctly"),
    ("min_macro_recall", "macro_recall", ">=", "mean per-class recall (balanced accuracy)"),
    ("min_class_recall", "recall_min", ">=", "recall of the class the model misses most"),
    ("max_recall_spread", "recall_spread", "<=", "highest minus lowest per-class recall"),
    (
        "max_intra_class_variance",
        "intra_class_variance",
        "<=",
        "mean per-class feature variance / total variance",
    ),
    ("max_ece", "ece", "<=", "expected calibration error of the (calibrated) test probabilities"),
    ("max_escape_rate", "escape_rate", "<=", "share of defective parts accepted as good (escapes)"),
    ("max_overkill_rate", "overkill_rate", "<=", "share of good parts rejected (overkill)"),
    ("max_review_rate", "review_rate", "<=", "share of parts sent to a person (review band)"),
)
#: gates on the line decision: skipped (not failed) when no operating point was fitted
DECISION_METRICS = ("escape_rate", "overkill_rate", "review_rate")


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome. ``passed`` is None when the gate did not run (off, or no champion)."""

    gate: str
    metric: str
    rule: str  # ">=" or "<="
    threshold: float | None
    observed: float | None
    passed: bool | None
    about: str = ""
    note: str = ""

    @property
    def margin(self) -> float | None:
        """How far inside the limit (negative: how far outside)."""
        if self.threshold is None or self.observed is None or math.isnan(self.observed):
            return None
        if self.rule in (">=", ">"):
            return self.observed - self.threshold
        return self.threshold - self.observed

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "skipped"}[self.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "margin": self.margin, "status": self.status}


def _compare(observed: float | None, rule: str, threshold: float) -> bool:
    if observed is None or math.isnan(observed):
        return False  # a metric that could not be measured cannot vouch for the model
    if rule == ">":  # strictly above: equal to the bar does not beat it
        return observed > threshold + 1e-12
    # a rounding hair below the limit is still at the limit
    if rule == ">=":
        return observed >= threshold - 1e-12
    return observed <= threshold + 1e-12


def threshold_gates(
    metrics: Mapping[str, Any], gates: GateParams, class_names: Sequence[str]
) -> list[GateResult]:
    """The fixed thresholds against ``metrics`` (one split's report: accuracy, recall_min...)."""
    results = []
    for key, metric, rule, about in THRESHOLD_GATES:
        threshold = getattr(gates, key)
        observed = metrics.get(metric)
        observed = None if observed is None else float(observed)
        note = ""
        if metric == "recall_min" and metrics.get("worst_class", -1) >= 0:
            note = f"worst class: {class_names[metrics['worst_class']]}"
        if observed is not None and math.isnan(observed):
            note = "not measurable on this split"
        if threshold is None:
            results.append(GateResult(key, metric, rule, None, observed, None, about, "off (null in params)"))
            continue
        if metric in DECISION_METRICS and metric not in metrics:
            note = "no operating point: no defect classes declared (decision.defect_classes)"
            results.append(GateResult(key, metric, rule, threshold, None, None, about, note))
            continue
        results.append(
            GateResult(
                key, metric, rule, threshold, observed, _compare(observed, rule, threshold), about, note
            )
        )
    results.append(majority_gate(metrics, gates, class_names))
    return results


def majority_gate(metrics: Mapping[str, Any], gates: GateParams, class_names: Sequence[str]) -> GateResult:
    """The lower end of the accuracy's 95 % interval above the share of the split's largest
    class: the accuracy of answering that class every time. A model that does not clear it is
    not shown to be better than a constant answer."""
    about = "accuracy's 95 % lower bound above always answering the largest class"
    supports = {n: int(r.get("support", 0)) for n, r in (metrics.get("per_class") or {}).items()}
    total = sum(supports.values())
    low = metrics.get("accuracy_ci95_low")
    observed = None if low is None else float(low)
    if not gates.beat_majority:
        return GateResult(
            "beat_majority", "accuracy_ci95_low", ">", None, observed, None, about, "off (false in params)"
        )
    if not total:
        return GateResult(
            "beat_majority", "accuracy_ci95_low", ">", None, observed, False, about, "no test images"
        )
    largest = max(supports, key=lambda n: (supports[n], n))
    rate = supports[largest] / total
    note = f"always '{largest}' scores {rate:.4f} ({supports[largest]} of {total})"
    return GateResult(
        "beat_majority", "accuracy_ci95_low", ">", rate, observed, _compare(observed, ">", rate), about, note
    )


def slice_gates(
    slices: Sequence[Mapping[str, Any]], accuracy: float | None, gates: GateParams
) -> list[GateResult]:
    """The slices' gates (:mod:`synermix.slices`): the gap between the test accuracy and that of
    the worst slice, and the worst slice's escape rate, over slices with at least
    ``gates.slice_min_images`` test images (smaller ones are reported, not gated)."""
    big = [s for s in slices if s["images"] >= gates.slice_min_images]
    size = f"slices of at least {gates.slice_min_images} test images"
    out = []
    specs = (
        ("max_slice_accuracy_gap", "slice_accuracy_gap", "test accuracy minus the worst slice's accuracy"),
        ("max_slice_escape_rate", "slice_escape_rate", "escape rate of the worst slice"),
    )
    for key, metric, about in specs:
        threshold = getattr(gates, key)
        if threshold is None:
            out.append(GateResult(key, metric, "<=", None, None, None, about, "off (null in params)"))
            continue
        if metric == "slice_accuracy_gap":
            scored = [(accuracy - s["accuracy"], s) for s in big if accuracy is not None]
            label = "accuracy"
        else:
            scored = [(s["escape_rate"], s) for s in big if not _missing(s.get("escape_rate"))]
            label = "escape"
        if not scored:
            why = f"no {size}" if not big else "no slice has defective parts (decision.defect_classes)"
            out.append(GateResult(key, metric, "<=", threshold, None, None, about, why))
            continue
        observed, worst = max(scored, key=lambda pair: (pair[0], pair[1]["column"], pair[1]["value"]))
        value = worst["accuracy"] if label == "accuracy" else worst["escape_rate"]
        note = f"worst: {worst['column']}={worst['value']}, {label} {value:.4f} on {worst['images']} images"
        out.append(
            GateResult(
                key, metric, "<=", threshold, observed, _compare(observed, "<=", threshold), about, note
            )
        )
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def champion_gates(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    gates: GateParams,
    champion_label: str,
    skip_reason: str = "",
) -> list[GateResult]:
    """No drop beyond ``gates.champion.max_drop[m]`` against the champion, per metric ``m``.

    The rule is ``challenger[m] >= champion[m] - max_drop[m]``; both must come from the
    same test images. Without a champion (``champion`` None) each gate is skipped with
    ``skip_reason``, which the report shows.
    """
    spec = gates.champion
    if not spec.enabled:
        return [GateResult("champion", "", ">=", None, None, None, "", "off (gates.champion.enabled: false)")]
    results = []
    for metric, drop in spec.max_drop.items():
        name = f"champion_{metric}"
        about = f"{metric} at most {drop:g} below the champion ({champion_label or '@' + spec.alias})"
        observed = challenger.get(metric)
        observed = None if observed is None else float(observed)
        if champion is None:
            results.append(GateResult(name, metric, ">=", None, observed, None, about, skip_reason))
            continue
        reference = float(champion[metric])
        threshold = reference - drop
        note = f"champion {reference:.4f}"
        results.append(
            GateResult(
                name, metric, ">=", threshold, observed, _compare(observed, ">=", threshold), about, note
            )
        )
    return results


def verdict(results: Sequence[GateResult]) -> bool:
    """True when no gate failed (skipped gates do not fail)."""
    return all(r.passed is not False for r in results)


def format_table(results: Sequence[GateResult]) -> str:
    """A plain-text table for logs and the error message of a failed stage."""
    header = ("gate", "rule", "observed", "margin", "result")
    rows = [header]
    for r in results:
        rule = f"{r.metric} {r.rule} {r.threshold:.4f}" if r.threshold is not None else (r.metric or "-")
        observed = "-" if r.observed is None else f"{r.observed:.4f}"
        margin = "-" if r.margin is None else f"{r.margin:+.4f}"
        rows.append((r.gate, rule, observed, margin, r.status + (f" ({r.note})" if r.note else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


def production_checks(
    tags: Mapping[str, str],
    gates: ProductionGates,
    version: str,
    current_production: str | None,
    now: datetime | None = None,
) -> list[GateResult]:
    """The checks ``promote production`` applies to a version's tags (pure).

    The version must have passed its release gates and held ``pilot``; its latest pilot
    evaluation (``pilot_eval.*`` tags, :mod:`synermix.model_tags`) must cover
    ``min_images`` images, be younger than ``max_evidence_age_days``, meet the minimum
    accuracy / recall, and, when another version holds production, score no more than
    ``max_drop`` below it on the same images (so the comparison must have been made
    against today's production version).
    """

    def flag(gate: str, ok: bool, about: str, note: str = "") -> GateResult:
        return GateResult(
            gate=gate, metric="", rule="", threshold=None, observed=None, passed=ok, about=about, note=note
        )

    def at_least(
        gate: str, metric: str, threshold: float | None, observed: float | None, **text
    ) -> GateResult:
        ok = None if threshold is None else observed is not None and observed >= threshold
        return GateResult(
            gate=gate, metric=metric, rule=">=", threshold=threshold, observed=observed, passed=ok, **text
        )

    held_pilot = tags.get(model_tags.held("pilot"))
    results = [
        flag("release_gates", model_tags.gates_passed(tags), "passed its release gates at registration"),
        flag("held_pilot", held_pilot == "true", "held @pilot", "" if held_pilot else "never did"),
    ]
    images = model_tags.pilot_number(tags, "images")
    if images is None:
        results.append(
            flag("pilot_evidence", False, "pilot-line evaluation recorded", "none: run synermix pilot-eval")
        )
        return results
    results.append(
        at_least(
            "min_images",
            "pilot images",
            float(gates.min_images),
            images,
            about="labelled pilot images scored",
        )
    )
    if gates.max_evidence_age_days is not None:
        at = tags.get(model_tags.pilot("at"), "")
        try:
            age = (now or datetime.now(UTC)) - datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            days = age.total_seconds() / 86400
        except ValueError:
            days = math.inf
        results.append(
            GateResult(
                gate="evidence_age_days",
                metric="age (days)",
                rule="<=",
                threshold=gates.max_evidence_age_days,
                observed=days,
                passed=days <= gates.max_evidence_age_days,
                about="pilot evaluation is recent",
                note=at,
            )
        )
    for gate, metric in (
        ("min_accuracy", "accuracy"),
        ("min_macro_recall", "macro_recall"),
        ("min_class_recall", "recall_min"),
    ):
        threshold = getattr(gates, gate)
        if threshold is None:
            continue
        observed = model_tags.pilot_number(tags, metric)
        results.append(at_least(f"pilot_{gate}", metric, threshold, observed, about=f"pilot-line {metric}"))
    for gate, metric in (
        ("max_escape_rate", "escape_rate"),
        ("max_overkill_rate", "overkill_rate"),
        ("max_review_rate", "review_rate"),
    ):
        threshold = getattr(gates, gate)
        if threshold is None:
            continue
        observed = model_tags.pilot_number(tags, metric)
        # a model without an operating point (no defect classes declared) makes no such
        # decision: skipped, as the release gate is; evidence that lacks the rate fails
        no_point = tags.get(model_tags.pilot("decision_note"))
        note = ""
        if observed is None:
            note = no_point or "not measured on the pilot images: rerun synermix pilot-eval"
        results.append(
            GateResult(
                gate=f"pilot_{gate}",
                metric=metric,
                rule="<=",
                threshold=threshold,
                observed=observed,
                passed=None if observed is None and no_point else _compare(observed, "<=", threshold),
                about=f"pilot-line {metric.replace('_', ' ')} at the version's operating point",
                note=note,
            )
        )
    if not current_production or current_production == str(version):
        note = "this version holds production already" if current_production else "no production version yet"
        results.append(
            GateResult(
                gate="no_regression",
                metric="",
                rule="",
                threshold=None,
                observed=None,
                passed=None,
                about="no drop against production",
                note=note,
            )
        )
        return results
    compared = tags.get(model_tags.pilot("production_version"), "")
    if compared != current_production:
        note = (
            f"pilot-eval compared with version {compared or 'none'}, production is now {current_production}: "
            "rerun synermix pilot-eval"
        )
        results.append(flag("no_regression", False, "no drop against production", note))
        return results
    for metric, drop in gates.max_drop.items():
        reference = model_tags.pilot_number(tags, f"production_{metric}")
        observed = model_tags.pilot_number(tags, metric)
        if reference is None:
            results.append(
                at_least(
                    f"no_regression_{metric}",
                    metric,
                    None,
                    observed,
                    about="no drop against production",
                    note="production could not be scored",
                )
            )
            continue
        results.append(
            at_least(
                f"no_regression_{metric}",
                metric,
                reference - drop,
                observed,
                about=f"at most {drop:g} below production v{current_production}",
                note=f"production {reference:.4f}",
            )
        )
    return results
