"""Serving benchmark: `synermix serve` under closed-loop HTTP load, against the bare model in-process.

Starts the service as a subprocess on a free loopback port (CPU provider, no model
polling) and drives POST /v1/predict from this second process: for each concurrency, that
many threads, each with its own keep-alive connection, send real ELPV test images (file
bytes, cycled) back to back for a warm-up and then a measured window. Per concurrency:
requests, throughput, p50/p90/p99 latency, errors, and the mean batch the server ran
(from its synermix_batch_size histogram). The reference is the same model called directly
in this process (preprocess + inference of one image), measured before the server starts
and again after it stops, so that the two never share the CPU; the faster of the two bare
medians is the reference (the strict choice when the machine's load drifts).

Targets: p50 at concurrency 1 within 3 ms of the bare median (the HTTP + queue overhead);
no errors at any concurrency; throughput at concurrency 32 >= 1.5x concurrency 1
(micro-batching pays off).

    python bench/serve_load.py                     # from the repo root (needs models/ and data/)
    python bench/serve_load.py --concurrency 1,4,16,64 --seconds 30 --json reports/serve_load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from synermix.config import ServeParams
from synermix.data.manifest import MANIFEST_NAME, read_manifest
from synermix.inference import Classifier
from synermix.paths import PREPARED_DIR

HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0
P50_OVERHEAD_MS = 3.0
SCALING_TARGET = 1.5


# --------------------------------------------------------------------------- inputs
def test_split_images(root: Path, count: int) -> list[tuple[str, bytes]]:
    """``count`` decodable test-split images of the prepared manifest, as (path, file bytes)."""
    manifest = read_manifest(root / PREPARED_DIR / MANIFEST_NAME)
    rows = manifest[(manifest["split"] == "test") & manifest["decodable"]]
    if rows.empty:
        raise SystemExit(f"{root / PREPARED_DIR / MANIFEST_NAME} has no test images: run dvc repro prepare")
    paths = list(rows["path"])[:count]
    return [(p, (root / PREPARED_DIR / p).read_bytes()) for p in paths]


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (as bench/onnx_inference.py's p90)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- bare reference
@dataclass
class BareResult:
    when: str
    iterations: int
    provider: str
    total_median_ms: float
    total_p90_ms: float
    preprocess_median_ms: float
    inference_median_ms: float


def measure_bare(
    when: str,
    model: Path,
    images: list[tuple[str, bytes]],
    iterations: int,
    threads: int | None,
    warmup: int = 5,
) -> BareResult:
    """Preprocess + batch-1 inference per image in this process, the floor the service adds to."""
    classifier = Classifier(model, provider="cpu", threads=threads)
    for i in range(warmup):
        classifier.probabilities(classifier.preprocess(images[i % len(images)][1])[None])
    totals, preprocess, inference = [], [], []
    for i in range(iterations):
        data = images[i % len(images)][1]
        start = time.perf_counter()
        x = classifier.preprocess(data)
        mid = time.perf_counter()
        classifier.probabilities(x[None])
        end = time.perf_counter()
        totals.append(end - start)
        preprocess.append(mid - start)
        inference.append(end - mid)
    ordered = sorted(totals)
    return BareResult(
        when=when,
        iterations=iterations,
        provider=classifier.provider,
        total_median_ms=statistics.median(ordered) * 1e3,
        total_p90_ms=percentile(ordered, 0.9) * 1e3,
        preprocess_median_ms=statistics.median(preprocess) * 1e3,
        inference_median_ms=statistics.median(inference) * 1e3,
    )


# --------------------------------------------------------------------------- the service
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def serve_command(model: Path, port: int, max_batch: int, threads: int | None) -> list[str]:
    command = [
        sys.executable, "-m", "synermix.cli", "serve", "--model", str(model), "--port", str(port),
        "--poll-seconds", "0", "--provider", "cpu", "--max-batch", str(max_batch),
    ]  # fmt: skip
    return [*command, "--threads", str(threads)] if threads else command


def _tail(stream, lines: int = 30) -> str:
    stream.seek(0)
    return "\n".join(stream.read().decode(errors="replace").splitlines()[-lines:])


@contextmanager
def running_server(command: list[str], port: int) -> Iterator[subprocess.Popen]:
    """The service started and ready on ``port``; stopped (terminate, then kill) on exit.

    SystemExit with the server's stderr tail when it exits or is not ready in time.
    """
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _ready(port):
                if process.poll() is not None:
                    why = f"exited with code {process.returncode} before it was ready"
                elif time.monotonic() > deadline:
                    why = f"was not ready after {READY_TIMEOUT_S:.0f} s"
                else:
                    time.sleep(0.2)
                    continue
                raise SystemExit(
                    f"synermix serve {why}: {' '.join(command)}\n--- its stderr (tail) ---\n{_tail(stderr)}"
                )
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _ready(port: int) -> bool:
    try:
        return http_get(port, "/readyz", timeout=2.0)[0] == 200
    except OSError:  # not listening yet
        return False


def batch_totals(port: int) -> tuple[float, float]:
    """(sum, count) of the server's synermix_batch_size histogram."""
    status, body = http_get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    text = body.decode()
    values = []
    for series in ("synermix_batch_size_sum", "synermix_batch_size_count"):
        found = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
        values.append(float(found.group(1)) if found else 0.0)
    return values[0], values[1]


def served_provider(port: int) -> str:
    status, body = http_get(port, "/v1/model")
    return json.loads(body)["primary"]["provider"] if status == 200 else f"unknown (HTTP {status})"


# --------------------------------------------------------------------------- load generator
@dataclass
class PhaseResult:
    concurrency: int
    seconds: float
    requests: int
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    warmup_errors: int
    mean_batch: float
    #: CPU cores this load generator used during the window (it shares the machine with the server)
    client_cpu: float
    error_examples: list[str] = field(default_factory=list)


class _Worker(threading.Thread):
    """One client: a keep-alive connection sending images back to back until told to stop."""

    def __init__(self, port: int, images: list[tuple[str, bytes]], offset: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.port = port
        self.images = images
        self.offset = offset
        self.stop = stop
        #: (start, end, error or "") per request; perf_counter seconds
        self.records: list[tuple[float, float, str]] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        headers = {"Content-Type": "image/png"}
        i = self.offset
        while not self.stop.is_set():
            data = self.images[i % len(self.images)][1]
            i += 1
            error = ""
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/predict", body=data, headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    error = f"HTTP {response.status}: {body[:200].decode(errors='replace')}"
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                conn.close()  # a fresh connection for the next request
                conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
            self.records.append((start, time.perf_counter(), error))
        conn.close()


def run_phase(
    port: int, images: list[tuple[str, bytes]], concurrency: int, seconds: float, warmup: float
) -> PhaseResult:
    """Closed-loop load at one concurrency; only requests inside the measured window count."""
    stop = threading.Event()
    workers = [_Worker(port, images, k * 7, stop) for k in range(concurrency)]
    for w in workers:
        w.start()
    time.sleep(warmup)
    sum0, count0 = batch_totals(port)
    t0, cpu0 = time.perf_counter(), time.process_time()
    time.sleep(seconds)
    t1, cpu1 = time.perf_counter(), time.process_time()
    sum1, count1 = batch_totals(port)
    stop.set()
    for w in workers:
        w.join(timeout=90)
    records = [r for w in workers for r in w.records]
    measured = [(s, e, err) for s, e, err in records if s >= t0 and e <= t1]
    latencies = sorted(e - s for s, e, err in measured if not err)
    errors = [err for _, _, err in measured if err]
    warmup_errors = [err for s, e, err in records if err and not (s >= t0 and e <= t1)]
    ok = len(latencies)

    def ms(q: float) -> float:
        return percentile(latencies, q) * 1e3 if latencies else float("nan")

    batches = count1 - count0
    return PhaseResult(
        concurrency=concurrency,
        seconds=t1 - t0,
        requests=len(measured),
        throughput_rps=ok / (t1 - t0),
        p50_ms=ms(0.5),
        p90_ms=ms(0.9),
        p99_ms=ms(0.99),
        errors=len(errors),
        warmup_errors=len(warmup_errors),
        mean_batch=(sum1 - sum0) / batches if batches else float("nan"),
        client_cpu=(cpu1 - cpu0) / (t1 - t0),
        error_examples=sorted(set(errors + warmup_errors))[:3],
    )


# --------------------------------------------------------------------------- report
def target_checks(bare: BareResult, phases: dict[int, PhaseResult]) -> list[tuple[str, str, bool | None]]:
    """(what, measured, passed) per target; passed is None when its concurrency was not run."""
    checks: list[tuple[str, str, bool | None]] = []
    if 1 in phases:
        overhead = phases[1].p50_ms - bare.total_median_ms
        checks.append(
            (
                f"p50 @1 - bare median <= {P50_OVERHEAD_MS:g} ms",
                f"{overhead:+.2f} ms",
                overhead <= P50_OVERHEAD_MS,
            )
        )
    else:
        checks.append((f"p50 @1 - bare median <= {P50_OVERHEAD_MS:g} ms", "concurrency 1 not run", None))
    total_errors = sum(p.errors + p.warmup_errors for p in phases.values())
    checks.append(("zero errors at every concurrency", f"{total_errors} error(s)", total_errors == 0))
    label = f"throughput @32 >= {SCALING_TARGET}x @1"
    if 1 in phases and 32 in phases and phases[1].throughput_rps > 0:
        ratio = phases[32].throughput_rps / phases[1].throughput_rps
        checks.append((label, f"{ratio:.2f}x", ratio >= SCALING_TARGET))
    else:
        checks.append((label, "concurrency 1 or 32 not run", None))
    return checks


def print_report(
    bare_runs: list[BareResult], bare: BareResult, phases: dict[int, PhaseResult], checks
) -> None:
    print(f"\nbare model in this process, batch 1, {bare.iterations} images, never while the server runs:")
    for run in bare_runs:
        print(
            f"  {run.when:<25} median {run.total_median_ms:6.2f} ms "
            f"(preprocess {run.preprocess_median_ms:.2f} + inference {run.inference_median_ms:.2f}), "
            f"p90 {run.total_p90_ms:6.2f} ms" + ("   <- reference" if run is bare else "")
        )
    print(
        f"\n{'conc':>4} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'mean batch':>11} {'p50 - bare':>11} {'client CPU':>11}"
    )
    for c, p in phases.items():
        print(
            f"{c:>4} {p.requests:>9} {p.throughput_rps:>8.1f} {p.p50_ms:>8.2f} {p.p90_ms:>8.2f} "
            f"{p.p99_ms:>8.2f} {p.errors + p.warmup_errors:>7} {p.mean_batch:>11.2f} "
            f"{p.p50_ms - bare.total_median_ms:>+11.2f} {p.client_cpu:>6.2f} core"
        )
        for example in p.error_examples:
            print(f"     e.g. {example}")
    print(
        f"(errors include the warm-up; client CPU: this load generator's share of the "
        f"{os.cpu_count()} CPU(s) it shares with the server)\n"
    )
    for what, measured, passed in checks:
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        print(f"{verdict:<4}  {what:<36} {measured}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path(ServeParams().model))
    parser.add_argument("--images", type=int, default=64, help="test images, cycled")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per concurrency")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before each window")
    parser.add_argument("--bare-iterations", type=int, default=300)
    parser.add_argument("--max-batch", type=int, default=ServeParams().max_batch, help="server micro-batch")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (server and bare; default: all)")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.model.is_file():
        raise SystemExit(f"--model {args.model}: no such file (run dvc repro export, or pass --model)")

    import onnxruntime as ort

    images = test_split_images(Path("."), args.images)
    mean_kib = sum(len(d) for _, d in images) / len(images) / 1024
    print(
        f"{args.model}, {len(images)} real test images ({mean_kib:.1f} KiB mean PNG), "
        f"{os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}), "
        f"onnxruntime {ort.__version__}, python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"server: max batch {args.max_batch}, onnxruntime threads {args.threads or 'default (all)'}; "
        f"client: {args.warmup:g} s warm-up + {args.seconds:g} s measured per concurrency {levels}"
    )
    before = measure_bare("before the server started", args.model, images, args.bare_iterations, args.threads)

    port = free_port()
    with running_server(serve_command(args.model, port, args.max_batch, args.threads), port):
        server_provider = served_provider(port)
        print(f"bare provider {before.provider}, server provider {server_provider}, port {port}")
        phases: dict[int, PhaseResult] = {}
        for c in levels:
            phases[c] = run_phase(port, images, c, args.seconds, args.warmup)
            print(f"  concurrency {c}: {phases[c].requests} requests, {phases[c].throughput_rps:.1f} req/s")

    after = measure_bare("after the server stopped", args.model, images, args.bare_iterations, args.threads)
    bare_runs = [before, after]
    bare = min(bare_runs, key=lambda run: run.total_median_ms)
    checks = target_checks(bare, phases)
    print_report(bare_runs, bare, phases, checks)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "machine": {
                "cpu_count": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "onnxruntime": ort.__version__,
                "python": platform.python_version(),
                "bare_provider": before.provider,
                "server_provider": server_provider,
            },
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "bare": [asdict(run) for run in bare_runs],
            "bare_reference": bare.when,
            "phases": [asdict(p) for p in phases.values()],
            "checks": [{"target": w, "measured": m, "passed": p} for w, m, p in checks],
        }
        args.json.write_text(json.dumps(out, indent=2, allow_nan=True) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
