"""Hostile-load benchmark: `synermix serve` under valid and hostile traffic at once.

Starts the service as a subprocess on a free loopback port (as bench/serve_load.py) and
runs two phases of the same length at the same concurrency from this second process:

- **clean**: every client sends real ELPV test images (POST /v1/predict, keep-alive);
- **hostile**: a quarter of the clients turn hostile, each hostile request on a fresh
  connection as an attacker's would be, cycling through the cases the service must
  survive (a 74-byte PNG declaring 1 x 250,000 px, a pixel bomb, a legal 16 MP PNG,
  garbage, a truncated PNG, GIF and EPS files, an empty body, Content-Length plus
  Transfer-Encoding, chunked without a length, a declared length over the limit, a Host
  that is not served), and a further ``--slow`` clients hold connections open with
  half-sent headers or bodies, trickling a byte a second, reconnecting whenever the
  server cuts them.

Targets: 0 answers of 5xx (valid or hostile) in the hostile phase; the valid requests' p99
latency within 2x the clean phase's; the server's resident memory, after the hostile phase
and a short rest, within 100 MiB of what it was before it.

    python bench/serve_hostile.py                          # needs models/ and data/ (dvc repro)
    python bench/serve_hostile.py --concurrency 32 --seconds 60 --json reports/bench/serve_hostile.json
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import platform
import random
import socket
import struct
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (
    HOST,
    free_port,
    percentile,
    running_server,
    serve_command,
    test_split_images,
)

P99_RATIO_TARGET = 2.0
RSS_TARGET_MIB = 100.0
#: the service's limits in this run (small deadlines, so slow clients are cut within the phase)
SERVER_FLAGS = ["--header-timeout-s", "5", "--body-timeout-s", "10", "--max-request-mb", "20"]


# --------------------------------------------------------------------------- hostile inputs
def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def hostile_cases(port: int, good: bytes) -> list[tuple[str, bytes, float]]:
    """(name, raw request bytes, seconds to pause after sending them) per hostile case."""
    host = f"Host: {HOST}:{port}\r\n"

    def post(body: bytes, extra: str = "", kind: str = "image/png") -> bytes:
        head = (
            f"POST /v1/predict HTTP/1.1\r\n{host}Content-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        return head.encode() + body

    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    return [
        ("thin_bomb", post(_png_header(1, 250_000)), 0),
        ("pixel_bomb", post(_png_header(100_000, 100_000)), 0),
        ("big_legal", post(_big_png()), 0),  # 16 MP of one grey: small file, real decode work
        ("garbage", post(random.Random(1).randbytes(5000)), 0),
        ("truncated", post(good[: len(good) // 2]), 0),
        ("gif", post(_encoded("GIF")), 0),
        ("eps", post(_encoded("EPS")), 0),
        ("empty", post(b""), 0),
        ("length_and_chunked", post(chunked, "Transfer-Encoding: chunked\r\n"), 0),
        (
            "chunked",
            f"POST /v1/predict HTTP/1.1\r\n{host}Content-Type: image/png\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + chunked,
            0,
        ),
        (
            "over_limit",
            f"POST /v1/predict HTTP/1.1\r\n{host}Content-Type: image/png\r\n"
            "Content-Length: 999999999\r\n\r\n".encode(),
            0,
        ),
        ("wrong_host", b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n", 0),
    ]


def _read_status(sock: socket.socket) -> int:
    """The status of the first answer on ``sock`` (0: closed without one)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    line = data.split(b"\r\n", 1)[0].split(b" ")
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


# --------------------------------------------------------------------------- clients
@dataclass
class PhaseResult:
    name: str
    seconds: float
    valid_requests: int
    valid_errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    hostile_requests: int = 0
    hostile_status: dict[str, dict[str, int]] = field(default_factory=dict)
    slow_cut: int = 0
    five_xx: int = 0
    examples: list[str] = field(default_factory=list)


class Client(threading.Thread):
    """Valid requests on a keep-alive connection, back to back; with ``cases``, hostile
    requests only, each on a fresh connection."""

    def __init__(self, port: int, images: list[bytes], cases, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.images, self.cases, self.stop = port, images, cases, stop
        self.rng = random.Random(seed)
        self.valid: list[tuple[float, float, int]] = []
        self.hostile: list[tuple[str, int]] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        i = self.rng.randrange(len(self.images))
        while not self.stop.is_set():
            if self.cases:
                self.hostile.append(self._hostile(self.cases[self.rng.randrange(len(self.cases))]))
                continue
            data = self.images[i % len(self.images)]
            i += 1
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/predict", body=data, headers={"Content-Type": "image/png"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
            self.valid.append((start, time.perf_counter(), status))
        conn.close()

    def _hostile(self, case) -> tuple[str, int]:
        name, raw, _ = case
        try:
            with socket.create_connection((HOST, self.port), timeout=30) as sock:
                sock.sendall(raw)
                return name, _read_status(sock)
        except OSError:
            return name, 0


class SlowClient(threading.Thread):
    """Holds a connection with half-sent headers (or a half-sent body), trickling a byte now
    and then; reconnects whenever the server cuts it. Counts the cuts."""

    def __init__(self, port: int, good: bytes, body: bool, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.good, self.body, self.stop = port, good, body, stop
        self.cuts = 0
        self.statuses: list[int] = []

    def run(self) -> None:
        head = f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Type: image/png\r\n"
        while not self.stop.is_set():
            try:
                with socket.create_connection((HOST, self.port), timeout=30) as sock:
                    if self.body:
                        sock.sendall(
                            f"{head}Content-Length: {len(self.good)}\r\n\r\n".encode() + self.good[:100]
                        )
                    else:
                        sock.sendall(head.encode())
                    sock.settimeout(1.0)
                    while not self.stop.is_set():
                        try:
                            data = sock.recv(65536)
                        except TimeoutError:
                            sock.sendall(b"x" if self.body else b"X-A: b\r\n")  # a trickle
                            continue
                        if not data:
                            self.cuts += 1
                            break
                        self.statuses.append(
                            int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
                        )
                        self.cuts += 1
                        break
            except OSError:
                self.cuts += 1
                time.sleep(0.1)


def run_phase(
    name: str, port: int, images: list[bytes], concurrency: int, seconds: float, slow: int
) -> PhaseResult:
    stop = threading.Event()
    cases = hostile_cases(port, images[0]) if name == "hostile" else []
    hostile_clients = concurrency // 4 if cases else 0
    clients = [
        Client(port, images, cases if k < hostile_clients else [], 1000 + k, stop) for k in range(concurrency)
    ]
    slows = [SlowClient(port, images[0], body=k % 2 == 1, stop=stop) for k in range(slow if cases else 0)]
    t0 = time.perf_counter()
    for c in [*clients, *slows]:
        c.start()
    time.sleep(seconds)
    stop.set()
    t1 = time.perf_counter()
    for c in [*clients, *slows]:
        c.join(timeout=60)
    valid = [r for c in clients for r in c.valid]
    ok = sorted(e - s for s, e, status in valid if status == 200)
    hostile = [h for c in clients for h in c.hostile]
    by_case: dict[str, dict[str, int]] = {}
    for case, status in hostile:
        by_case.setdefault(case, {}).setdefault(str(status), 0)
        by_case[case][str(status)] += 1
    slow_statuses = [s for c in slows for s in c.statuses]
    five_xx = (
        sum(s >= 500 for *_, s in valid)
        + sum(s >= 500 for _, s in hostile)
        + sum(s >= 500 for s in slow_statuses)
    )
    errors = [status for *_, status in valid if status != 200]
    return PhaseResult(
        name=name,
        seconds=round(t1 - t0, 2),
        valid_requests=len(valid),
        valid_errors=len(errors),
        throughput_rps=round(len(ok) / (t1 - t0), 2),
        p50_ms=round(percentile(ok, 0.5) * 1e3, 2) if ok else float("nan"),
        p99_ms=round(percentile(ok, 0.99) * 1e3, 2) if ok else float("nan"),
        hostile_requests=len(hostile),
        hostile_status=by_case,
        slow_cut=sum(c.cuts for c in slows),
        five_xx=five_xx,
        examples=sorted({f"valid answered {s}" for s in errors})[:5],
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--model", default="models/onnx/model.onnx")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--slow", type=int, default=16, help="slow clients besides the concurrency")
    parser.add_argument("--rest", type=float, default=10.0, help="seconds before the memory is read again")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads of the server")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    root = Path(args.root)
    model = root / args.model
    if not model.is_file():
        raise SystemExit(f"{model}: no model; run dvc repro first (or give --model)")
    images = [data for _, data in test_split_images(root, 64)]
    port = free_port()
    command = [*serve_command(model, port, 32, args.threads), *SERVER_FLAGS]
    with running_server(command, port) as process:
        warm = run_phase("warm-up", port, images, 4, 3.0, 0)
        rss_start = rss_mib(process.pid)
        clean = run_phase("clean", port, images, args.concurrency, args.seconds, 0)
        rss_clean = rss_mib(process.pid)
        hostile = run_phase("hostile", port, images, args.concurrency, args.seconds, args.slow)
        rss_peak_hint = rss_mib(process.pid)
        time.sleep(args.rest)
        rss_end = rss_mib(process.pid)
        alive = process.poll() is None
    ratio = hostile.p99_ms / clean.p99_ms if clean.p99_ms else float("nan")
    checks = [
        ("no 5xx in the hostile phase", f"{hostile.five_xx}", hostile.five_xx == 0),
        (
            "valid p99 within 2x clean",
            f"{hostile.p99_ms} ms vs {clean.p99_ms} ms = {ratio:.2f}x",
            ratio <= P99_RATIO_TARGET,
        ),
        (
            "RSS back within 100 MiB",
            f"{rss_start:.0f} MiB before, {rss_end:.0f} MiB after ({rss_end - rss_start:+.0f})",
            rss_end - rss_start <= RSS_TARGET_MIB,
        ),
        ("server alive", str(alive), alive),
        (
            "no valid request failed",
            f"{hostile.valid_errors} of {hostile.valid_requests}",
            hostile.valid_errors == 0 and clean.valid_errors == 0,
        ),
    ]
    report = {
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": len(__import__("os").sched_getaffinity(0)),
        },
        "settings": {
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "slow": args.slow,
            "server_flags": SERVER_FLAGS,
        },
        "phases": [asdict(p) for p in (warm, clean, hostile)],
        "rss_mib": {
            "start": rss_start,
            "after_clean": rss_clean,
            "after_hostile": rss_peak_hint,
            "after_rest": rss_end,
        },
        "checks": [{"check": c, "value": v, "passed": ok} for c, v, ok in checks],
    }
    for phase in (clean, hostile):
        print(
            f"{phase.name:8s} {phase.valid_requests:6d} valid ({phase.valid_errors} failed), "
            f"{phase.throughput_rps} req/s, p50 {phase.p50_ms} ms, p99 {phase.p99_ms} ms; "
            f"hostile {phase.hostile_requests}, slow cuts {phase.slow_cut}, 5xx {phase.five_xx} "
            f"{phase.examples}"
        )
    print("hostile answers by case:", json.dumps(hostile.hostile_status, sort_keys=True))
    print(
        f"server RSS MiB: start {rss_start:.1f}, after clean {rss_clean:.1f}, "
        f"after hostile {rss_peak_hint:.1f}, after {args.rest:g} s rest {rss_end:.1f}"
    )
    for check, value, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {check}: {value}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if all(ok for *_, ok in checks) else 1)


if __name__ == "__main__":
    main()
