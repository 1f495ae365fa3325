"""The evaluate stage's reports: CSV tables DVC plots, PNG figures, and the verdict page.

Pure rendering from already computed numbers (no MLflow, DVC or model code):
``reports/evaluation.md`` is written for a quality engineer: the verdict first, then each
gate with its threshold, observed value and margin, then the numbers behind them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synermix.gates import GateResult
from synermix.metrics import project_2d
from synermix.paths import EVAL_FIGURES, EVAL_TABLES

# the file names of the evaluate stage's tables and figures (their paths: synermix.paths)
PREDICTIONS_CSV = EVAL_TABLES["predictions"].name
PER_CLASS_CSV = EVAL_TABLES["per_class"].name
CALIBRATION_CSV = EVAL_TABLES["calibration"].name
FIGURES = tuple(path.name for path in EVAL_FIGURES.values())


def per_class_table(report: Mapping[str, Any]) -> pd.DataFrame:
    rows = [{"class": name, **values} for name, values in report["per_class"].items()]
    return pd.DataFrame(
        rows, columns=["class", "support", "precision", "recall", "f1", "cohesion", "silhouette"]
    )


def write_tables(out_dir: Path, report: Mapping[str, Any], predictions: pd.DataFrame) -> list[Path]:
    """predictions.csv (confusion plot), per_class.csv (bars), calibration.csv (reliability)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {"index": False, "lineterminator": "\n", "float_format": "%.6g"}
    paths = [out_dir / PREDICTIONS_CSV, out_dir / PER_CLASS_CSV, out_dir / CALIBRATION_CSV]
    predictions.to_csv(paths[0], **options)
    per_class_table(report).to_csv(paths[1], **options)
    columns = ["bin_low", "bin_high", "images", "confidence", "accuracy"]
    pd.DataFrame(report["calibration"], columns=columns).to_csv(paths[2], **options)
    return paths


#: reports/metrics.json, in this order: the test figures a line acts on, val beside them,
#: the verdict, and the training values that produced the model
HEADLINE_TEST = (
    "accuracy",
    "accuracy_ci95_low",
    "macro_recall",
    "recall_min",
    "escape_rate",
    "overkill_rate",
    "review_rate",
    "unknown_rate",
    "ece",
)
#: the ones the pipeline's MLflow run shows in its metrics column
PIPELINE_HEADLINE = (
    "test_accuracy",
    "test_macro_recall",
    "test_recall_min",
    "test_escape_rate",
    "test_overkill_rate",
    "test_review_rate",
    "test_ece",
    "gates_passed",
)


def headline_metrics(
    test: Mapping[str, Any], val: Mapping[str, Any] | None, passed: bool, model: Mapping[str, Any]
) -> dict[str, float | None]:
    """The 15 numbers of reports/metrics.json (None where a figure is not measured, e.g. the
    line's rates without defect classes)."""

    def number(value: Any) -> float | None:
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return None if math.isnan(value) else round(float(value), 6)

    out: dict[str, float | None] = {f"test_{k}": number(test.get(k)) for k in HEADLINE_TEST}
    out["val_accuracy"] = number((val or {}).get("accuracy"))
    out["val_macro_recall"] = number((val or {}).get("macro_recall"))
    out["gates_passed"] = 1.0 if passed else 0.0
    out["train_beta"] = number(model.get("beta"))
    out["train_lr"] = number(model.get("lr"))
    out["train_selected_epoch"] = number(model.get("selected_epoch"))
    return out


def verdict_section(markdown: str) -> str:
    """The top of reports/evaluation.md: title, model and data, the line's rates and the gate
    table (everything before the first section after "## Gates")."""
    lines = markdown.splitlines()
    seen_gates = False
    for i, line in enumerate(lines):
        if line.startswith("## "):
            if seen_gates:
                return "\n".join(lines[:i]).rstrip() + "\n"
            seen_gates = line.strip() == "## Gates"
    return markdown


def row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix as shares of its actual class (a row of zeros stays 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def display_order(class_names: Sequence[str], declared: Sequence[str], source_kind: str) -> list[str]:
    """The order a person reads the classes in: data.classes when declared, ELPV's from sound
    to defective, else the model's own (sorted) order."""
    from synermix.data.sources import ELPV_CLASSES

    for wanted in (list(declared), list(ELPV_CLASSES.values()) if source_kind == "elpv" else []):
        if wanted and set(wanted) == set(class_names):
            return wanted
    return list(class_names)


def write_figures(
    out_dir: Path,
    report: Mapping[str, Any],
    class_names: Sequence[str],
    features: np.ndarray,
    labels: np.ndarray,
    correct: np.ndarray,
    display_order: Sequence[str] | None = None,
) -> list[Path]:
    """Confusion matrix (row-normalised, classes in ``display_order``: the classes' own order,
    e.g. from sound to defective, not the label indices), per-class bars, reliability diagram,
    and a 2-D PCA of test features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    k = len(class_names)

    order = [class_names.index(c) for c in (display_order or class_names)]
    counts = np.asarray(report["confusion"])[np.ix_(order, order)]
    shares = row_shares(counts)
    shown = [class_names[i] for i in order]
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * k, 2 + 0.9 * k))
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for a in range(k):
        for p in range(k):
            colour = "white" if shares[a, p] > 0.5 else "black"
            text = f"{shares[a, p]:.2f}\n({counts[a, p]})" if counts[a].sum() else "-"
            ax.text(p, a, text, ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(k), shown, rotation=30, ha="right")
    ax.set_yticks(range(k), shown)
    ax.set(
        xlabel="predicted",
        ylabel="actual",
        title="confusion matrix (test): share of each actual class (count)",
    )
    written.append(_save(fig, out_dir / EVAL_FIGURES["confusion"].name))

    table = per_class_table(report)
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.6 * k))
    y = np.arange(k)
    for offset, column in zip((-0.27, 0, 0.27), ("precision", "recall", "f1"), strict=True):
        ax.barh(y + offset, table[column].fillna(0), height=0.26, label=column)
    ax.set_yticks(y, class_names)
    ax.set(xlim=(0, 1), xlabel="score", title="per-class scores (test)")
    ax.legend(loc="lower right")
    written.append(_save(fig, out_dir / EVAL_FIGURES["per_class"].name))

    fig, ax = plt.subplots(figsize=(5, 5))
    bins = pd.DataFrame(report["calibration"])
    ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
    if len(bins):
        ax.plot(bins["confidence"], bins["accuracy"], marker="o", label="model")
    ece = report.get("ece")
    title = "reliability (test)" + (f", ECE {ece:.3f}" if ece is not None and not math.isnan(ece) else "")
    ax.set(xlabel="mean confidence in bin", ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left")
    written.append(_save(fig, out_dir / EVAL_FIGURES["calibration"].name))

    fig, ax = plt.subplots(figsize=(6.5, 5))
    if len(features) >= 2:
        points, share = project_2d(features)
        for c, name in enumerate(class_names):
            mine = labels == c
            ax.scatter(*points[mine & correct].T, s=14, label=name, alpha=0.8, color=f"C{c}")
            ax.scatter(*points[mine & ~correct].T, s=26, marker="x", color=f"C{c}")
        ax.set(xlabel=f"PC 1 ({share[0]:.0%} of variance)", ylabel=f"PC 2 ({share[1]:.0%})")
        ax.legend(title="class (x: misclassified)", fontsize="small")
    ax.set_title("penultimate features of the test images (PCA)")
    written.append(_save(fig, out_dir / EVAL_FIGURES["features_2d"].name))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _gate_rows(results: Sequence[GateResult]) -> list[str]:
    lines = ["| gate | what it checks | rule | observed | margin | result |", "|---|---|---|---:|---:|---|"]
    for r in results:
        rule = f"{r.metric} {r.rule} {r.threshold:.4f}" if r.threshold is not None else "-"
        margin = "-" if r.margin is None else f"{r.margin:+.4f}"
        result = {"pass": "pass", "FAIL": "**FAIL**", "skipped": "skipped"}[r.status]
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.gate} | {r.about} | {rule} | {_num(r.observed)} | {margin} | {result}{note} |")
    return lines


def render_markdown(
    *,
    passed: bool,
    enforced: bool,
    gates: Sequence[GateResult],
    test: Mapping[str, Any],
    val: Mapping[str, Any] | None,
    class_names: Sequence[str],
    model: Mapping[str, Any],
    champion: Mapping[str, Any],
    errors: pd.DataFrame,
    max_listed_errors: int,
    calibration_bins: int,
    temperature: Mapping[str, Any] | None = None,
    decision: Any = None,
    slices: pd.DataFrame | None = None,
) -> str:
    """reports/evaluation.md: verdict, the line's rates, gates, champion, slices, metrics, per
    class, confusion, formulas."""
    failed = [g.gate for g in gates if g.passed is False]
    if passed:
        head = "PASSED: every gate is met"
    elif enforced:
        head = f"FAILED: {', '.join(failed)}"
    else:
        head = f"FAILED (reported only, gates.enforce is false): {', '.join(failed)}"
    lines = [
        f"# Evaluation: {head}",
        "",
        f"Model `{model['arch']}` trained with {model['method']}"
        + (f" (beta {model['beta']:.4g})" if model.get("beta") else "")
        + f", weights sha256 `{model['weights_sha256'][:16]}`, "
        f"training run `{model.get('mlflow_run_id', '')}`.",
        f"Scored on the **test split**: {test['images']} images of {len(class_names)} classes, "
        "never seen by training or tuning.",
        "",
        *decision_lines(decision),
        "## Gates",
        "",
        *_gate_rows(gates),
        "",
        "Margin: how far inside the limit the model is (negative: outside). Thresholds come from "
        "`gates:` in params.yaml.",
        "",
        "## Champion",
        "",
    ]
    if champion.get("version"):
        lines += [
            f"Compared with {champion['label']}, training run `{champion.get('run_id', '')}`, "
            f"scored now on the same {test['images']} test images:",
            "",
            "| metric | champion | this model | change |",
            "|---|---:|---:|---:|",
        ]
        for metric in ("accuracy", "macro_recall", "macro_f1", "recall_min"):
            ours, theirs = test.get(metric), champion["metrics"].get(metric)
            change = "n/a" if ours is None or theirs is None else f"{ours - theirs:+.4f}"
            lines.append(f"| {metric} | {_num(theirs)} | {_num(ours)} | {change} |")
        paired = champion.get("paired")
        if paired:
            lines += [
                "",
                f"Paired on the same images: {paired['only_challenger_right']} right only by this model, "
                f"{paired['only_champion_right']} right only by the champion; exact McNemar p = "
                f"{paired['p_value']:.4g} (small p: the accuracy difference is unlikely to be chance).",
            ]
    else:
        lines.append(champion.get("note", "No champion comparison."))
    lines += ["", *slice_lines(slices)]
    lines += [
        "",
        "## Metrics" + (" (test; val for comparison)" if val else " (test)"),
        "",
        "| metric | test | " + ("val |" if val else ""),
        "|---|---:|" + ("---:|" if val else ""),
    ]
    headline = (
        ("accuracy", "accuracy"),
        ("accuracy, 95 % interval (Wilson)", "accuracy_ci95"),
        ("balanced accuracy (macro recall)", "macro_recall"),
        ("macro precision", "macro_precision"),
        ("macro F1", "macro_f1"),
        ("lowest class recall", "recall_min"),
        ("per-class recall std", "recall_std"),
        ("per-class recall spread (max - min)", "recall_spread"),
        ("expected calibration error", "ece"),
        ("intra-class variance (mean W_c / T)", "intra_class_variance"),
        ("within-class fraction S_W / T", "within_fraction"),
        ("Fisher ratio S_B / S_W", "fisher_ratio"),
        ("nearest centroids / sqrt(T)", "centroid_distance_min_normalised"),
        ("silhouette", "silhouette"),
    )

    def cell(report: Mapping[str, Any], key: str) -> str:
        if key == "accuracy_ci95":
            return f"{_num(report.get(key + '_low'))} – {_num(report.get(key + '_high'))}"
        return _num(report.get(key))

    for label, key in headline:
        lines.append(f"| {label} | {cell(test, key)} | " + (f"{cell(val, key)} |" if val else ""))
    if temperature:
        lines += ["", *calibration_lines(temperature)]
    lines += [
        "",
        "## Per class (test)",
        "",
        "| class | images | precision | recall | F1 | cohesion W_c/T | silhouette |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in class_names:
        row = test["per_class"][name]
        lines.append(
            f"| {name} | {row['support']} | {_num(row['precision'])} | {_num(row['recall'])} | "
            f"{_num(row['f1'])} | {_num(row['cohesion'])} | {_num(row['silhouette'])} |"
        )
    lines += [
        "",
        "## Confusion matrix (test; rows: actual, columns: predicted)",
        "",
        "| actual \\ predicted | " + " | ".join(class_names) + " |",
        "|---|" + "---:|" * len(class_names),
    ]
    for name, row in zip(class_names, test["confusion"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"## Misclassified test images ({len(errors)})", ""]
    if len(errors):
        shown = errors.sort_values("confidence", ascending=False).head(max_listed_errors)
        lines += [
            "Most confident mistakes first:",
            "",
            "| image | actual | predicted | confidence |",
            "|---|---|---|---:|",
        ]
        lines += [
            f"| {r.path} | {r.actual} | {r.predicted} | {r.confidence:.3f} |" for r in shown.itertuples()
        ]
        if len(errors) > len(shown):
            lines.append(f"\n{len(errors) - len(shown)} more in reports/evaluation/predictions.csv.")
    else:
        lines.append("None.")
    lines += ["", "## How the numbers are computed", "", *(f.format(bins=calibration_bins) for f in FORMULAS)]
    return "\n".join(lines) + "\n"


def slice_lines(slices: pd.DataFrame | None) -> list[str]:
    """The "Slices" section: one table row per slice value of each sliced manifest column."""
    lines = ["## Slices (test split)", ""]
    if slices is None or slices.empty:
        return [
            *lines,
            "No slices: `evaluate.slices` found no manifest column to slice by (ELPV slices by "
            "`cell_type`; a photo folder by the columns of its `meta.csv`).",
        ]
    lines += [
        "| column | value | images | accuracy (95 % interval) | macro recall | escape | overkill |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in slices.itertuples(index=False):
        accuracy = f"{_num(r.accuracy)} ({_num(r.accuracy_ci95_low)}-{_num(r.accuracy_ci95_high)})"
        lines.append(
            f"| {r.column} | {r.value} | {r.images} | {accuracy} | {_num(r.macro_recall)} | "
            f"{_num(r.escape_rate)} | {_num(r.overkill_rate)} |"
        )
    lines += [
        "",
        "Every row is also in reports/evaluation/slices.csv; the slice gates are in the gate table.",
    ]
    return lines


def _rate_cell(r: Mapping[str, Any]) -> str:
    if not r.get("of"):
        return "n/a"
    return f"{_num(r['rate'])} ({r['count']}/{r['of']}; {_num(r['ci95_low'])}-{_num(r['ci95_high'])})"


def decision_lines(line: Any) -> list[str]:
    """The line's rates at the operating point fitted on val: what reports/evaluation.md opens with."""
    if line is None:
        return []
    lines = ["## On the line (test split)", ""]
    point = line.point
    unknown = line.unknown or {}
    if point is None:
        lines += [f"{line.note}.", ""]
    else:
        fit = point.fit
        how = (
            "fixed by decision.review_band"
            if fit.get("fixed")
            else f"fitted on {fit.get('images')} val images (val escape {_num(fit.get('escape_rate'))}, "
            f"overkill {_num(fit.get('overkill_rate'))}, review {_num(fit.get('review_rate'))})"
        )
        lines += [
            f"Defect classes: {', '.join(point.defect_classes)}. With P(defect) their summed calibrated "
            f"probability: **accept** below {point.accept_below:.4f}, "
            f"**review** up to {point.reject_from:.4f}, "
            f"**reject** from there; {how}.",
            "",
            "| rate | on test (count; 95 % interval) | what it is |",
            "|---|---|---|",
            f"| escape | {_rate_cell(line.test['escape'])} | defective parts accepted as good |",
            f"| overkill | {_rate_cell(line.test['overkill'])} | good parts rejected |",
            f"| review | {_rate_cell(line.test['review'])} | parts sent to a person |",
            f"| unknown | {_rate_cell(line.test['unknown'])} | parts far from every class (real parts here: "
            "false rejects) |",
            "",
            "| class | part | images | escape / overkill (95 % interval) | review | unknown |",
            "|---|---|---:|---|---:|---:|",
        ]
        for name, row in line.test["per_class"].items():
            kind = "defect" if row["defect"] else "good"
            lines.append(
                f"| {name} | {kind} | {row['images']} | {row['error_kind']} {_rate_cell(row['error'])} | "
                f"{_num(row['review']['rate'])} | {_num(row['unknown']['rate'])} |"
            )
        lines.append("")
    if unknown.get("threshold") is not None:
        lines += [
            f"Unknown parts: Mahalanobis distance of the penultimate features to the nearest class "
            f"(centroids and shared covariance of {unknown['fitted_on_train_images']} training images); "
            f"above {unknown['threshold']:.4g} an image is `unknown` "
            f"(fitted at {_num(unknown['false_reject_target'])} "
            f"false rejects on {unknown['threshold_fitted_on_val_images']} val images; test false rejects "
            f"{_num(unknown['test_false_reject_rate'])}).",
            "",
        ]
    return lines


def calibration_lines(cal: Mapping[str, Any]) -> list[str]:
    """The calibration section: the temperature and what it did to NLL and ECE."""
    t = float(cal.get("temperature", 1.0))
    how = f"fitted on {cal.get('fitted_on_images', 0)} val images by NLL" if cal.get("fitted_on") else ""
    how = "; ".join(part for part in (how, cal.get("note", "")) if part) or "not calibrated"
    lines = [
        "## Calibration (temperature scaling)",
        "",
        f"Temperature T = {t:.4f} ({how}). The exported model outputs logits / T, so every "
        "probability above, and those of predict, serve and pilot-eval, is calibrated; the "
        "predicted class is unchanged.",
    ]
    rows = [
        (
            split,
            cal.get(f"{split}_nll_before"),
            cal.get(f"{split}_nll_after"),
            cal.get(f"{split}_ece_before"),
            cal.get(f"{split}_ece_after"),
        )
        for split in ("test", "val")
    ]
    rows = [r for r in rows if r[1] is not None]
    if rows:
        lines += [
            "",
            "| split | NLL before | NLL after | ECE before | ECE after |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {s} | {_num(a)} | {_num(b)} | {_num(c)} | {_num(d)} |" for s, a, b, c, d in rows]
    return lines


FORMULAS = [
    "- recall_c = correct images of class c / images of class c; macro recall (balanced accuracy) is "
    "their mean over classes; precision_c = correct predictions of c / predictions of c; "
    "F1_c = 2 P R / (P + R).",
    "- accuracy interval: Wilson score interval at 95 %: the range of accuracies this test split "
    "cannot tell apart from the one observed.",
    "- ECE = sum over {bins} equal-width confidence bins of (images in bin / n) x |accuracy - mean "
    "confidence| (confidence = the predicted class's softmax probability).",
    "- Temperature scaling: T > 0 minimises the val NLL = mean over images of -log softmax(z / T)[true "
    "class] (z: the logits); NLL before is at T = 1.",
    "- Features f are the penultimate layer (input of the final linear layer). mu_c: class centroid, "
    "mu: global mean. T = mean ||f - mu||^2; W_c = mean over class c of ||f - mu_c||^2; "
    "intra-class variance = mean over classes of W_c / T (0: each class collapsed to a point; "
    "1: as spread as the whole split).",
    "- S_W = sum_c n_c W_c / n, S_B = sum_c n_c ||mu_c - mu||^2 / n (S_W + S_B = T); "
    "Fisher ratio = S_B / S_W.",
    "- silhouette of an image = (b - a) / max(a, b): a = mean distance to its own class, "
    "b = mean distance to the nearest other class; averaged over images (-1 to 1).",
]
