"""The inspection-line service: one HTTP process that classifies images with an exported model.

- **Model**: a bundle folder (checksums verified), an .onnx file, or a registered version
  ``models:/<name>@<alias>`` (needs MLflow). Everything else comes from the ONNX file's
  own metadata (:mod:`synermix.inference`), so the service needs no training code.
- **Hot swap**: a watcher checks the model's source every ``poll_seconds`` (the alias's
  version, the bundle's SHA256SUMS, the file's size and time). A change is loaded *beside*
  the serving model and swapped in by one reference assignment; requests already running
  finish on the old model, which is closed once none uses it. A model that fails to load
  (or to verify) leaves the old one serving, and the failure is counted and shown.
- **Micro-batching**: requests are decoded in threads, then queued to one inference thread
  per model that runs everything queued as one onnxruntime batch. Nothing waits for a
  batch to fill: at concurrency 1 a request runs alone (no added latency); under load,
  the requests that arrive while a batch runs form the next one.
- **Shadow mode**: an optional second model (e.g. ``@pilot``) scores the same images after
  the answer is sent; agreement is counted in the metrics and each comparison is written
  to a JSON-lines log, so a pilot can be judged on live traffic without affecting it.
- **Safety**: loopback by default; an optional bearer token (constant-time compare) on
  everything but health, readiness and metrics; a Host allow-list; a request size limit
  that counts the bytes received (Content-Length required, no Transfer-Encoding); header,
  body and idle deadlines and a connection limit; decodes bounded by a memory budget and
  by the header's size and aspect ratio; a bad image is a 4xx with the reason; a model
  that fails at inference answers 503 and takes ``/readyz`` down until it runs again.

Endpoints: ``GET /healthz``, ``GET /readyz``, ``GET /v1/model``, ``POST /v1/predict`` (one
image: raw bytes, or multipart with one file), ``POST /v1/predict/batch`` (multipart, many
files; a bad file is a row with its error), ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import math
import queue
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request

from synermix.config import MonitorParams, ServeParams
from synermix.data.images import decode_bytes
from synermix.errors import UserError
from synermix.inference import DEFAULT_MAX_PIXELS, BadImage, Classifier
from synermix.metrics import softmax
from synermix.model_source import fingerprint, is_registry, model_file, registry_about

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs: ``serve:`` of params.yaml with the command line's flags over it
    (:meth:`from_params`), plus what never goes in a params file (the token) and the MLflow
    store a ``models:/`` spec is read from. See docs/serve.md."""

    model: str
    shadow: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    abstain: float = 0.0
    max_request_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64
    poll_seconds: float = 30.0
    max_batch: int = 32
    provider: str = "auto"
    threads: int | None = None
    shadow_log: Path | None = None
    tracking_uri: str | None = None
    #: memory all images decoding at once may take (each reserves its header's estimate)
    decode_memory_bytes: int = 512 * 2**20
    #: a request's headers must arrive within this; its body within body_timeout
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    #: an idle keep-alive connection is closed after this
    idle_timeout: float = 5.0
    max_connections: int = 256
    #: Host header names accepted (port ignored); None: loopback names when bound to a
    #: loopback address, else any; ("*",): any
    allowed_hosts: tuple[str, ...] | None = None
    #: drift monitoring: the record log (None: none), its cap, the live check's cadence and
    #: settings (synermix.config.MonitorParams; None: the defaults)
    records: Path | None = None
    records_max_bytes: int = 32 * 2**20
    records_keep: int = 4
    monitor_every: int = 50
    monitor: Any = None
    seed: int = 0
    #: the golden set every new model must pass (None: no check)
    golden_set: Path | None = None
    golden_min_accuracy: float | None = None
    golden_max_drop: float | None = 0.02
    golden_tolerance: float = 0.02
    #: review queue folder (None: none kept)
    review_dir: Path | None = None
    review_per_class_per_day: int = 100

    @classmethod
    def from_params(
        cls,
        serve: ServeParams,
        token: str | None = None,
        tracking_uri: str | None = None,
        monitor: MonitorParams | None = None,
        seed: int = 0,
    ) -> ServeSettings:
        return cls(
            model=serve.model,
            shadow=serve.shadow,
            host=serve.host,
            port=serve.port,
            token=token,
            abstain=serve.abstain,
            max_request_bytes=int(serve.max_request_mb * 2**20),
            max_pixels=serve.max_pixels,
            max_files=serve.max_files,
            poll_seconds=serve.poll_seconds,
            max_batch=serve.max_batch,
            provider=serve.provider,
            threads=serve.threads,
            shadow_log=Path(serve.shadow_log) if serve.shadow and serve.shadow_log else None,
            tracking_uri=tracking_uri,
            decode_memory_bytes=int(serve.decode_memory_mb * 2**20),
            header_timeout=serve.header_timeout_s,
            body_timeout=serve.body_timeout_s,
            idle_timeout=serve.idle_timeout_s,
            max_connections=serve.max_connections,
            allowed_hosts=tuple(serve.allowed_hosts) if serve.allowed_hosts is not None else None,
            records=Path(serve.records) if serve.records else None,
            records_max_bytes=int(serve.records_max_mb * 2**20),
            records_keep=serve.records_keep,
            monitor_every=serve.monitor_every,
            monitor=monitor,
            seed=seed,
            golden_set=Path(serve.golden_set) if serve.golden_set else None,
            golden_min_accuracy=serve.golden_min_accuracy,
            golden_max_drop=serve.golden_max_drop,
            golden_tolerance=serve.golden_tolerance,
            review_dir=Path(serve.review_dir) if serve.review_dir else None,
            review_per_class_per_day=serve.review_per_class_per_day,
        )

    def host_names(self) -> frozenset[str] | None:
        """The Host names accepted, lower case; None: any."""
        if self.allowed_hosts is not None:
            names = {h.lower() for h in self.allowed_hosts}
            return None if "*" in names else frozenset(names)
        if self.host in LOOPBACK_HOSTS:
            return frozenset(LOOPBACK_HOSTS)
        return None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class Busy(Exception):
    """The service cannot take this image now (a 503 with Retry-After); ``str()`` says why."""


class DecodeBudget:
    """Bounds the memory of all decodes in flight: each image reserves what its header says
    decoding takes (:func:`synermix.data.images.decode_bytes`) and waits for room; one that
    could never fit is refused, and one that waits past ``wait_seconds`` is :class:`Busy`."""

    def __init__(self, total_bytes: int, wait_seconds: float = 30.0) -> None:
        self.total = total_bytes
        self.wait_seconds = wait_seconds
        self.used = 0
        self._room = threading.Condition()

    @contextmanager
    def reserve(self, width: int, height: int, mode: str) -> Iterator[None]:
        need = decode_bytes(width, height, mode)
        if need > self.total:
            raise BadImage(
                f"{width}x{height} {mode} needs about {need / 2**20:.0f} MiB to decode, more than "
                f"serve.decode_memory_mb ({self.total / 2**20:g} MiB): send a smaller image"
            )
        with self._room:
            if not self._room.wait_for(lambda: self.used + need <= self.total, self.wait_seconds):
                raise Busy(f"{self.wait_seconds:g} s without room to decode: the service is overloaded")
            self.used += need
        try:
            yield
        finally:
            with self._room:
                self.used -= need
                self._room.notify_all()


# --------------------------------------------------------------------------- models
class MicroBatcher:
    """One inference thread per model: runs every queued input as one batch."""

    def __init__(self, classifier: Classifier, max_batch: int, on_batch=None) -> None:
        self.classifier = classifier
        self.max_batch = max_batch
        self.on_batch = on_batch
        self.closed = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="synermix-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.closed:  # a straggler after a swap: run it here rather than never
            self._answer([(x, future)])
        else:
            self._queue.put((x, future))
        return future

    def close(self) -> None:
        """Stop after answering everything queued so far."""
        self.closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while True:
            if stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
            else:
                item = self._queue.get()
            if item is None:
                stopping = True
                continue
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    continue
                batch.append(more)
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        try:
            logits, distances, embeddings = self.classifier.all_outputs(np.stack([x for x, _ in batch]))
            probabilities = softmax(logits)
        except Exception as exc:  # a failed run fails its requests, not the thread
            for _, future in batch:
                future.set_exception(exc)
            return
        for i, ((_, future), p) in enumerate(zip(batch, probabilities, strict=True)):
            # (calibrated probabilities, feature distance or nan, monitoring embedding or None)
            future.set_result(
                (
                    p,
                    math.nan if distances is None else float(distances[i]),
                    None if embeddings is None else embeddings[i],
                )
            )
        if self.on_batch:
            self.on_batch(len(batch))


@dataclass
class LoadedModel:
    """A model ready to serve, what it is, and how many requests use it right now."""

    spec: str
    classifier: Classifier
    batcher: MicroBatcher
    fingerprint: str
    about: dict[str, Any]
    tmp: tempfile.TemporaryDirectory | None = None
    inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: the reference profile stored in the model (None: no drift monitoring, see profile_note)
    profile: Any = None
    profile_note: str = ""

    def close(self) -> None:
        self.batcher.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def decision_about(classifier: Classifier) -> dict[str, Any]:
    """The operating point and unknown-part threshold the model applies (for /v1/model)."""
    point = classifier.info.operating_point
    return {
        "defect_classes": [] if point is None else point.defect_classes,
        "accept_below": None if point is None else point.accept_below,
        "reject_from": None if point is None else point.reject_from,
        "unknown_above": classifier.info.unknown_above,
    }


def load_model(
    spec: str, settings: ServeSettings, on_batch=None, budget: DecodeBudget | None = None
) -> LoadedModel:
    """Load (verify, download) the model behind ``spec``; UserError when it cannot serve."""
    before = fingerprint(spec, settings.tracking_uri)
    tmp = tempfile.TemporaryDirectory(prefix="synermix-serve-") if is_registry(spec) else None
    try:
        path = model_file(spec, Path(tmp.name) if tmp else Path("."), settings.tracking_uri)
        try:  # the constructor also runs one synthetic input: a model that cannot run stays out
            classifier = Classifier(
                path, settings.provider, settings.max_pixels, settings.threads, spin=False
            )
        except Exception as exc:  # onnxruntime raises plain Exception subclasses for a bad file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{spec}: not a model this service can run ({reason})") from None
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    extra = classifier.info.extra
    about = {
        "spec": spec,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "provider": classifier.provider,
        "classes": classifier.class_names,
        "input": {
            "image_size": classifier.info.image_size,
            "channels": classifier.info.channels,
        },
        "training_run_id": extra.get("training_run_id", ""),
        "weights_sha256": extra.get("weights_sha256", ""),
        "decision": decision_about(classifier),
        "loaded_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **registry_about(spec, before),
    }
    log.info("loaded %s (%s) on %s", spec, about.get("version") or about["sha256"][:12], classifier.provider)
    classifier.preprocess.reserve = budget.reserve if budget is not None else None
    profile, note = _profile(classifier, spec)
    about["monitoring"] = {"profile": profile is not None, "note": note}
    batcher = MicroBatcher(classifier, settings.max_batch, on_batch)
    return LoadedModel(spec, classifier, batcher, before, about, tmp, profile=profile, profile_note=note)


def _profile(classifier: Classifier, spec: str) -> tuple[Any, str]:
    """The model's reference profile, or None and why (drift monitoring then stays off)."""
    from synermix.profile import profile_from_metadata

    if classifier.embedding_name is None:
        return None, "the model has no embedding output (exported before monitoring): no drift monitoring"
    try:
        profile = profile_from_metadata(classifier.session.get_modelmeta().custom_metadata_map, spec)
    except ValueError as exc:
        return None, f"{exc}: no drift monitoring"
    if profile.class_names != classifier.class_names:
        return None, "its profile names other classes than the model: no drift monitoring"
    return profile, ""


class ModelSlot:
    """The model a route serves, swapped atomically; requests hold it while they use it."""

    #: a refused model is tried again after this back-off, doubled on each refusal up to the most
    RETRY_SECONDS = (5.0, 600.0)

    def __init__(
        self,
        spec: str,
        settings: ServeSettings,
        metrics: Metrics,
        role: str,
        budget: DecodeBudget | None = None,
        golden: Any = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self.role = role
        self.budget = budget
        #: the golden set (synermix.watch.GoldenSet) a model must pass before it serves here
        self.golden = golden
        self.current: LoadedModel | None = None
        self.last_error = ""
        #: why the model served now failed at inference (not ready until a run succeeds)
        self.failing = ""
        self._refused: tuple[str, float, float] | None = None  # (fingerprint, retry at, back-off)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def load(self) -> None:
        def observe(size: int) -> None:
            self.metrics.batch_size.observe(size)

        model = load_model(self.spec, self.settings, observe, self.budget)
        if self.golden is not None:
            try:
                self._golden_check(model)
            except BaseException:
                model.close()
                raise
        old, self.current = self.current, model
        self.failing = ""
        self.metrics.set_model(self.role, model.about)
        if old is not None:
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()

    def _golden_check(self, model: LoadedModel) -> None:
        """Score the golden set with ``model`` before it may serve (GoldenRefused when not)."""
        from synermix.watch import recorded_golden

        recorded, note = recorded_golden(model.about, self.settings.tracking_uri)
        serving = None if self.current is None else self.current.about.get("golden", {}).get("accuracy")
        try:
            result = self.golden.check(model.classifier, serving, recorded)
        finally:
            if "accuracy" in self.golden.last:
                self.metrics.golden_accuracy.labels(self.role, "candidate").set(self.golden.last["accuracy"])
        if note:
            result["recorded"] = note
        model.about["golden"] = result
        self.metrics.golden_accuracy.labels(self.role, "serving").set(result["accuracy"])
        log.info("golden set passed: accuracy %.4f on %d images", result["accuracy"], result["images"])

    @contextmanager
    def use(self) -> Iterator[LoadedModel]:
        model = self.current
        if model is None:
            raise RuntimeError("no model loaded")
        with model.lock:
            model.inflight += 1
        try:
            yield model
        finally:
            with model.lock:
                model.inflight -= 1

    def _retire(self, model: LoadedModel, wait_seconds: float = 120.0) -> None:
        """Close a replaced model once no request uses it any more."""
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            with model.lock:
                if model.inflight == 0:
                    break
            time.sleep(0.05)
        model.close()

    def check(self) -> bool:
        """Load the model again when its source changed; True when it was swapped."""
        try:
            now = fingerprint(self.spec, self.settings.tracking_uri)
        except Exception as exc:  # a vanished file mid-replace, MLflow down: try again later
            self.last_error = f"cannot check {self.spec}: {exc}"
            return False
        if self.current is not None and now == self.current.fingerprint:
            return False
        refused = self._refused
        if refused is not None and now == refused[0] and time.monotonic() < refused[1]:
            return False  # the same refused model: tried again after a back-off, not every poll
        try:
            self.load()
        except Exception as exc:  # keep serving the old model
            from synermix.watch import GoldenRefused

            first, most = self.RETRY_SECONDS
            delay = min(most, refused[2] * 2) if refused is not None and now == refused[0] else first
            self.last_error = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {exc} (tried again in {delay:g} s)"
            self._refused = (now, time.monotonic() + delay, delay)
            result = "refused_golden" if isinstance(exc, GoldenRefused) else "failed"
            self.metrics.reloads.labels(self.role, result).inc()
            log.error("%s model not swapped, still serving the old one: %s", self.role, exc)
            return False
        self.last_error = ""
        self._refused = None
        self.metrics.reloads.labels(self.role, "swapped").inc()
        log.info("%s model swapped in: %s", self.role, self.current.about.get("version") or self.spec)
        return True

    def start_watching(self) -> None:
        if self.settings.poll_seconds <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(self.settings.poll_seconds):
                self.check()

        self._watcher = threading.Thread(target=loop, name=f"synermix-watch-{self.role}", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self.current is not None:
            self.current.close()


# --------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in the app's own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("synermix_requests", "HTTP requests", ["endpoint", "code"], registry=r)
        self.latency = Histogram(
            "synermix_request_seconds",
            "Request latency",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.predictions = Counter("synermix_predictions", "Images classified", ["role", "class"], registry=r)
        self.abstentions = Counter("synermix_abstentions", "Images below the abstain threshold", registry=r)
        self.decisions = Counter(
            "synermix_decisions",
            "Line decisions (accept | reject | review | unknown; none: the model has no operating point)",
            ["role", "decision", "class"],
            registry=r,
        )
        self.bad_images = Counter("synermix_bad_images", "Images that could not be scored", registry=r)
        self.batch_size = Histogram(
            "synermix_batch_size", "Images per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.reloads = Counter("synermix_model_reloads", "Model swaps", ["role", "result"], registry=r)
        self.shadow = Counter("synermix_shadow_comparisons", "Shadow model results", ["agree"], registry=r)
        self.golden_accuracy = Gauge(
            "synermix_golden_accuracy",
            "Accuracy on the golden set (serving: the model serving now; candidate: the last one checked)",
            ["role", "model"],
            registry=r,
        )
        self.records = Counter("synermix_monitor_records", "Monitoring records", ["result"], registry=r)
        self.review = Counter("synermix_review_images", "Review-queue offers", ["result"], registry=r)
        self.drift_alarm = Gauge(
            "synermix_drift_alarm", "1 when the last live drift check raised an alarm", registry=r
        )
        self.drift_p = Gauge(
            "synermix_drift_p_value",
            "p-value of each test of the last live drift check",
            ["slice", "test"],
            registry=r,
        )
        self.drift_records = Gauge(
            "synermix_drift_window_records", "Records in the last live check", registry=r
        )
        self.drift_checks = Counter("synermix_drift_checks", "Live drift checks run", registry=r)

        self._served: dict[str, tuple[str, ...]] = {}
        self.model = Gauge(
            "synermix_model_info",
            "The model served",
            ["role", "version", "alias", "sha256", "provider"],
            registry=r,
        )

    def set_drift(self, verdict: dict[str, Any]) -> None:
        """The gauges of one live drift verdict (series of slices no longer present go)."""
        self.drift_p.clear()
        for s in verdict["slices"]:
            for t in s["tests"]:
                self.drift_p.labels(s["slice"], t["test"]).set(t["p_value"])
        self.drift_alarm.set(1.0 if verdict["drift"] else 0.0)
        self.drift_records.set(verdict["records"])
        self.drift_checks.inc()

    def set_model(self, role: str, about: dict[str, Any]) -> None:
        """One series per role: the model served now (the replaced one's series goes)."""
        labels = (role, str(about.get("version", "")), str(about.get("alias", "")), about["sha256"][:12],
                  about["provider"])  # fmt: skip
        previous = self._served.get(role)
        if previous is not None and previous != labels:
            self.model.remove(*previous)
        self._served[role] = labels
        self.model.labels(*labels).set(1)


# --------------------------------------------------------------------------- shadow
class ShadowLog:
    """Each shadow comparison as one JSON line (thread-safe, appended, flushed)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(record, sort_keys=True)
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")


# --------------------------------------------------------------------------- app
class Service:
    """The models, metrics and shadow of one running service."""

    def __init__(self, settings: ServeSettings) -> None:
        from synermix.watch import GoldenSet, LiveDrift, ReviewQueue

        self.settings = settings
        self.metrics = Metrics()
        self.budget = DecodeBudget(settings.decode_memory_bytes)
        golden = (
            GoldenSet(
                settings.golden_set,
                settings.golden_min_accuracy,
                settings.golden_max_drop,
                settings.golden_tolerance,
            )
            if settings.golden_set is not None
            else None
        )
        self.primary = ModelSlot(settings.model, settings, self.metrics, "primary", self.budget, golden)
        self.records = None
        if settings.records is not None:
            from synermix.monitor import RecordLog

            self.records = RecordLog(
                settings.records,
                settings.records_max_bytes,
                settings.records_keep,
                on_drop=self.metrics.records.labels("dropped").inc,
                on_write=self.metrics.records.labels("written").inc,
            )
        self.live = LiveDrift(
            settings.monitor or MonitorParams(), settings.monitor_every, self.metrics.set_drift, settings.seed
        )
        self.review = (
            ReviewQueue(
                settings.review_dir,
                settings.review_per_class_per_day,
                on_result=lambda r: self.metrics.review.labels(r).inc(),
            )
            if settings.review_dir is not None
            else None
        )
        #: review-queue writes: off the request path, bounded (skipped, not queued, past it)
        self._review_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="review")
        self._review_room = threading.BoundedSemaphore(64)
        self.shadow = (
            ModelSlot(settings.shadow, settings, self.metrics, "shadow", self.budget)
            if settings.shadow
            else None
        )
        self.shadow_log = ShadowLog(settings.shadow_log)
        self._shadow_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="shadow")
        # shadow work waiting at most: under overload comparisons are skipped, not queued forever
        self._shadow_room = threading.BoundedSemaphore(256)

    def start(self) -> None:
        self.primary.load()
        self.primary.start_watching()
        if self.shadow is not None:
            try:
                self.shadow.load()
            except UserError as exc:  # a shadow never stops the line
                self.shadow.last_error = str(exc)
                log.error("shadow model not loaded (the service runs without it): %s", exc)
            self.shadow.start_watching()

    def stop(self) -> None:
        self._shadow_pool.shutdown(wait=False, cancel_futures=True)
        self._review_pool.shutdown(wait=True)
        if self.records is not None:
            self.records.close()
        self.primary.stop()
        if self.shadow is not None:
            self.shadow.stop()

    @property
    def monitoring(self) -> bool:
        """Whether requests are recorded (a record log, or the live drift check)."""
        return self.records is not None or self.settings.monitor_every > 0

    async def classify(
        self, name: str, data: bytes, slices: dict[str, str] | None = None
    ) -> tuple[dict, dict]:
        """One image -> (the prediction row, the model's description); BadImage when unreadable.
        ``slices``: the request's slice keys (camera, line) for its monitoring record."""
        from starlette.concurrency import run_in_threadpool

        with self.primary.use() as model:
            watched = self.monitoring and model.profile is not None
            try:
                if watched:
                    x, stats = await run_in_threadpool(model.classifier.preprocess.with_statistics, data)
                else:
                    x, stats = await run_in_threadpool(model.classifier.preprocess, data), None
            except (BadImage, Busy) as exc:
                if isinstance(exc, BadImage):
                    self.metrics.bad_images.inc()
                raise
            except Exception as exc:  # Pillow can raise odd errors on hostile files: still the input's fault
                self.metrics.bad_images.inc()
                raise BadImage(f"not a readable image ({type(exc).__name__}: {exc})") from None
            try:
                probabilities, distance, embedding = await asyncio.wrap_future(model.batcher.submit(x))
            except Exception as exc:  # the model, not the image: not ready until a run succeeds
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if model is self.primary.current:
                    self.primary.failing = f"inference failed: {reason}"
                log.error("inference failed on %s: %s", model.spec, reason)
                raise Busy(f"the model failed at inference ({reason})") from None
            if self.primary.failing and model is self.primary.current:
                self.primary.failing = ""
            result = model.classifier.result(name, probabilities, self.settings.abstain, distance)
            about = model.about
            row = result.to_row(model.classifier.class_names)
            profile = model.profile
        if watched:
            self._record(result, stats, embedding, about, slices or {}, profile)
        if result.decision in ("review", "unknown") or result.status == "abstain":
            self._to_review(data, result, about, result.decision or "abstain")
        self.metrics.predictions.labels("primary", result.label).inc()
        self.metrics.decisions.labels("primary", result.decision or "none", result.label).inc()
        if result.status == "abstain":
            self.metrics.abstentions.inc()
        if self.shadow is not None and self.shadow.current is not None:
            if self._shadow_room.acquire(blocking=False):
                self._shadow_pool.submit(self._compare, name, data, (model.classifier.info, x), result, about)
            else:
                self.metrics.shadow.labels("skipped").inc()
        return row, about

    def _record(self, result, stats, embedding, about: dict, slices: dict[str, str], profile) -> None:
        """The request's monitoring record: to the log and the live drift window."""
        from synermix.monitor import make_record

        record = make_record(
            result.path, result.label, result.confidence, result.decision, stats, embedding, about, slices
        )
        if self.records is not None:
            self.records.add(record)
        self.live.add(record, profile)

    def _to_review(self, data: bytes, result, about: dict, reason: str, extra: dict | None = None) -> None:
        """Offer the image to the review queue, off the request path (skipped under overload)."""
        if self.review is None:
            return
        if not self._review_room.acquire(blocking=False):
            self.metrics.review.labels("skipped").inc()
            return
        detail = {
            "image": result.path,
            "class": result.label,
            "confidence": round(result.confidence, 6),
            "decision": result.decision,
            "version": str(about.get("version", "")),
            "model_sha256": about.get("sha256", "")[:12],
            **(extra or {}),
        }

        def save() -> None:
            try:
                self.review.offer(data, result.label, reason, detail)
            finally:
                self._review_room.release()

        try:
            self._review_pool.submit(save)
        except RuntimeError:  # shutting down
            self._review_room.release()

    def _compare(self, name: str, data: bytes, prepared: tuple, primary, about: dict) -> None:
        """Score the same image with the shadow model; count and log the agreement."""
        try:
            self._shadow_score(name, data, prepared, primary, about)
        finally:
            self._shadow_room.release()

    def _shadow_score(self, name: str, data: bytes, prepared: tuple, primary, about: dict) -> None:
        info, x = prepared
        try:
            with self.shadow.use() as model:
                if model.classifier.class_names != list(primary.scores):
                    raise ValueError("the shadow model knows other classes")
                mine = model.classifier.info
                same_input = (mine.preprocessing, mine.prepare_image_size) == (
                    info.preprocessing,
                    info.prepare_image_size,
                )
                # a pilot may take another input size: then it decodes the bytes its own way
                x = x if same_input else model.classifier.preprocess(data)
                p, distance, _ = model.batcher.submit(x).result(timeout=60)
                shadow = model.classifier.result(name, p, self.settings.abstain, distance)
                shadow_about = model.about
        except Exception as exc:
            log.warning("shadow comparison failed for %s: %s", name, exc)
            self.metrics.shadow.labels("error").inc()
            return
        agree = shadow.label == primary.label
        self.metrics.shadow.labels(str(agree).lower()).inc()
        if not agree:
            extra = {"shadow_class": shadow.label, "shadow_version": str(shadow_about.get("version", ""))}
            self._to_review(data, primary, about, "shadow disagrees", extra)
        self.metrics.predictions.labels("shadow", shadow.label).inc()
        self.metrics.decisions.labels("shadow", shadow.decision or "none", shadow.label).inc()
        self.shadow_log.write(
            {
                "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "image": name,
                "agree": agree,
                "primary": {"class": primary.label, "confidence": round(primary.confidence, 6),
                            "decision": primary.decision,
                            "version": about.get("version", ""), "sha256": about["sha256"][:12]},
                "shadow": {"class": shadow.label, "confidence": round(shadow.confidence, 6),
                           "decision": shadow.decision,
                           "version": shadow_about.get("version", ""), "sha256": shadow_about["sha256"][:12]},
            }
        )  # fmt: skip

    def describe(self) -> dict:
        out: dict[str, Any] = {"primary": self.primary.current.about if self.primary.current else None}
        if self.primary.last_error:
            out["primary_reload_error"] = self.primary.last_error
        if self.shadow is not None:
            out["shadow"] = self.shadow.current.about if self.shadow.current else None
            if self.shadow.last_error:
                out["shadow_error"] = self.shadow.last_error
        out["abstain_below"] = self.settings.abstain
        current = self.primary.current
        out["monitoring"] = {
            "records": None
            if self.records is None
            else {
                "file": str(self.records.path),
                "written": self.records.written,
                "dropped": self.records.dropped,
            },
            "live_drift": self.live.describe() if self.settings.monitor_every > 0 else None,
            "note": "" if current is None else current.profile_note,
        }
        if self.primary.golden is not None:
            out["golden"] = {
                "folder": str(self.primary.golden.folder),
                "last_check": self.primary.golden.last,
            }
        if self.review is not None:
            out["review_dir"] = str(self.review.folder)
        return out


def create_app(service: Service):
    """The FastAPI app around a started :class:`Service`."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    settings = service.settings
    app = FastAPI(title="synermix inspection service", docs_url=None, redoc_url=None, openapi_url=None)
    open_paths = {"/healthz", "/readyz", "/metrics"}

    def problem(code: int, detail: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": detail}, status_code=code, headers=headers or None)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if service.primary.current is None:
            return problem(503, "no model loaded")
        if service.primary.failing:
            return problem(503, service.primary.failing)
        return {"status": "ready", "version": service.primary.current.about.get("version", "")}

    @app.get("/v1/model")
    async def model_info():
        return service.describe()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def files_of(request: Request, most: int) -> list[tuple[str, bytes]]:
        """The images a request carries: its raw body, or the file parts of a multipart form."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(
                max_files=most, max_fields=most, max_part_size=settings.max_request_bytes
            )
            try:
                fields = [k for k, v in form.multi_items() if not hasattr(v, "read")]
                if fields:  # a part with no filename= is a text field to the parser: never dropped
                    raise _Refused(
                        400,
                        f"form part {fields[0][:80]!r} is not a file: give it a filename "
                        f'(Content-Disposition: form-data; name="{fields[0][:80]}"; filename="cell.png")',
                    )
                return [(part_name(v, k), await v.read()) for k, v in form.multi_items()]
            finally:
                await form.close()
        if kind and not kind.startswith(IMAGE_TYPES):
            raise _Refused(
                415, f"Content-Type {kind} is not an image: send image/* bytes or multipart/form-data"
            )
        return [("body", await request.body())]

    def slices_of(request: Request) -> dict[str, str]:
        """The monitoring slice keys a request names (X-Camera-Id, X-Line-Id)."""
        from synermix.monitor import SLICE_HEADERS, slice_value

        return {
            key: slice_value(request.headers[h]) for h, key in SLICE_HEADERS.items() if request.headers.get(h)
        }

    @app.post("/v1/predict")
    async def predict(request: Request):
        try:
            files = await files_of(request, 1)
        except _Refused as exc:
            return problem(exc.code, exc.detail)
        except Exception as exc:  # malformed multipart
            return problem(400, f"malformed request body ({exc})")
        if len(files) != 1:
            return problem(400, f"send exactly one image ({len(files)} given); many go to /v1/predict/batch")
        name, data = files[0]
        if not data:
            return problem(400, "empty body: send the image file's bytes")
        try:
            row, about = await service.classify(name, data, slices_of(request))
        except BadImage as exc:
            return problem(422, str(exc))
        except Busy as exc:
            return problem(503, str(exc), **{"Retry-After": "5"})
        return JSONResponse({"model": _short_about(about), "prediction": row})

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request):
        try:
            files = await files_of(request, settings.max_files)
        except _Refused as exc:
            return problem(exc.code, exc.detail)
        except Exception as exc:
            return problem(400, f"malformed multipart body ({exc}); at most {settings.max_files} files")
        if not files:
            return problem(400, "no files: send multipart/form-data with one or more image files")
        # all at once: decoded in parallel, then queued together, so the batcher runs them as
        # one onnxruntime batch
        answers = await asyncio.gather(
            *(service.classify(name, data, slices_of(request)) for name, data in files),
            return_exceptions=True,
        )
        busy = next((a for a in answers if isinstance(a, Busy)), None)
        if busy is not None:
            return problem(503, str(busy), **{"Retry-After": "5"})
        rows: list[dict] = []
        about: dict = {}
        for (name, _), answer in zip(files, answers, strict=True):
            if isinstance(answer, BadImage):
                rows.append({"path": name, "status": "error", "error": str(answer)})
            elif isinstance(answer, BaseException):
                raise answer
            else:
                row, about = answer
                rows.append(row)
        return JSONResponse(
            {"model": _short_about(about or service.primary.current.about), "predictions": rows}
        )

    routes = {"/healthz", "/readyz", "/v1/model", "/metrics", "/v1/predict", "/v1/predict/batch"}
    app.add_middleware(_Guard, service=service, open_paths=open_paths, routes=routes, problem=problem)
    return app


class _Guard:
    """Host, token, framing and size checks before a route runs, the body read under its
    deadline and byte limit, and the request metrics.

    Plain ASGI rather than ``@app.middleware("http")``: that wrapper costs a task and a
    response copy per request, which shows at concurrency 1."""

    def __init__(self, app, service: Service, open_paths: set[str], routes: set[str], problem) -> None:
        self.app = app
        self.service = service
        self.open_paths = open_paths
        self.routes = routes
        self.problem = problem
        token = service.settings.token
        self.expected = f"Bearer {token}".encode() if token else None
        self.hosts = service.settings.host_names()

    def refusal(self, scope: dict):
        headers = scope["headers"]
        named = dict(headers)
        limit = self.service.settings.max_request_bytes
        if self.hosts is not None and _host_name(named.get(b"host", b"")) not in self.hosts:
            return self.problem(
                421, "this Host is not served here: add it to serve.allowed_hosts (or --allowed-host)"
            )
        guarded = self.expected is not None and scope["path"] not in self.open_paths
        if guarded and not hmac.compare_digest(named.get(b"authorization", b""), self.expected):
            return self.problem(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST":
            if b"transfer-encoding" in named:  # two framings (or chunked): which one ends the body?
                return self.problem(
                    400 if b"content-length" in named else 411,
                    "send the body with a Content-Length header and no Transfer-Encoding",
                )
            lengths = {value for key, value in headers if key == b"content-length"}
            if not lengths:
                return self.problem(411, "send a Content-Length header")
            if len(lengths) > 1 or not next(iter(lengths)).isdigit():
                return self.problem(400, "bad Content-Length header")
            if int(next(iter(lengths))) > limit:
                length = int(next(iter(lengths)))
                return self.problem(413, f"request of {length} bytes is over the {limit}-byte limit")
        return None

    async def read_body(self, receive) -> list[dict] | Any:
        """The request's body messages, read under the body deadline and counted against
        the limit (whatever the headers said); a refusal; or None when the client left."""
        settings = self.service.settings
        deadline = time.monotonic() + settings.body_timeout
        messages: list[dict] = []
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return self.problem(408, f"the body did not arrive within {settings.body_timeout:g} s")
            if message["type"] == "http.disconnect":
                return None
            received += len(message.get("body", b""))
            if received > settings.max_request_bytes:
                return self.problem(
                    413, f"request over the {settings.max_request_bytes}-byte limit ({received} bytes so far)"
                )
            messages.append(message)
            if not message.get("more_body", False):
                return messages

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        refused = self.refusal(scope)
        try:
            if refused is None and scope["method"] == "POST":
                body = await self.read_body(receive)
                if body is None:  # the client left: nobody to answer
                    code[0] = 499
                    return
                if isinstance(body, list):
                    receive = _replay(body, receive)
                else:
                    refused = body
            if refused is None:
                await self.app(scope, receive, sending)
            else:
                if scope["method"] == "POST":  # refused unread: this connection's framing is spent
                    refused.headers["Connection"] = "close"
                await refused(scope, receive, sending)
        finally:
            endpoint = scope["path"] if scope["path"] in self.routes else "other"
            metrics = self.service.metrics
            metrics.requests.labels(endpoint, str(code[0])).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


_EXTENDED_FILENAME = re.compile(r"""filename\*\s*=\s*([^;]+)""", re.IGNORECASE)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_NAME_CHARS = 255


def part_name(upload: Any, field_name: str) -> str:
    """The name a multipart file part is answered and logged under.

    RFC 7578 senders put UTF-8 in ``filename`` (decoded as UTF-8 by the parser); RFC 5987 /
    2231 senders put ``filename*=UTF-8''<percent-encoded>``, which wins when both are given.
    Folders are dropped (a name, never a path), control characters become ``?`` (no forged
    log lines or JSON surprises) and the name is cut to 255 characters."""
    import urllib.parse

    name = upload.filename or ""
    disposition = upload.headers.get("content-disposition", "") if upload.headers else ""
    extended = _EXTENDED_FILENAME.search(disposition)
    if extended:
        charset, _, rest = extended.group(1).strip().strip('"').partition("'")
        _, _, encoded = rest.partition("'")
        try:
            name = urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except LookupError:  # an unknown charset: the bytes as UTF-8, undecodable ones replaced
            name = urllib.parse.unquote(encoded, encoding="utf-8", errors="replace")
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = _UNPRINTABLE.sub("?", name or field_name)[:MAX_NAME_CHARS]
    return name or "file"


def _host_name(value: bytes) -> str:
    """The name part of a Host header, lower case: ``[::1]:8080`` -> ``::1``."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _replay(messages: list[dict], receive):
    """A ``receive`` that hands out the body already read, then waits on the client's."""
    pending = list(messages)

    async def replayed() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class _Refused(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _short_about(about: dict) -> dict:
    keys = ("name", "version", "alias", "sha256", "provider")
    return {k: about[k] for k in keys if k in about}


def _raw_response(code: int, reason: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response written straight to the socket (no request was parsed)."""
    body = json.dumps({"error": detail}).encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(settings: ServeSettings):
    """uvicorn's h11 protocol with what it lacks against slow or many clients: a deadline
    for a request's headers (from the connection's start or its first byte after a
    response: 408, closed) and a connection limit (past it: 503, closed)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                log.warning("connection refused: %d open (serve.max_connections)", len(self.connections) - 1)
                transport.write(_raw_response(503, "Service Unavailable", "too many connections: try again"))
                transport.close()
                return
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()  # bytes of a request whose headers are not complete yet
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(settings.header_timeout, self._headers_late)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            detail = f"the request headers did not arrive within {settings.header_timeout:g} s"
            self.transport.write(_raw_response(408, "Request Timeout", detail))
            self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, settings: ServeSettings):
    """The uvicorn server settings every ``synermix serve`` runs with (the tests too)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings),
        timeout_keep_alive=settings.idle_timeout,
        limit_concurrency=settings.max_connections + 16,  # requests past it: 503 (tasks count too)
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers
        log_level="warning",
        access_log=False,
    )


def run(settings: ServeSettings) -> None:
    """Load the model(s), then serve until interrupted."""
    import uvicorn

    if settings.host not in LOOPBACK_HOSTS and not settings.token:
        log.warning("serving on %s without a token: anyone who reaches the port can use it", settings.host)
    if settings.host not in LOOPBACK_HOSTS and settings.host_names() is None:
        log.warning(
            "serving on %s for any Host header: set serve.allowed_hosts to the names clients use",
            settings.host,
        )
    service = Service(settings)
    service.start()
    app = create_app(service)
    try:
        uvicorn.Server(uvicorn_config(app, settings)).run()
    finally:
        service.stop()
