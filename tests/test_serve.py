"""The inspection-line service over real HTTP (uvicorn on loopback) with real ONNX models:
round trip against `synermix predict`, bad payloads, the token, hot swap under load, the
registry alias it follows, shadow mode and the metrics."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from synermix import onnx_export as ox
from synermix.bundle import verify_bundle, write_bundle
from synermix.cli import main
from synermix.data.transforms import Preprocessing
from synermix.inference import Classifier, read_files
from synermix.serve import ServeSettings, Service, create_app, uvicorn_config

from .helpers import huge_png_header, noise_image, png_bytes
from .test_bundle import CLASSES, TinyNet

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


class WiderNet(torch.nn.Module):
    """TinyNet's shape on 1 x 20 x 20 inputs: a pilot that takes another input size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20 * 20, len(CLASSES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_bundle(folder: Path, seed: int, size: int = 16) -> Path:
    """A bundle of a tiny real model; another seed gives other weights (another sha256)."""
    torch.manual_seed(seed)
    onnx_path = folder.parent / f"tiny-{seed}-{uuid.uuid4().hex[:6]}.onnx"
    meta = {
        "arch": "tiny",
        "class_names": CLASSES,
        "preprocessing": Preprocessing(size, 1, (0.5,), (0.25,)).to_dict(),
        "prepare_image_size": None,
        "method": "synermix",
        "beta": 0.3,
        "weights_sha256": f"{seed:064d}",
        "mlflow_run_id": f"run-{seed}",
    }
    metadata = ox.model_metadata(meta, "torchscript", 18)
    net = TinyNet() if size == 16 else WiderNet()
    ox.export_onnx(net, 1, size, onnx_path, "torchscript", 18, metadata)
    return write_bundle({"model.onnx": onnx_path}, folder, {"version": str(seed)})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {name: tiny_bundle(root / name, seed) for name, seed in (("a", 1), ("b", 2))}


BROKEN_MULTIPART = "multipart/form-data; boundary=zz"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(model: str, **options):
    """A started service on a free loopback port, in this process (uvicorn in a thread)."""
    import uvicorn

    settings = ServeSettings(model=model, port=free_port(), **options)
    service = Service(settings)
    service.start()
    server = uvicorn.Server(uvicorn_config(create_app(service), settings))  # as `synermix serve`
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Client(settings.port), service
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.stop()


class Client:
    """A keep-alive HTTP client for one server (one connection per calling thread)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self._local = threading.local()

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict | str]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = dict(headers or {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        try:
            chunked = body is not None and not isinstance(body, bytes)  # an iterable: no Content-Length
            conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
            response = conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self._local.conn = None
            raise
        text = data.decode()
        kind = response.getheader("content-type", "")
        return response.status, json.loads(text) if kind.startswith("application/json") else text

    def predict(self, data: bytes, kind: str = "image/png") -> tuple[int, dict]:
        return self.request("POST", "/v1/predict", data, {"Content-Type": kind})

    def batch(self, files: list[tuple[str, bytes]]) -> tuple[int, dict]:
        body, kind = multipart(files)
        return self.request("POST", "/v1/predict/batch", body, {"Content-Type": kind})


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for i, (name, data) in enumerate(files):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file{i}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def images(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"img{i}.png", png_bytes(noise_image(start + i, size=(24 + i, 20 + i)))) for i in range(n)]


def test_round_trip_matches_synermix_predict(bundles, tmp_path):
    files = images(5)
    for name, data in files:
        (tmp_path / name).write_bytes(data)
    expected = Classifier(verify_bundle(bundles["a"]), provider="cpu").predict(
        read_files([tmp_path / name for name, _ in files])
    )
    # the same as the command a person runs
    out = tmp_path / "predicted.json"
    args = ["predict", *(str(tmp_path / name) for name, _ in files), "--model", str(bundles["a"])]
    assert main([*args, "--out", str(out), "--provider", "cpu"]) == 0
    by_cli = json.loads(out.read_text())["predictions"]
    assert [r["class"] for r in by_cli] == [w.label for w in expected]
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0) as (client, _):
        for (_, data), want in zip(files, expected, strict=True):
            code, answer = client.predict(data)
            assert code == 200, answer
            got = answer["prediction"]
            assert got["class"] == want.label and got["status"] == "ok"
            for c in CLASSES:
                assert got[f"score_{c}"] == pytest.approx(want.scores[c], abs=1e-6)
        for (_, data), row in zip(files, by_cli, strict=True):
            assert client.predict(data)[1]["prediction"] | {"path": row["path"]} == row
        code, answer = client.batch([*files[:3], ("notes.txt", b"not an image")])
        assert code == 200
        rows = answer["predictions"]
        assert [r["class"] for r in rows[:3]] == [w.label for w in expected[:3]]
        assert rows[3]["status"] == "error" and "not an image" in rows[3]["error"]
        assert answer["model"]["sha256"] == _sha(bundles["a"] / "model.onnx")
        code, info = client.request("GET", "/v1/model")
        assert code == 200 and info["primary"]["classes"] == CLASSES
        assert info["primary"]["provider"] == "CPUExecutionProvider"


def test_bad_payloads_get_4xx_with_a_reason_never_5xx(bundles):
    limits = {"max_request_bytes": 60_000, "max_pixels": 10_000, "max_files": 3}
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0, **limits) as (client, _):
        good = images(1)[0][1]
        truncated = good[: len(good) // 2]
        cases = [
            (client.predict(b""), 400, "empty body"),
            (client.predict(b"garbage bytes"), 422, "not an image"),
            (client.predict(truncated), 422, ""),
            (client.predict(b'{"image": "x"}', "application/json"), 415, "not an image"),
            (client.predict(b"x" * 70_000), 413, "limit"),
            (client.predict(huge_png_header(20_000, 20_000)), 422, "pixels"),
            (client.request("POST", "/v1/predict", b"--zz\r\nbroken", {"Content-Type": BROKEN_MULTIPART}),
             400, "exactly one image"),
            (client.batch(images(4)), 400, "at most 3 files"),
            (client.batch([]), 400, ""),
            (client.request("POST", "/v1/predict", body=iter([good]), headers={"Content-Type": "image/png"}),
             411, "Content-Length"),
        ]  # fmt: skip
        for (code, answer), expected, words in cases:
            assert code == expected, answer
            assert words in answer["error"]
        assert client.predict(good)[0] == 200  # still serving
        metrics = client.request("GET", "/metrics")[1]
        assert "synermix_bad_images_total 3.0" in metrics


def test_bearer_token_is_enforced_except_for_probes(bundles):
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0, token="s3cret-token") as (client, _):
        data = images(1)[0][1]
        assert client.predict(data)[0] == 401
        assert Client(client.port, "wrong").predict(data)[0] == 401
        assert client.request("GET", "/v1/model")[0] == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.request("GET", path)[0] == 200, path
        authorised = Client(client.port, "s3cret-token")
        assert authorised.predict(data)[0] == 200 and authorised.request("GET", "/v1/model")[0] == 200


def hammer(client: Client, stop: threading.Event, seen: list, failures: list) -> None:
    data = images(3, start=50)
    i = 0
    while not stop.is_set():
        try:
            code, answer = client.predict(data[i % 3][1])
        except Exception as exc:  # counted: a hot swap must not fail a request
            failures.append(repr(exc))
            continue
        i += 1
        if code != 200:
            failures.append((code, answer))
        else:
            seen.append(answer["model"]["sha256"])


def wait_for(condition, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_hot_swap_under_load_fails_no_request(bundles, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(bundles["a"], live)
    sha = {k: _sha(v / "model.onnx") for k, v in bundles.items()}
    with serving(str(live), provider="cpu", poll_seconds=0.1) as (client, service):
        stop, seen, failures = threading.Event(), [], []
        workers = [threading.Thread(target=hammer, args=(client, stop, seen, failures)) for _ in range(4)]
        for w in workers:
            w.start()
        wait_for(lambda: len(seen) > 20)
        # a new bundle is placed: moved aside, the new one renamed in (the path is briefly absent)
        shutil.copytree(bundles["b"], tmp_path / "incoming")
        os.rename(live, tmp_path / "old")
        os.rename(tmp_path / "incoming", live)
        wait_for(lambda: seen and seen[-1] == sha["b"])
        count = len(seen)
        wait_for(lambda: len(seen) > count + 20)
        # a damaged bundle is refused: the old model keeps serving
        damaged = tmp_path / "damaged"
        shutil.copytree(bundles["a"], damaged)
        (damaged / "labels.txt").write_text("x\ny\nz\n")
        os.rename(live, tmp_path / "old2")
        os.rename(damaged, live)
        wait_for(lambda: "not intact" in service.primary.last_error)
        count = len(seen)
        wait_for(lambda: len(seen) > count + 20)
        stop.set()
        for w in workers:
            w.join(timeout=30)
    assert failures == []
    assert set(seen) == {sha["a"], sha["b"]}
    first_b = seen.index(sha["b"])
    assert sha["a"] not in seen[first_b + 8 :]  # (a few in-flight requests may finish on a)
    assert seen[-1] == sha["b"]
    metrics_text = service.metrics.registry
    swapped = metrics_text.get_sample_value(
        "synermix_model_reloads_total", {"role": "primary", "result": "swapped"}
    )
    failed = metrics_text.get_sample_value(
        "synermix_model_reloads_total", {"role": "primary", "result": "failed"}
    )
    assert swapped == 1 and failed >= 1


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shadow_mode_logs_agreement_and_answers_with_the_primary(bundles, tmp_path):
    log_path = tmp_path / "shadow.jsonl"
    files = images(6, start=200)
    primary = Classifier(bundles["a"] / "model.onnx", provider="cpu")
    shadow = Classifier(bundles["b"] / "model.onnx", provider="cpu")
    with serving(str(bundles["a"]), shadow=str(bundles["b"]), shadow_log=log_path, provider="cpu",
                 poll_seconds=0) as (client, service):  # fmt: skip
        for _, data in files:
            code, answer = client.predict(data)
            assert code == 200 and answer["model"]["sha256"] == _sha(bundles["a"] / "model.onnx")
        wait_for(lambda: log_path.is_file() and len(log_path.read_text().splitlines()) == len(files))
        code, info = client.request("GET", "/v1/model")
        assert info["shadow"]["sha256"] == _sha(bundles["b"] / "model.onnx")
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    for record, (_, data) in zip(records, files, strict=True):
        want_primary = primary.result("x", primary.probabilities(primary.preprocess(data)[None])[0]).label
        want_shadow = shadow.result("x", shadow.probabilities(shadow.preprocess(data)[None])[0]).label
        assert record["primary"]["class"] == want_primary and record["shadow"]["class"] == want_shadow
        assert record["agree"] == (want_primary == want_shadow)
    registry = service.metrics.registry
    counted = sum(registry.get_sample_value("synermix_shadow_comparisons_total", {"agree": a}) or 0
                  for a in ("true", "false"))  # fmt: skip
    assert counted == len(files)


def test_follows_a_registry_alias(bundles, tmp_path, monkeypatch):
    """models:/name@alias: the version the alias points at is served, and a recorded move is
    swapped in; an alias moved by hand outside synermix is refused (the old model serves on).
    The gated aliases (candidate, pilot, production) need evidence too: test_rollout.py."""
    import mlflow
    import onnx

    from synermix import registry
    from synermix.config import MlflowParams
    from synermix.tracking import client as mlflow_client
    from synermix.tracking import experiment_id, using_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    client = mlflow_client(uri)
    experiment = experiment_id(client, MlflowParams(tracking_uri=uri, experiment="serve-test"))
    client.create_registered_model("line")
    for key in ("a", "b"):
        with using_store(uri), mlflow.start_run(experiment_id=experiment) as run:
            info = mlflow.onnx.log_model(
                onnx.load(str(bundles[key] / "model.onnx")), name="model", save_as_external_data=False
            )
        client.create_model_version("line", info.model_uri, run.info.run_id, model_id=info.model_id)

    def move(version: str) -> None:
        registry.move_alias(client, "line", "line3", version, action="promote", reason="test")

    move("1")
    with serving("models:/line@line3", provider="cpu", poll_seconds=0.1, tracking_uri=uri) as (http, service):
        code, answer = http.predict(images(1)[0][1])
        assert code == 200 and answer["model"]["version"] == "1" and answer["model"]["alias"] == "line3"
        client.set_registered_model_alias("line", "line3", "2")  # by hand: no record
        wait_for(lambda: "outside synermix" in service.primary.last_error)
        code, answer = http.predict(images(1)[0][1])
        assert code == 200 and answer["model"]["version"] == "1"
        assert http.request("GET", "/readyz")[0] == 200  # still serving the recorded model
        client.set_registered_model_alias("line", "line3", "1")  # put back by hand
        move("2")  # recorded: followed (after the refusal's back-off, 5 s)
        wait_for(lambda: http.request("GET", "/v1/model")[1]["primary"]["version"] == "2", seconds=20)
        code, answer = http.predict(images(1)[0][1])
        assert answer["model"]["sha256"] == _sha(bundles["b"] / "model.onnx")


def test_metrics_count_requests_classes_and_abstentions(bundles):
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0, abstain=0.99) as (client, _):
        for _, data in images(4):
            code, answer = client.predict(data)
            assert code == 200 and answer["prediction"]["status"] == "abstain"
        text = client.request("GET", "/metrics")[1]
    assert 'synermix_requests_total{code="200",endpoint="/v1/predict"} 4.0' in text
    assert "synermix_abstentions_total 4.0" in text
    assert 'synermix_request_seconds_bucket{endpoint="/v1/predict",le="+Inf"} 4.0' in text
    assert sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('synermix_predictions_total{class=')) == 4  # fmt: skip
    assert 'synermix_model_info{alias="",provider="CPUExecutionProvider",role="primary"' in text


def test_cli_serves_a_bundle_on_loopback(bundles, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    params = tmp_path / "none.yaml"  # no params file: a line machine
    cli = [sys.executable, "-m", "synermix.cli", "--params", str(params)]
    command = [*cli, "serve", "--model", str(bundles["a"]), "--port", str(port), "--provider", "cpu",
               "--poll-seconds", "0"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = Client(port)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.request("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.poll() else ""
            )
            time.sleep(0.2)
        code, answer = client.predict(images(1)[0][1])
        assert code == 200 and answer["prediction"]["class"] in CLASSES
        with pytest.raises(OSError):  # bound to loopback only
            routable = next(
                (a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
                 if not a[4][0].startswith("127.")), None)  # fmt: skip
            if routable is None:
                raise OSError("no routable address to try")
            socket.create_connection((routable, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    missing = subprocess.run([*cli, "serve", "--token-file", str(tmp_path / "nope")], text=True,
                             capture_output=True)  # fmt: skip
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_shadow_with_another_input_size_decodes_the_image_its_own_way(bundles, tmp_path):
    wider = tiny_bundle(tmp_path / "wider", 3, size=20)
    log_path = tmp_path / "shadow.jsonl"
    shadow = Classifier(wider / "model.onnx", provider="cpu")
    files = images(3, start=300)
    with serving(str(bundles["a"]), shadow=str(wider), shadow_log=log_path, provider="cpu",
                 poll_seconds=0) as (client, service):  # fmt: skip
        for _, data in files:
            assert client.predict(data)[0] == 200
        wait_for(lambda: log_path.is_file() and len(log_path.read_text().splitlines()) == len(files))
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    for record, (_, data) in zip(records, files, strict=True):
        want = shadow.result("x", shadow.probabilities(shadow.preprocess(data)[None])[0]).label
        assert record["shadow"]["class"] == want
    assert not service.metrics.registry.get_sample_value(
        "synermix_shadow_comparisons_total", {"agree": "error"}
    )


# --------------------------------------------------------------------------- hostile traffic
def raw_exchange(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        if data:
            conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def read_one_response(conn: socket.socket) -> bytes:
    """One whole HTTP response from a kept-alive connection: headers, then Content-Length bytes.

    TCP may hand the headers and the body over in separate reads; one recv is not a response.
    """
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed inside the response headers: {answer!r}"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed inside the response body: {answer!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_a_tiny_file_declaring_a_long_thin_image_is_refused_before_decoding(bundles):
    """1 x 250,000 px in 74 bytes used to cost 13 s and 1.6 GiB: fit_square scaled the
    short side up. Now the header's aspect ratio refuses it, and the budget bounds the rest."""
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0, decode_memory_bytes=2**20) as (client, _):
        started = time.monotonic()
        code, answer = client.predict(huge_png_header(1, 250_000))
        assert code == 422 and "more than 20 times the other" in answer["error"]
        code, answer = client.predict(huge_png_header(1, 33_000_000))
        assert code == 422, answer
        assert time.monotonic() - started < 5  # refused from the header: no decode at all
        # within the pixel limit but past the decode budget (1 MiB): refused, named
        code, answer = client.predict(png_bytes(noise_image(3, size=(600, 600), mode="RGB")))
        assert code == 422 and "serve.decode_memory_mb" in answer["error"]
        assert client.predict(images(1)[0][1])[0] == 200


def test_framing_tricks_and_an_unknown_host_are_refused(bundles):
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0, max_request_bytes=60_000) as (client, _):
        port = client.port
        body = b"5\r\nhello\r\n0\r\n\r\n"
        both = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
            f"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode() + body
        answer = raw_exchange(port, both)
        assert status_of(answer) == 400 and b"no Transfer-Encoding" in answer
        chunked = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n"
        ).encode() + body
        assert status_of(raw_exchange(port, chunked)) == 411
        two_lengths = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
            f"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
        ).encode()
        assert status_of(raw_exchange(port, two_lengths)) in (400, 422)
        evil = client.request("GET", "/metrics", headers={"Host": "evil.example:8080"})
        assert evil[0] == 421 and "serve.allowed_hosts" in evil[1]["error"]
        assert client.request("GET", "/readyz", headers={"Host": "localhost"})[0] == 200
        assert client.predict(images(1)[0][1])[0] == 200  # still serving


def test_slow_and_idle_clients_are_cut_off_and_connections_are_limited(bundles):
    options = {"header_timeout": 1.0, "body_timeout": 1.0, "idle_timeout": 1.0, "max_connections": 4}
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0, **options) as (client, _):
        port = client.port
        started = time.monotonic()
        # connects and says nothing; then half a request line, then headers without their end
        assert status_of(raw_exchange(port, b"")) == 408
        assert status_of(raw_exchange(port, b"POST /v1/pre")) == 408
        slow_headers = f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        assert status_of(raw_exchange(port, slow_headers)) == 408
        # the headers, then half the body it announced
        good = images(1)[0][1]
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(good)}\r\n\r\n"
        ).encode()
        answer = raw_exchange(port, head + good[: len(good) // 2])
        assert status_of(answer) == 408 and b"body did not arrive" in answer
        assert time.monotonic() - started < 12  # each cut within its deadline, not hanging
        # an idle keep-alive connection is closed after idle_timeout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            first = read_one_response(conn)
            assert status_of(first) == 200 and first.endswith(b'{"status":"alive"}')
            conn.settimeout(5)
            assert conn.recv(65536) == b""  # closed by the server, no second answer
        # at most 4 open connections: the 5th is answered 503 and closed
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)
            assert status_of(raw_exchange(port, b"")) == 503
        finally:
            for conn in held:
                conn.close()
        time.sleep(0.2)
        assert client.predict(good)[0] == 200


def test_a_model_that_loads_but_cannot_run_is_never_swapped_in(bundles, tmp_path):
    """Metadata 32 px over a 16 px graph used to load, then answer every request 500 while
    /readyz said ready. The smoke run at load refuses it; the old model keeps serving, and
    a refused model is tried again after a back-off."""
    import onnx

    from synermix.serve import ModelSlot

    model = tmp_path / "model.onnx"
    shutil.copy(bundles["a"] / "model.onnx", model)
    with serving(str(model), provider="cpu", poll_seconds=0) as (client, service):
        good = images(1)[0][1]
        assert client.predict(good)[0] == 200
        proto = onnx.load(str(model))
        meta = next(p for p in proto.metadata_props if p.key == "synermix")
        data = json.loads(meta.value)
        data["preprocessing"]["image_size"] = 32
        meta.value = json.dumps(data)
        broken = tmp_path / "broken.onnx"
        onnx.save(proto, str(broken))
        os.replace(broken, model)
        ModelSlot.RETRY_SECONDS = (0.3, 1.0)
        try:
            assert service.primary.check() is False
            assert "does not run on the input its metadata declares" in service.primary.last_error
            assert service.primary.check() is False  # within the back-off: not loaded again
            failures = service.metrics.reloads.labels("primary", "failed")._value.get()
            time.sleep(0.4)
            assert service.primary.check() is False  # after it: tried again, refused again
            assert service.metrics.reloads.labels("primary", "failed")._value.get() == failures + 1
        finally:
            ModelSlot.RETRY_SECONDS = (5.0, 600.0)
        assert client.request("GET", "/readyz")[0] == 200
        assert client.predict(good)[0] == 200


def test_inference_failure_answers_503_and_takes_readiness_down(bundles):
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0) as (client, service):
        good = images(1)[0][1]
        classifier = service.primary.current.classifier
        real = classifier.outputs

        def failing(batch):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        classifier.outputs = failing
        code, answer = client.predict(good)
        assert code == 503 and "failed at inference" in answer["error"]
        code, answer = client.request("GET", "/readyz")
        assert code == 503 and "illegal memory access" in answer["error"]
        classifier.outputs = real
        assert client.predict(good)[0] == 200  # a run that succeeds makes it ready again
        assert client.request("GET", "/readyz")[0] == 200


def test_a_bundle_caught_mid_copy_is_refused_then_taken_once_whole(bundles, tmp_path):
    """The watcher's fingerprint covers every file of a bundle, not only SHA256SUMS: a
    bundle refused half-copied is loaded as soon as its files are whole, and a file
    rewritten under unchanged checksums is refused (it fails verification)."""
    live = tmp_path / "live"
    shutil.copytree(bundles["a"], live)
    with serving(str(live), provider="cpu", poll_seconds=0) as (client, service):
        before = service.primary.current.about["sha256"]
        # bundle b arrives file by file: its checksums first, its model half-written
        for name in os.listdir(bundles["b"]):
            if name != "model.onnx":
                shutil.copy(bundles["b"] / name, live / name)
        whole = (bundles["b"] / "model.onnx").read_bytes()
        (live / "model.onnx").write_bytes(whole[: len(whole) // 2])
        assert service.primary.check() is False and service.primary.current.about["sha256"] == before
        assert service.primary.last_error
        (live / "model.onnx").write_bytes(whole)  # the copy completes: same SHA256SUMS, new files
        assert service.primary.check() is True
        assert service.primary.current.about["sha256"] == _sha(bundles["b"] / "model.onnx")
        assert client.predict(images(1)[0][1])[0] == 200
        # a model rewritten in place under the same checksums is refused, the served one stays
        (live / "model.onnx").write_bytes((bundles["a"] / "model.onnx").read_bytes())
        assert service.primary.check() is False and "checksum mismatch" in service.primary.last_error
        assert service.primary.current.about["sha256"] == _sha(bundles["b"] / "model.onnx")


def test_multipart_file_names_are_decoded_as_sent_and_made_safe(bundles):
    """UTF-8 in filename (RFC 7578), filename* (RFC 5987) winning over it, folders dropped and
    control characters replaced: the answer names each file the way its sender spelled it."""
    image = images(1)[0][1]
    boundary = "b0undary"

    def part(disposition: bytes) -> bytes:
        return (
            f"--{boundary}\r\n".encode()
            + b"Content-Disposition: form-data; "
            + disposition
            + b"\r\n"
            + b"Content-Type: image/png\r\n\r\n"
            + image
            + b"\r\n"
        )

    body = (
        b"".join(
            [
                part('name="a"; filename="zelle_ß_✓.png"'.encode()),
                part(b'name="b"; filename="fallback.png"; filename*=UTF-8\'\'d%C3%A9faut%20%E2%9C%93.png'),
                part(b'name="c"; filename="x.png"; filename*=iso-8859-1\'\'Gr%FC%DFe.png'),
                part(b'name="d"; filename="C:\\\\line 3\\\\..\\\\cell.png"'),
                part(b'name="e"; filename="e.png"; filename*=UTF-8\'\'evil%0D%0Aforged%20log%20line.png'),
                part(b'name="f"; filename=""'),
            ]
        )
        + f"--{boundary}--\r\n".encode()
    )
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0) as (client, _):
        code, answer = client.request(
            "POST", "/v1/predict/batch", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    assert code == 200, answer
    names = [row["path"] for row in answer["predictions"]]
    assert names[:5] == [
        "zelle_ß_✓.png",
        "défaut ✓.png",
        "Grüße.png",
        "cell.png",
        "evil??forged log line.png",
    ]
    assert names[5] in ("f", "file")  # no name sent: the form field's
    assert all(row["status"] == "ok" for row in answer["predictions"])
    # a part without filename= is a text field to the parser: refused by name, not dropped
    text_field = part(b"name=\"g\"; filename*=UTF-8''only-extended.png")
    body = part(b'name="a"; filename="a.png"') + text_field + f"--{boundary}--\r\n".encode()
    with serving(str(bundles["a"]), provider="cpu", poll_seconds=0) as (client, _):
        for path in ("/v1/predict/batch", "/v1/predict"):
            code, answer = client.request(
                "POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            )
            assert code == 400 and "form part 'g' is not a file" in answer["error"], answer
