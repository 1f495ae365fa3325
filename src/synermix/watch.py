"""What the service watches besides answering: live drift, the golden set, the review queue.

- :class:`LiveDrift` keeps the newest ``monitor.window`` records in memory and, after every
  ``serve.monitor_every`` records, runs :func:`synermix.monitor.check_window` on a
  background thread; the verdict becomes Prometheus gauges (``/metrics``) and part of
  ``/v1/model``. A request never waits for it.
- :class:`GoldenSet` is a folder of ``<class>/<image>`` the line trusts. Every model the
  service is about to swap in scores it first; it is refused (the old model keeps serving)
  below ``serve.golden_min_accuracy``, more than ``serve.golden_max_drop`` below the model
  serving now, or when its probabilities differ by more than ``serve.golden_tolerance`` from
  those recorded when the version was registered (the register stage scores
  ``registry.golden_set``). Images are matched by content hash, so a renamed file still
  compares and a changed one does not.
- :class:`ReviewQueue` saves the images a person should label (review-band answers,
  unknown parts, shadow disagreements) as ``<folder>/<predicted class>/<sha256>.<ext>``,
  each image once, at most ``serve.review_per_class_per_day`` per class and day, with one
  JSON line per image in ``<folder>/review.jsonl`` saying why. After the labels are
  corrected the folder is a ``data.source: folder:`` source or a ``pilot-eval`` folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from synermix.errors import UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- live drift
class LiveDrift:
    """The drift check over the newest records, recomputed in the background."""

    def __init__(self, settings, every: int, on_verdict=None, seed: int = 0) -> None:
        self.settings = settings
        self.every = every
        self.on_verdict = on_verdict
        self.seed = seed
        self.records: deque = deque(maxlen=settings.window)
        self.verdict: dict[str, Any] | None = None
        self.error = ""
        self._since = 0
        self._lock = threading.Lock()
        self._running = threading.Event()

    def add(self, record: dict[str, Any], profile) -> None:
        if profile is None or self.every <= 0:
            return
        with self._lock:
            self.records.append(record)
            self._since += 1
            due = self._since >= self.every and not self._running.is_set()
            if due:
                self._since = 0
                self._running.set()
                snapshot = list(self.records)
        if due:
            threading.Thread(target=self._check, args=(snapshot, profile), daemon=True).start()

    def _check(self, records: list[dict[str, Any]], profile) -> None:
        """Check ``records``; while that ran, ``every`` more may have come: then check again."""
        while True:
            self._check_once(records, profile)
            with self._lock:
                if self._since < self.every:
                    self._running.clear()
                    return
                self._since = 0
                records = list(self.records)

    def _check_once(self, records: list[dict[str, Any]], profile) -> None:
        from synermix.monitor import check_window, public, select_window

        try:
            window = select_window(records, profile, self.settings.window)
            if len(window.records) < self.settings.min_records:
                return  # not yet enough of this model's records (e.g. just after a swap)
            verdict = public(check_window(profile, window, self.settings, self.seed))
            self.verdict, self.error = verdict, ""
            if self.on_verdict:
                self.on_verdict(verdict)
        except Exception as exc:  # a monitoring failure never touches the line
            self.error = str(exc)
            log.warning("live drift check failed: %s", exc)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until a running check finished (tests)."""
        import time

        end = time.monotonic() + timeout
        while self._running.is_set() and time.monotonic() < end:
            time.sleep(0.01)

    def describe(self) -> dict[str, Any]:
        if self.verdict is None:
            return {"records": len(self.records), "verdict": None, "error": self.error}
        v = self.verdict
        return {
            "records": len(self.records),
            "verdict": {
                k: v[k] for k in ("drift", "alarms", "records", "tests", "threshold", "first", "last")
            },
            "error": self.error,
        }


# --------------------------------------------------------------------------- golden set
@dataclass(frozen=True)
class GoldenImage:
    path: str
    label: str
    sha256: str
    data: bytes = field(repr=False)


def golden_images(folder: Path) -> list[GoldenImage]:
    """The images of a ``<class>/<image>`` golden folder; UserError when it has none."""
    from synermix.inference import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"golden set {folder}: no such folder; give a folder of <class>/<image> sub-folders")
    images = []
    for path in image_files([folder]):
        rel = path.relative_to(folder)
        if len(rel.parts) < 2:
            continue  # a loose file has no class
        data = path.read_bytes()
        images.append(GoldenImage(rel.as_posix(), rel.parts[0], hashlib.sha256(data).hexdigest(), data))
    if not images:
        raise UserError(
            f"golden set {folder}: no images in <class>/ sub-folders; put the line's trusted images there"
        )
    return images


def golden_sha256(images: list[GoldenImage]) -> str:
    """The golden set's version: its images' content hashes and labels, not their paths."""
    digest = hashlib.sha256()
    for entry in sorted(f"{g.sha256} {g.label}" for g in images):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()


def score_golden(classifier, images: list[GoldenImage]) -> dict[str, Any]:
    """The model's accuracy on the golden set and its probabilities per image (by content
    hash). ValueError (one line) when the set has a class the model does not know, or an
    image it cannot read."""
    from synermix.metrics import softmax

    unknown = sorted({g.label for g in images} - set(classifier.class_names))
    if unknown:
        raise ValueError(
            f"the golden set has class(es) {', '.join(unknown)} that the model does not know "
            f"({', '.join(classifier.class_names)})"
        )
    inputs = []
    for g in images:
        try:
            inputs.append(classifier.preprocess(g.data))
        except ValueError as exc:
            raise ValueError(f"golden image {g.path}: {exc}") from None
    probabilities = np.concatenate(
        [softmax(classifier.logits(np.stack(inputs[i : i + 64]))) for i in range(0, len(inputs), 64)]
    )
    labels = np.asarray([classifier.class_names.index(g.label) for g in images])
    return {
        "images": len(images),
        "sha256": golden_sha256(images),
        "accuracy": float((probabilities.argmax(1) == labels).mean()),
        "probabilities": {
            g.sha256: [round(float(v), 6) for v in p] for g, p in zip(images, probabilities, strict=True)
        },
        "class_names": list(classifier.class_names),
    }


@dataclass
class GoldenSet:
    """The service's golden check (``serve.golden_*``)."""

    folder: Path
    min_accuracy: float | None
    max_drop: float | None
    tolerance: float
    images: list[GoldenImage] = field(default_factory=list)
    #: the last check's outcome, for /v1/model
    last: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = golden_images(self.folder)

    def check(
        self, classifier, serving_accuracy: float | None, recorded: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Score ``classifier``; :class:`GoldenRefused` naming why when it must not be swapped
        in. ``serving_accuracy``: the serving model's accuracy on the set (None at start or
        when it could not score it); ``recorded``: the scores stored at registration (None
        when the source has none)."""
        result: dict[str, Any] = {"checked_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        try:
            new = score_golden(classifier, self.images)
        except ValueError as exc:
            self.last = {**result, "passed": False, "reason": str(exc)}
            raise GoldenRefused(f"golden set {self.folder}: {exc}") from None
        result |= {"images": new["images"], "golden_sha256": new["sha256"], "accuracy": new["accuracy"]}
        reasons = []
        if self.min_accuracy is not None and new["accuracy"] < self.min_accuracy:
            reasons.append(
                f"accuracy {new['accuracy']:.4f} is below serve.golden_min_accuracy {self.min_accuracy:g}"
            )
        if serving_accuracy is not None and self.max_drop is not None:
            result["serving_accuracy"] = serving_accuracy
            if new["accuracy"] < serving_accuracy - self.max_drop - 1e-12:
                reasons.append(
                    f"accuracy {new['accuracy']:.4f} is more than serve.golden_max_drop {self.max_drop:g} "
                    f"below the serving model's {serving_accuracy:.4f}"
                )
        if recorded is None:
            result["recorded"] = (
                "none: this source carries no scores from registration (accuracy checks only)"
            )
        else:
            shared = [h for h in new["probabilities"] if h in recorded.get("probabilities", {})]
            result["compared_with_registration"] = len(shared)
            if recorded.get("class_names") != new["class_names"]:
                reasons.append("the scores recorded at registration are of other classes")
            elif not shared:
                result["recorded"] = (
                    "no image of this golden set was scored at registration (the folder changed since): "
                    "accuracy checks only; re-record with dvc repro -f register"
                )
            else:
                worst = max(
                    float(
                        np.abs(
                            np.asarray(new["probabilities"][h]) - np.asarray(recorded["probabilities"][h])
                        ).max()
                    )
                    for h in shared
                )
                result["max_probability_difference"] = worst
                if worst > self.tolerance:
                    reasons.append(
                        f"probabilities differ by up to {worst:.4f} from those recorded at registration "
                        f"(serve.golden_tolerance {self.tolerance:g}): another model file, runtime or "
                        "provider"
                    )
        result["passed"] = not reasons
        if reasons:
            result["reason"] = "; ".join(reasons)
        self.last = result
        if reasons:
            raise GoldenRefused(f"golden set {self.folder} ({new['images']} images): " + "; ".join(reasons))
        return result


class GoldenRefused(UserError):
    """A model the golden set refused (the service keeps the one it serves)."""


#: model version tags the register stage writes for the golden set (read back by the service)
GOLDEN_TAGS = {"run_id": "golden.run_id", "sha256": "golden.sha256", "accuracy": "golden.accuracy",
               "images": "golden.images"}  # fmt: skip
#: where the scores recorded at registration live in the register run's artifacts
GOLDEN_ARTIFACT = "golden/golden.json"


def recorded_golden(about: dict[str, Any], tracking_uri: str | None) -> tuple[dict[str, Any] | None, str]:
    """The golden scores recorded when this registered version was registered, or None and
    why (a file or bundle source, or a version registered without a golden set)."""
    if not about.get("name") or not about.get("version"):
        return None, "not a registered version"
    from mlflow.artifacts import download_artifacts

    from synermix.tracking import client, quiet_mlflow_logs

    quiet_mlflow_logs()
    try:
        store = client(tracking_uri)
        tags = store.get_model_version(about["name"], about["version"]).tags or {}
        run_id = tags.get(GOLDEN_TAGS["run_id"])
        if not run_id:
            return None, "registered without a golden set (registry.golden_set)"
        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifacts(
                run_id=run_id, artifact_path=GOLDEN_ARTIFACT, dst_path=tmp, tracking_uri=store.tracking_uri
            )
            return json.loads(Path(path).read_text()), ""
    except Exception as exc:  # MLflow down, artifact gone: judged on accuracy only, and said so
        return None, f"the scores recorded at registration could not be read ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- review queue
_MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def image_suffix(data: bytes) -> str:
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".png")


class ReviewQueue:
    """Images to label, saved by content hash under their predicted class (see module doc)."""

    INDEX = "review.jsonl"

    def __init__(self, folder: Path, per_class_per_day: int, on_result=None) -> None:
        self.folder = Path(folder)
        self.per_class_per_day = per_class_per_day
        self.on_result = on_result
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._seen: set[str] = set()

    def _count_today(self, day: str, label: str) -> int:
        """Files already saved today for ``label`` (so a restart keeps the cap)."""
        folder = self.folder / label
        if not folder.is_dir():
            return 0
        return sum(
            1
            for p in folder.iterdir()
            if p.is_file() and datetime.fromtimestamp(p.stat().st_mtime, UTC).strftime("%Y-%m-%d") == day
        )

    def offer(self, data: bytes, label: str, reason: str, detail: dict[str, Any]) -> str:
        """Save the image when it is new and under today's cap: saved | duplicate | capped | failed."""
        sha = hashlib.sha256(data).hexdigest()
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        path = self.folder / label / f"{sha[:32]}{image_suffix(data)}"
        with self._lock:
            if sha in self._seen or path.exists():
                self._seen.add(sha)
                return self._done("duplicate")
            key = (day, label)
            if key not in self._counts:
                self._counts[key] = self._count_today(day, label)
            if self._counts[key] >= self.per_class_per_day:
                return self._done("capped")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as out:
                        out.write(data)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                entry = {
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "file": f"{label}/{path.name}",
                    "reason": reason,
                    "sha256": sha,
                    **detail,
                }
                with (self.folder / self.INDEX).open("a", encoding="utf-8") as index:
                    index.write(json.dumps(entry, sort_keys=True) + "\n")
            except OSError as exc:
                log.warning("review image not saved (%s): requests are not affected", exc.strerror or exc)
                return self._done("failed")
            self._seen.add(sha)
            self._counts[key] += 1
            return self._done("saved")

    def _done(self, result: str) -> str:
        if self.on_result:
            self.on_result(result)
        return result
