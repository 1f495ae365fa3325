"""Watching the line: the records the service keeps, and the drift check over a window of them.

A **record** is one served image as one JSON line (:func:`make_record`): when, which model
(``weights_sha256``, version), the class, calibrated confidence and decision, the image
statistics and the embedding (:mod:`synermix.drift`), and the slice keys the client sent
(``X-Camera-Id`` -> ``camera``, ``X-Line-Id`` -> ``line``). :class:`RecordLog` writes them
from a background thread into a size-capped, rotating set of files; a full disk or a full
queue drops records (counted), never a request.

:func:`check_window` compares the newest ``window`` records of the profile's model with the
reference profile (:mod:`synermix.profile`), for all records and per slice, and
:func:`write_report` turns the verdict into ``verdict.json``, ``report.md``, ``report.html``
and PNG plots. ``synermix monitor`` (cli) reads a record log or runs a folder of images
through the model, and logs the result as an MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from synermix import drift
from synermix.errors import UserError
from synermix.profile import ReferenceProfile

log = logging.getLogger(__name__)

#: request headers whose values become slice keys of a record
SLICE_HEADERS = {"x-camera-id": "camera", "x-line-id": "line"}
_SLICE_VALUE = re.compile(r"[^A-Za-z0-9._:/ -]")
MAX_SLICE_CHARS = 64


def slice_value(raw: str) -> str:
    """A header value fit to be a slice key: printable, at most 64 characters."""
    return _SLICE_VALUE.sub("?", raw.strip())[:MAX_SLICE_CHARS]


def make_record(
    name: str,
    label: str,
    confidence: float,
    decision: str,
    statistics: dict[str, float],
    embedding: np.ndarray | None,
    about: dict[str, Any],
    slices: dict[str, str],
) -> dict[str, Any]:
    """One served image as the JSON-able record the service logs."""
    return {
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "weights_sha256": about.get("weights_sha256", ""),
        "model_sha256": about.get("sha256", "")[:12],
        "version": str(about.get("version", "")),
        "image": name,
        "class": label,
        "confidence": round(float(confidence), 6),
        "decision": decision,
        "stats": {k: round(float(v), 6) for k, v in statistics.items()},
        "embedding": None if embedding is None else [float(f"{v:.6g}") for v in embedding],
        "slices": slices,
    }


class RecordLog:
    """Records appended to ``path`` as JSON lines by one background thread; when the file
    would pass ``max_bytes`` it becomes ``path.1`` (``.1`` -> ``.2`` ... up to ``keep``, the
    oldest removed), so the log never takes more than ``(keep + 1) * max_bytes``. Writes that
    fail (disk full, folder gone) and records that find the queue full are dropped and
    counted (``on_drop``)."""

    def __init__(
        self, path: Path, max_bytes: int, keep: int, on_drop=None, on_write=None, queue_size: int = 10_000
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.on_drop = on_drop
        self.on_write = on_write
        self.written = 0
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="synermix-records", daemon=True)
        self._thread.start()

    def add(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop("the record queue is full")

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every record queued so far is written (or dropped)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.keep, 0, -1)]
        return [p for p in [*rotated, self.path] if p.is_file()]

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.on_drop:
            self.on_drop()
        if not self._warned:  # once: a full disk would otherwise log on every request
            self._warned = True
            log.warning("monitoring records are being dropped (%s); requests are not affected", why)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            line = (json.dumps(item, sort_keys=True) + "\n").encode()
            try:
                self._write(line)
                self.written += 1
                self._warned = False
                if self.on_write:
                    self.on_write()
            except OSError as exc:
                self._drop(exc.strerror or str(exc))

    def _write(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and size + len(line) > self.max_bytes:
            self._rotate()
        if len(line) > self.max_bytes:
            raise OSError(f"a record of {len(line)} bytes is over the {self.max_bytes}-byte file cap")
        with self.path.open("ab") as out:
            out.write(line)

    def _rotate(self) -> None:
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))


def records_from_images(
    classifier, items: Iterable[tuple[str, bytes | str]], about: dict[str, Any], batch_size: int = 64
):
    """Records of images run through ``classifier`` as the service would score them, and
    how many files could not be scored (unreadable images are skipped and counted)."""
    from synermix.inference import BadImage
    from synermix.metrics import softmax

    if classifier.embedding_name is None:
        raise UserError("the model has no embedding output: export it again with this version (dvc repro)")
    records: list[dict[str, Any]] = []
    bad = 0
    pending: list[tuple[str, np.ndarray, dict[str, float]]] = []

    def flush() -> None:
        if not pending:
            return
        logits, distances, embeddings = classifier.all_outputs(np.stack([x for _, x, _ in pending]))
        probabilities = softmax(logits)
        decisions = classifier.decisions(probabilities, distances)
        for i, (name, _, stats) in enumerate(pending):
            top = int(probabilities[i].argmax())
            label = classifier.class_names[top]
            records.append(
                make_record(name, label, probabilities[i, top], decisions[i], stats, embeddings[i], about, {})
            )
        pending.clear()

    from tqdm import tqdm

    for name, data in tqdm(items, desc="images through the model", unit="image", disable=None, leave=False):
        if isinstance(data, str):
            bad += 1
            continue
        try:
            x, stats = classifier.preprocess.with_statistics(data)
        except BadImage:
            bad += 1
            continue
        pending.append((name, x, stats))
        if len(pending) >= batch_size:
            flush()
    flush()
    return records, bad


def log_files(paths: Sequence[Path]) -> list[Path]:
    """Record files given, and under a folder given its ``*.jsonl`` logs with their rotated
    copies, oldest first."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            for base in sorted(path.glob("*.jsonl")):
                rotated = sorted(
                    base.parent.glob(base.name + ".*"),
                    key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
                )
                found += [p for p in rotated if p.suffix[1:].isdigit()] + [base]
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: no such record file or folder (serve.records names the service's log)")
    return found


def read_records(files: Iterable[Path]) -> tuple[list[dict[str, Any]], int]:
    """The records in ``files`` (in file and line order) and how many lines were unreadable
    (not JSON, or missing a field the check needs): those are skipped and counted."""
    records: list[dict[str, Any]] = []
    bad = 0
    for path in files:
        with Path(path).open("rb") as lines:
            for raw in lines:
                try:
                    record = json.loads(raw)
                    if not (
                        isinstance(record, dict)
                        and isinstance(record.get("stats"), dict)
                        and isinstance(record.get("embedding"), list)
                        and isinstance(record.get("class"), str)
                        and all(
                            isinstance(record["stats"].get(k), int | float) for k in drift.IMAGE_STATISTICS
                        )
                    ):
                        raise ValueError("not a record")
                    records.append(record)
                except (ValueError, UnicodeDecodeError):
                    bad += 1
    return records, bad


@dataclass(frozen=True)
class Window:
    """The records of one model that a check covers, with what was left out and why."""

    records: list[dict[str, Any]]
    other_model: int = 0
    unreadable: int = 0


def select_window(
    records: list[dict[str, Any]], profile: ReferenceProfile, size: int, unreadable: int = 0
) -> Window:
    """The newest ``size`` records of the profile's model; UserError when none is of it."""
    mine = [r for r in records if r.get("weights_sha256") == profile.weights_sha256]
    others = len(records) - len(mine)
    if not mine and others:
        served = sorted({str(r.get("weights_sha256", ""))[:12] for r in records})
        raise UserError(
            f"the records were served by model(s) with weights {', '.join(served)}, the profile is of "
            f"{profile.weights_sha256[:12]}: give the profile of the model that served them (--model)"
        )
    k = len(profile.embeddings[0])
    good = [r for r in mine if r["embedding"] is not None and len(r["embedding"]) == k]
    if len(good) < len(mine):
        unreadable += len(mine) - len(good)
    good.sort(key=lambda r: str(r.get("at", "")))
    return Window(good[-size:], others, unreadable)


def _arrays(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    return {
        "stats": {
            k: np.asarray([r["stats"][k] for r in records], dtype=np.float64) for k in drift.IMAGE_STATISTICS
        },
        "embeddings": np.asarray([r["embedding"] for r in records], dtype=np.float64),
        "predicted": np.asarray([index.get(r["class"], -1) for r in records], dtype=np.int64),
    }


def _slice_tests(
    profile: ReferenceProfile, records: list[dict[str, Any]], settings, seed: int
) -> dict[str, Any]:
    """Every test of one slice of the window (p-values not yet judged)."""
    names = profile.class_names
    win = _arrays(records, names)
    tests: list[drift.TestResult] = []
    for stat in drift.IMAGE_STATISTICS:
        ref, got = profile.statistics[stat], win["stats"][stat]
        if np.ptp(ref) == 0 and np.ptp(got) == 0 and ref[0] == got[0]:
            continue  # e.g. one camera's fixed size: nothing to test, and no test to pay for
        d, p = drift.ks_test(ref, got)
        tests.append(drift.TestResult(f"image {stat} (KS)", d, p, drift.psi(ref, got)))
    known = win["predicted"] >= 0
    counts = np.bincount(win["predicted"][known], minlength=len(names))
    stat, p, tvd = drift.mix_test(profile.prediction_counts, counts)
    tests.append(drift.TestResult("prediction mix (chi-square)", stat, p, tvd, "mix"))
    mmd2, p = drift.mmd_test(
        profile.embeddings, win["embeddings"], profile.bandwidth, settings.permutations, seed
    )
    tests.append(drift.TestResult("features (MMD, permutation)", mmd2, p, mmd2, "features"))
    classes = drift.class_shift(
        profile.embeddings,
        profile.predicted,
        win["embeddings"][known],
        win["predicted"][known],
        names,
        settings.min_class_images,
    )
    decisions: dict[str, int] = {}
    for r in records:
        decisions[r.get("decision") or "none"] = decisions.get(r.get("decision") or "none", 0) + 1
    return {
        "records": len(records),
        "tests": [t.to_dict() for t in tests],
        "classes": classes,
        "prediction_mix": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "decisions": dict(sorted(decisions.items())),
        "_window": win,
    }


def check_window(profile: ReferenceProfile, window: Window, settings, seed: int = 0) -> dict[str, Any]:
    """The drift verdict of a window (``settings``: :class:`synermix.config.MonitorParams`).

    Slices: ``all``, then each value of each ``settings.slice_by`` key with at least
    ``min_records`` records. One Bonferroni threshold ``alpha / m`` over the ``m`` tests of
    every slice checked. UserError when the window holds fewer than ``min_records``."""
    records = window.records
    if len(records) < settings.min_records:
        raise UserError(
            f"{len(records)} record(s) of this model in the window: the monitor needs at least "
            f"{settings.min_records} (monitor.min_records) to test for drift; wait for more traffic"
        )
    groups: list[tuple[str, list[dict[str, Any]]]] = [("all", records)]
    notes: list[str] = []
    for key in settings.slice_by:
        values = sorted({str(r.get("slices", {}).get(key)) for r in records if r.get("slices", {}).get(key)})
        for value in values:
            members = [r for r in records if r.get("slices", {}).get(key) == value]
            if len(members) >= settings.min_records:
                groups.append((f"{key}={value}", members))
            else:
                notes.append(
                    f"slice {key}={value}: {len(members)} record(s), under {settings.min_records}: not tested"
                )
    slices = []
    for i, (name, members) in enumerate(groups):
        result = _slice_tests(profile, members, settings, seed + i)
        slices.append({"slice": name, **result})
    m = sum(len(s["tests"]) for s in slices)
    threshold = settings.alpha / max(m, 1)
    alarms = []
    for s in slices:
        for t in s["tests"]:
            large = t["kind"] != "image" or t["effect"] >= settings.min_psi
            t["alarm"] = bool(t["p_value"] < threshold and large)
            if t["alarm"]:
                alarms.append(f"{s['slice']}: {t['test']} p={t['p_value']:.3g}")
    at = [str(r.get("at", "")) for r in records]
    return {
        "drift": bool(alarms),
        "alarms": alarms,
        "alpha": settings.alpha,
        "min_psi": settings.min_psi,
        "tests": m,
        "threshold": threshold,
        "records": len(records),
        "first": min(at),
        "last": max(at),
        "left_out": {"other_model": window.other_model, "unreadable": window.unreadable},
        "weights_sha256": profile.weights_sha256,
        "profile_sha256": profile.to_dict()["sha256"],
        "reference_images": profile.images,
        "reference_statistics_images": profile.statistics_images,
        "slices": slices,
        "notes": notes,
    }


def public(verdict: dict[str, Any]) -> dict[str, Any]:
    """The verdict without the arrays kept for the plots."""
    return {**verdict, "slices": [{k: v for k, v in s.items() if k != "_window"} for s in verdict["slices"]]}


# --------------------------------------------------------------------------- report
def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "**ALARM**" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _tables(verdict: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, header, rows, class rows as text) per slice, shared by the Markdown and HTML."""
    out = []
    for s in verdict["slices"]:
        rows = [
            [t["test"], _fmt(t["statistic"]), _fmt(t["p_value"]), _fmt(t["effect"]), _fmt(t["alarm"])]
            for t in s["tests"]
        ]
        classes = [
            [
                name,
                str(c["images"]),
                _fmt(c["centroid_shift"]),
                f"{_fmt(c['cohesion_reference'])} -> {_fmt(c['cohesion_window'])}",
            ]
            for name, c in s["classes"].items()
        ]
        out.append(
            (
                f"{s['slice']} ({s['records']} records)",
                ["test", "statistic", "p-value", "effect", "alarm"],
                rows,
                classes,
            )
        )
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


CLASS_HEADER = [
    "predicted class",
    "images",
    "centroid shift (x class spread)",
    "cohesion W_c/T (reference -> window)",
]


def render_markdown(verdict: dict[str, Any], plots: Sequence[str]) -> str:
    head = "DRIFT" if verdict["drift"] else "no drift detected"
    lines = [
        f"# Drift monitor: {head}",
        "",
        f"- window: {verdict['records']} records of model weights {verdict['weights_sha256'][:12]}, "
        f"{verdict['first']} to {verdict['last']}",
        f"- reference (profile {verdict['profile_sha256'][:12]}): image statistics of "
        f"{verdict['reference_statistics_images']} training and val images; features and prediction "
        f"mix of {verdict['reference_images']} val images",
        f"- {verdict['tests']} tests; an alarm needs p < {verdict['alpha']:g} / {verdict['tests']} = "
        f"{verdict['threshold']:.3g} (Bonferroni: an unchanged line raises a false alarm in at most "
        f"{verdict['alpha']:.0%} of windows), and an image statistic a PSI of at least "
        f"{verdict['min_psi']:g}",
        f"- left out: {verdict['left_out']['other_model']} record(s) of other models, "
        f"{verdict['left_out']['unreadable']} unreadable",
    ]
    if verdict["alarms"]:
        lines += ["", "Alarms:", *[f"- {a}" for a in verdict["alarms"]]]
    for note in verdict["notes"]:
        lines.append(f"- {note}")
    for title, header, rows, classes in _tables(verdict):
        lines += ["", f"## {title}", "", *_md_table(header, rows)]
        if classes:
            lines += ["", *_md_table(CLASS_HEADER, classes)]
    lines += [
        "",
        "Effect: PSI for image statistics (> 0.25: a large shift), total variation distance for the "
        "prediction mix, MMD^2 for the features. Centroid shift: distance of the window's mean "
        "embedding of a class from the reference's, in units of the reference class's spread.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def render_html(verdict: dict[str, Any], plots: Sequence[str]) -> str:
    import html

    head = "DRIFT" if verdict["drift"] else "no drift detected"
    colour = "#b00020" if verdict["drift"] else "#1b5e20"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>synermix drift monitor</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,"
        "th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        f"<h1 style='color:{colour}'>Drift monitor: {head}</h1>",
        f"<p>{verdict['records']} records of model weights {html.escape(verdict['weights_sha256'][:12])}, "
        f"{html.escape(verdict['first'])} to {html.escape(verdict['last'])}; reference "
        f"{verdict['reference_images']} val images. {verdict['tests']} tests, alarm at p &lt; "
        f"{verdict['threshold']:.3g}.</p>",
    ]
    if verdict["alarms"]:
        parts.append("<ul>" + "".join(f"<li>{html.escape(a)}</li>" for a in verdict["alarms"]) + "</ul>")
    for title, header, rows, classes in _tables(verdict):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for head_row, body in ((header, rows), (CLASS_HEADER, classes)):
            if body:
                cells = "".join(
                    "<tr>"
                    + "".join(f"<td>{html.escape(c).replace('**ALARM**', '<b>ALARM</b>')}</td>" for c in r)
                    + "</tr>"
                    for r in body
                )
                heads = "".join(f"<th>{html.escape(h)}</th>" for h in head_row)
                parts.append(f"<table><tr>{heads}</tr>{cells}</table>")
    parts += [f"<p><img src='{html.escape(p)}' alt='{html.escape(p)}'></p>" for p in plots]
    return "".join(parts) + "</body></html>\n"


def write_plots(verdict: dict[str, Any], profile: ReferenceProfile, out: Path) -> list[str]:
    """PNGs of the ``all`` slice against the reference: image statistics, prediction mix,
    and the embeddings on their first two principal directions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    win = verdict["slices"][0]["_window"]
    names = profile.class_names
    files = []
    fig, axes = plt.subplots(1, len(drift.IMAGE_STATISTICS), figsize=(4 * len(drift.IMAGE_STATISTICS), 3))
    for ax, stat in zip(axes, drift.IMAGE_STATISTICS, strict=True):
        ref, got = profile.statistics[stat], win["stats"][stat]
        bins = np.histogram_bin_edges(np.concatenate([ref, got]), bins=30)
        ax.hist(ref, bins=bins, alpha=0.5, density=True, label="reference (train + val)")
        ax.hist(got, bins=bins, alpha=0.5, density=True, label="window")
        ax.set_title(stat)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "image_statistics.png", dpi=90)
    plt.close(fig)
    files.append("image_statistics.png")

    fig, ax = plt.subplots(figsize=(6, 3))
    ref = profile.prediction_counts / max(1, profile.images)
    known = win["predicted"][win["predicted"] >= 0]
    got = np.bincount(known, minlength=len(names)) / max(1, len(known))
    x = np.arange(len(names))
    ax.bar(x - 0.2, ref, 0.4, label="reference (val)")
    ax.bar(x + 0.2, got, 0.4, label="window")
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_ylabel("share of images")
    ax.set_title("predicted class")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "prediction_mix.png", dpi=90)
    plt.close(fig)
    files.append("prediction_mix.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(profile.embeddings[:, 0], profile.embeddings[:, 1], s=6, alpha=0.5, label="reference (val)")
    if win["embeddings"].shape[1] >= 2:
        ax.scatter(win["embeddings"][:, 0], win["embeddings"][:, 1], s=6, alpha=0.5, label="window")
    ax.set_xlabel("embedding 1")
    ax.set_ylabel("embedding 2")
    ax.set_title("features (first two principal directions)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "embedding.png", dpi=90)
    plt.close(fig)
    files.append("embedding.png")
    return files


def write_report(verdict: dict[str, Any], profile: ReferenceProfile, out: Path) -> dict[str, Path]:
    """verdict.json, report.md, report.html and the plots into ``out`` (each file replaced
    whole: written beside, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(verdict, profile, out)
    written = {}
    for name, text in (
        ("verdict.json", json.dumps(public(verdict), indent=2, sort_keys=True) + "\n"),
        ("report.md", render_markdown(verdict, plots)),
        ("report.html", render_html(verdict, plots)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
        written[name] = out / name
    return written


# --------------------------------------------------------------------------- command
def run_monitor(
    params,
    model_spec: str,
    record_paths: Sequence[Path],
    image_paths: Sequence[Path],
    out: Path,
    window_size: int | None = None,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """``synermix monitor``: the verdict of the newest records (or of image folders run
    through the model), written to ``out`` and logged as an MLflow run."""
    import hashlib
    import tempfile

    from synermix.inference import Classifier, image_files, read_files
    from synermix.model_source import model_file
    from synermix.profile import profile_from_metadata

    settings = params.monitor
    size = window_size or settings.window
    with tempfile.TemporaryDirectory(prefix="synermix-monitor-") as tmp:
        path = model_file(model_spec, Path(tmp), tracking_uri)
        try:
            classifier = Classifier(path, provider="cpu")
        except Exception as exc:  # onnxruntime's own errors for a file that is not a model
            raise UserError(f"{model_spec}: not a model this command can run ({exc})") from None
        try:
            profile = profile_from_metadata(
                classifier.session.get_modelmeta().custom_metadata_map, model_spec
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if profile.class_names != classifier.class_names:
            raise UserError(f"{model_spec}: its profile names other classes than the model: export it again")
        if image_paths:
            about = {
                "weights_sha256": profile.weights_sha256,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
            files = image_files(image_paths)
            if not files:
                raise UserError(f"no image files under {', '.join(map(str, image_paths))}")
            records, unreadable = records_from_images(classifier, read_files(files), about)
        else:
            records, unreadable = read_records(log_files(record_paths))
    if not records and unreadable:
        raise UserError(
            f"none of the {unreadable} line(s) given is a monitoring record (serve.records writes them)"
        )
    window = select_window(records, profile, size, unreadable)
    verdict = check_window(profile, window, settings, seed=params.seed)
    write_report(verdict, profile, out)
    if log_to_mlflow:
        verdict["mlflow_run_id"] = _log_run(params, verdict, out, model_spec, tracking_uri)
    return verdict


def _log_run(params, verdict: dict[str, Any], out: Path, model_spec: str, uri: str | None) -> str:
    import mlflow

    from synermix.config import MlflowParams
    from synermix.tracking import client, experiment_id, git_state, tracking_uri, using_store

    store_uri = uri or tracking_uri(params.mlflow)
    store = client(store_uri)
    experiment = experiment_id(
        store, MlflowParams(tracking_uri=params.mlflow.tracking_uri, experiment=params.monitor.experiment)
    )
    tags = {
        **git_state(),
        "synermix_role": "monitor",
        "model": model_spec,
        "weights_sha256": verdict["weights_sha256"],
        "drift": str(verdict["drift"]).lower(),
        "alarms": "; ".join(verdict["alarms"])[:5000],
    }
    name = f"monitor: {'DRIFT' if verdict['drift'] else 'no drift'} ({verdict['records']} records)"
    with using_store(store_uri), mlflow.start_run(experiment_id=experiment, run_name=name, tags=tags) as run:
        mlflow.log_params(
            {
                "alpha": verdict["alpha"],
                "tests": verdict["tests"],
                "window_first": verdict["first"],
                "window_last": verdict["last"],
            }
        )
        values = {"drift": float(verdict["drift"]), "records": float(verdict["records"])}
        for s in verdict["slices"]:
            for t in s["tests"]:
                key = re.sub(r"[^A-Za-z0-9_]+", "_", f"{s['slice']}.{t['test']}").strip("_")[:200]
                values[f"p.{key}"] = float(t["p_value"])
        mlflow.log_metrics(values)
        mlflow.log_artifacts(str(out), artifact_path="monitor")
        return run.info.run_id
