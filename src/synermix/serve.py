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
  everything but health, readiness and metrics; a request size limit (Content-Length
  required); the decompression-bomb guard; a bad image is a 4xx with the reason.

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
import queue
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

from synermix.config import ServeParams
from synermix.errors import UserError
from synermix.inference import DEFAULT_MAX_PIXELS, BadImage, Classifier
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

    @classmethod
    def from_params(
        cls, serve: ServeParams, token: str | None = None, tracking_uri: str | None = None
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
        )


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
            probabilities = self.classifier.probabilities(np.stack([x for x, _ in batch]))
        except Exception as exc:  # a failed run fails its requests, not the thread
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), p in zip(batch, probabilities, strict=True):
            future.set_result(p)
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

    def close(self) -> None:
        self.batcher.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def load_model(spec: str, settings: ServeSettings, on_batch=None) -> LoadedModel:
    """Load (verify, download) the model behind ``spec``; UserError when it cannot serve."""
    before = fingerprint(spec, settings.tracking_uri)
    tmp = tempfile.TemporaryDirectory(prefix="synermix-serve-") if is_registry(spec) else None
    try:
        path = model_file(spec, Path(tmp.name) if tmp else Path("."), settings.tracking_uri)
        try:
            classifier = Classifier(
                path, settings.provider, settings.max_pixels, settings.threads, spin=False
            )
        except Exception as exc:  # onnxruntime raises plain Exception subclasses for a bad file
            raise UserError(f"{spec}: not a model this service can run ({exc})") from None
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
        "loaded_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **registry_about(spec, before),
    }
    log.info("loaded %s (%s) on %s", spec, about.get("version") or about["sha256"][:12], classifier.provider)
    batcher = MicroBatcher(classifier, settings.max_batch, on_batch)
    return LoadedModel(spec, classifier, batcher, before, about, tmp)


class ModelSlot:
    """The model a route serves, swapped atomically; requests hold it while they use it."""

    def __init__(self, spec: str, settings: ServeSettings, metrics: Metrics, role: str) -> None:
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self.role = role
        self.current: LoadedModel | None = None
        self.last_error = ""
        self._refused: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def load(self) -> None:
        def observe(size: int) -> None:
            self.metrics.batch_size.observe(size)

        model = load_model(self.spec, self.settings, observe)
        old, self.current = self.current, model
        self.metrics.set_model(self.role, model.about)
        if old is not None:
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()

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
        if now == self._refused:  # the same broken model: tried once, not every poll
            return False
        try:
            self.load()
        except Exception as exc:  # keep serving the old model
            self.last_error = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {exc}"
            self._refused = now
            self.metrics.reloads.labels(self.role, "failed").inc()
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
        self.bad_images = Counter("synermix_bad_images", "Images that could not be scored", registry=r)
        self.batch_size = Histogram(
            "synermix_batch_size", "Images per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.reloads = Counter("synermix_model_reloads", "Model swaps", ["role", "result"], registry=r)
        self.shadow = Counter("synermix_shadow_comparisons", "Shadow model results", ["agree"], registry=r)
        self._served: dict[str, tuple[str, ...]] = {}
        self.model = Gauge(
            "synermix_model_info",
            "The model served",
            ["role", "version", "alias", "sha256", "provider"],
            registry=r,
        )

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
        self.settings = settings
        self.metrics = Metrics()
        self.primary = ModelSlot(settings.model, settings, self.metrics, "primary")
        self.shadow = (
            ModelSlot(settings.shadow, settings, self.metrics, "shadow") if settings.shadow else None
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
        self.primary.stop()
        if self.shadow is not None:
            self.shadow.stop()

    async def classify(self, name: str, data: bytes) -> tuple[dict, dict]:
        """One image -> (the prediction row, the model's description); BadImage when unreadable."""
        from starlette.concurrency import run_in_threadpool

        with self.primary.use() as model:
            try:
                x = await run_in_threadpool(model.classifier.preprocess, data)
            except BadImage:
                self.metrics.bad_images.inc()
                raise
            except Exception as exc:  # Pillow can raise odd errors on hostile files: still the input's fault
                self.metrics.bad_images.inc()
                raise BadImage(f"not a readable image ({type(exc).__name__}: {exc})") from None
            probabilities = await asyncio.wrap_future(model.batcher.submit(x))
            result = model.classifier.result(name, probabilities, self.settings.abstain)
            about = model.about
            row = result.to_row(model.classifier.class_names)
        self.metrics.predictions.labels("primary", result.label).inc()
        if result.status == "abstain":
            self.metrics.abstentions.inc()
        if self.shadow is not None and self.shadow.current is not None:
            if self._shadow_room.acquire(blocking=False):
                self._shadow_pool.submit(self._compare, name, data, (model.classifier.info, x), result, about)
            else:
                self.metrics.shadow.labels("skipped").inc()
        return row, about

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
                p = model.batcher.submit(x).result(timeout=60)
                shadow = model.classifier.result(name, p, self.settings.abstain)
                shadow_about = model.about
        except Exception as exc:
            log.warning("shadow comparison failed for %s: %s", name, exc)
            self.metrics.shadow.labels("error").inc()
            return
        agree = shadow.label == primary.label
        self.metrics.shadow.labels(str(agree).lower()).inc()
        self.metrics.predictions.labels("shadow", shadow.label).inc()
        self.shadow_log.write(
            {
                "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "image": name,
                "agree": agree,
                "primary": {"class": primary.label, "confidence": round(primary.confidence, 6),
                            "version": about.get("version", ""), "sha256": about["sha256"][:12]},
                "shadow": {"class": shadow.label, "confidence": round(shadow.confidence, 6),
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
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
            await form.close()
            return files
        if kind and not kind.startswith(IMAGE_TYPES):
            raise _Refused(
                415, f"Content-Type {kind} is not an image: send image/* bytes or multipart/form-data"
            )
        return [("body", await request.body())]

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
            row, about = await service.classify(name, data)
        except BadImage as exc:
            return problem(422, str(exc))
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
            *(service.classify(name, data) for name, data in files), return_exceptions=True
        )
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
    """Token and request-size checks before a route runs, and the request metrics.

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

    def refusal(self, scope: dict):
        headers = dict(scope["headers"])
        limit = self.service.settings.max_request_bytes
        guarded = self.expected is not None and scope["path"] not in self.open_paths
        if guarded and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return self.problem(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is None:
                return self.problem(411, "send a Content-Length header")
            if not length.isdigit():
                return self.problem(400, "bad Content-Length header")
            if int(length) > limit:
                return self.problem(413, f"request of {int(length)} bytes is over the {limit}-byte limit")
        return None

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


class _Refused(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _short_about(about: dict) -> dict:
    keys = ("name", "version", "alias", "sha256", "provider")
    return {k: about[k] for k in keys if k in about}


def run(settings: ServeSettings) -> None:
    """Load the model(s), then serve until interrupted."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        log.warning("serving on %s without a token: anyone who reaches the port can use it", settings.host)
    service = Service(settings)
    service.start()
    app = create_app(service)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    finally:
        service.stop()
