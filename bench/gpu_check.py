"""GPU check: every CUDA path of synermix, run once on real hardware, in one command.

Runs, each part time-boxed so that one failure does not lose the others (a failed part
is recorded as FAILED with a one-line reason, and the rest goes on):

* **data**: a short ELPV workload without network, through the project's own
  ``prepare_dataset``: ``--manifest`` (a prepared manifest.csv), else ``--data`` (a
  ``<class>/<image>`` folder), else the ``elpv-dataset`` package when installed, else
  ``.gpucheck/elpv`` (the ELPV subset ``bash bench/gpu_check.sh prepare`` writes), else a
  synthetic dataset, with a warning.
* **loader**: the real train pipeline (``load_training_data``, ``ClassPairBatchSampler``,
  DataLoader with pinned memory) cut into a few fixed batches; its images/s with
  ``--workers`` and with 0 workers (the params.yaml default).
* **train step**: the project's ``train_one_epoch`` with ``SynerMixLoss`` and
  ``build_model`` over those batches on CUDA for each variant: fp32, bf16 autocast,
  fp16 autocast + GradScaler, channels_last on/off, torch.compile on/off (wired as
  ``train_model`` does), plus cuDNN benchmark and GPU-resident batches as levers.
  Per variant: images/s and step ms of SynerMix and of MixUp (same batches, same model,
  interleaved), their ratio (README target <= 2.1x), peak GPU memory, and whether the
  SynerMix loss stays finite and decreases.
* **train_model**: the project's ``train_model`` (select_device, DataLoader, checkpoint,
  evaluate) for a few epochs, then ``save_trained_model``.
* **export**: ``load_trained_model`` and the project's ONNX export (dynamo, opset 18;
  torchscript when dynamo fails) and its FP16 variant (``convert_fp16``).
* **parity** on real val/test images from their file bytes (production preprocessing):
  PyTorch CPU fp32 as reference against onnxruntime CPU, CUDA EP (fp32 and FP16) and
  TensorRT EP, and PyTorch on CUDA (fp32 with and without TF32, the evaluate() setup,
  fp16): max |logit| and |probability| differences, argmax agreement, accuracy, ms per
  batch of 64. The fp32 rows use the project's ``check_parity`` and its 1e-4 gate.
  A provider onnxruntime does not offer or take is SKIPPED with a note.

Writes one Markdown table of all figures with the machine details (GPU, driver, torch,
onnxruntime, commit) to ``--out`` (default ``$OUT/gpu_check.md`` when ``$OUT`` is set, else
``reports/bench/gpu_check.md``) and the same as JSON beside it, after every part, so a
run cut short still leaves what it measured. Exit 0 when every check passed, 1 when a
check or a part failed, 2 for a missing package or no GPU.

Sized for under 8 minutes on one GPU (``--budget`` 400 s for all parts; compile and
TensorRT run last). ``--cpu-smoke`` runs it tiny on CPU (32 px, a few steps; CUDA parts
skipped with notes) to test the script itself.

Packages it imports (the project modules engine, mixup, models, training, config,
data.prepare/sources/manifest/datasets/samplers/transforms/images, onnx_export,
inference): torch, torchvision, numpy, pandas, pillow, tqdm, pyyaml, pydantic (with
pydantic-core, annotated-types, typing-inspection, typing-extensions), onnx, onnxscript
(with onnx-ir, for the dynamo exporter) and onnxruntime (its ``transformers`` package
does the FP16 conversion). A missing one stops the script with one line naming it.
On the H200 of the device tool only pydantic and its four companions are missing; they
travel as wheels. elpv-dataset (92 MB) is over the tool's 64 MiB limit, so a seeded
subset of its images (200 per class, about 25 MB) travels as a folder instead.
onnxruntime there is the CPU build (as last listed), so its CUDA/TensorRT rows are
expected to be SKIPPED; onnxruntime-gpu (about 340 MB installed) cannot travel.

Here, once per session, before the device call (needs the .venv, elpv-dataset, network):

    bash bench/gpu_check.sh prepare      # .gpucheck/{whl,elpv,commit.txt}, git-ignored

Then the device tool's ``run`` with

    command:   bash bench/gpu_check.sh
    carry:     [".gpucheck"]
    timeout_s: 480

The report comes back as gpu_check.md, gpu_check.json and gpu_check.log under files_at.
Locally:

    PYTHONPATH=src .venv/bin/python bench/gpu_check.py --cpu-smoke --out /tmp/gpu_check.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CARRY_DIR = ROOT / ".gpucheck"
DATA_MARKER = ".gpu_check-data"

#: (module to import, package to carry) for everything the script and the project code it uses import
REQUIRED = (
    ("numpy", "numpy"),
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("pandas", "pandas"),
    ("PIL", "pillow"),
    ("tqdm", "tqdm"),
    ("yaml", "pyyaml"),
    ("pydantic", "pydantic (with pydantic-core, annotated-types, typing-inspection)"),
    ("onnx", "onnx"),
    ("onnxscript", "onnxscript (with onnx-ir)"),
    ("onnxruntime", "onnxruntime"),
)

DEFAULT_VARIANTS = (
    "fp32",
    "fp32-cl",
    "bf16",
    "bf16-cl",
    "fp16",
    "fp16-cl",
    "bf16-cl-bench",
    "bf16-cl-resident",
    "bf16-cl-compile",
    "fp16-cl-compile",
)
VARIANT_FLAGS = {"cl", "compile", "bench", "resident"}

#: option: (GPU default, --cpu-smoke default)
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "image_size": (300, 32),
    "batch": (128, 8),
    "batches": (8, 2),
    "rounds": (3, 2),
    "warmup": (1, 1),
    "epochs": (3, 2),
    "workers": (min(8, os.cpu_count() or 1), 0),
    "parity_images": (256, 16),
    "max_per_class": (200, 12),
    "budget": (400.0, 150.0),
    "lr": (0.05, 0.01),
}

SECTION_ORDER = ("data", "loader", "train step", "train_model", "export", "parity")
SYNERMIX_TARGET = 2.1  # README: a SynerMix step costs at most 2.1x a MixUp step
PARITY_TOL = 1e-4  # export.parity_max_abs_diff
TF32_TOL = 1e-2  # informational tolerance where TF32 is on
MAX_ACCURACY_DROP = 0.01  # export.max_accuracy_drop
MIN_AGREEMENT = 0.99  # reduced precision: argmax agreement
LOADER_CASE = "load_training_data + DataLoader"
REFERENCE_CASE = "PyTorch CPU fp32 (reference)"
#: the evaluate stage's setup (evaluation.py: select_device(amp=False, channels_last=False))
EVAL_CASE = "PyTorch CUDA fp32, torch defaults (cuDNN TF32): evaluate stage"
#: train_model's per-epoch validation (select_device with train.amp and channels_last)
VAL_CASE = "PyTorch CUDA, select_device() amp + CL: train_model's val"


class Skip(Exception):
    """A part that cannot run here; ``str()`` is the note."""


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (SIGALRM)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"timed out after {seconds:.0f} s (time box)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = type(exc).__name__ + (": " + " / ".join(lines[:2]) if lines else "")
    return text if len(text) <= 300 else text[:297] + "..."


def check_packages() -> None:
    missing = []
    for module, package in REQUIRED:
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing.append(f"{package} (import {module}: {one_line(exc)})")
    if missing:
        print(
            "error: missing Python package(s): "
            + "; ".join(missing)
            + ". Carry the wheels: `bash bench/gpu_check.sh prepare` here, then run with carry "
            "['.gpucheck'] (see bench/gpu_check.py's docstring)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        importlib.import_module("synermix")
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))


# --------------------------------------------------------------------------- the report
@dataclass
class Row:
    section: str
    case: str
    figure: str
    value: Any
    text: str
    check: str = ""


@dataclass
class Report:
    md_path: Path
    json_path: Path
    budget: float
    smoke: bool
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    sections: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, section: str, case: str, figure: str, value: Any, fmt: str = "", check: str = "") -> None:
        if isinstance(value, float) and not math.isfinite(value):
            text = str(value)
        elif fmt and value is not None:
            text = format(value, fmt)
        else:
            text = str(value)
        self.rows.append(Row(section, case, figure, value, text, check))

    def note(self, text: str) -> None:
        print(f"NOTE: {text}")
        self.notes.append(text)

    def attempt(self, section: str, case: str, seconds: float, fn, min_seconds: float = 5.0):
        """Run ``fn`` time-boxed; record OK / FAILED / SKIPPED; return its value or None."""
        remaining = self.budget - self.elapsed
        mark = len(self.rows)
        start = time.monotonic()
        status, reason, value = "OK", "", None
        if remaining < min_seconds:
            status, reason = "SKIPPED", f"the --budget of {self.budget:.0f} s is spent"
        else:
            try:
                with time_box(min(seconds, remaining)):
                    value = fn()
            except Skip as exc:
                status, reason = "SKIPPED", str(exc)
            except Exception as exc:
                status, reason = "FAILED", one_line(exc)
                print(f"--- {section} / {case} failed:", file=sys.stderr)
                traceback.print_exc()
        took = time.monotonic() - start
        text = f"{status} ({took:.1f} s)"
        self.rows.insert(mark, Row(section, case, "status", status, text, reason))
        self.sections.append(
            {"section": section, "case": case, "status": status, "reason": reason, "seconds": took}
        )
        print(
            f"[{self.elapsed:6.1f} s] {section} / {case}: {text}{': ' + reason if reason else ''}", flush=True
        )
        self.write()
        return value

    def counts(self) -> dict[str, int]:
        checks = [r.check for r in self.rows if r.figure != "status"]
        return {
            "checks_passed": sum(c.startswith("PASS") for c in checks),
            "checks_failed": sum(c.startswith("FAIL") for c in checks),
            "parts_ok": sum(s["status"] == "OK" for s in self.sections),
            "parts_failed": sum(s["status"] == "FAILED" for s in self.sections),
            "parts_skipped": sum(s["status"] == "SKIPPED" for s in self.sections),
        }

    def ordered_rows(self) -> list[Row]:
        def key(item):
            index, row = item
            rank = SECTION_ORDER.index(row.section) if row.section in SECTION_ORDER else len(SECTION_ORDER)
            return rank, index

        return [row for _, row in sorted(enumerate(self.rows), key=key)]

    def table(self) -> str:
        lines = ["| section | case | figure | value | check |", "|---|---|---|---:|---|"]
        for r in self.ordered_rows():
            cells = [r.section, r.case, r.figure, r.text, r.check]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)

    def markdown(self) -> str:
        c = self.counts()
        head = ["# synermix GPU check" + (" (CPU smoke)" if self.smoke else ""), ""]
        for key, value in self.meta.items():
            head.append(f"- **{key}**: {value}")
        head.append(
            f"- **result**: {c['checks_passed']} checks passed, {c['checks_failed']} failed; parts "
            f"{c['parts_ok']} OK, {c['parts_failed']} FAILED, {c['parts_skipped']} SKIPPED; "
            f"{self.elapsed:.0f} s"
        )
        body = ["", self.table(), ""]
        if self.notes:
            body += ["Notes:", "", *[f"- {n}" for n in self.notes], ""]
        return "\n".join(head + body)

    def write(self) -> None:
        self.md_path.parent.mkdir(parents=True, exist_ok=True)
        self.md_path.write_text(self.markdown())
        payload = {
            "meta": self.meta,
            "counts": self.counts(),
            "seconds": self.elapsed,
            "rows": [
                {
                    "section": r.section,
                    "case": r.case,
                    "figure": r.figure,
                    "value": r.value if isinstance(r.value, (int, float, str, bool, type(None))) else r.text,
                    "text": r.text,
                    "check": r.check,
                }
                for r in self.ordered_rows()
            ],
            "sections": self.sections,
            "notes": self.notes,
        }
        self.json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- environment
def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def code_identity() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "synermix").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    src = f"src sha256 {digest.hexdigest()[:12]}"
    commit = _run(["git", "rev-parse", "HEAD"]) if (ROOT / ".git").exists() else ""
    if commit:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        n = len(dirty.splitlines()) if dirty else 0
        return f"commit {commit[:12]}" + (f" + {n} modified file(s)" if n else "") + f"; {src}"
    carried = CARRY_DIR / "commit.txt"
    if carried.is_file():
        return f"{' '.join(carried.read_text().split())} (from .gpucheck/commit.txt, at prepare); {src}"
    return f"commit unknown (no git); {src}"


def machine_details(report: Report, smoke: bool) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import onnxscript
    import pydantic
    import torch
    import torchvision

    from synermix.engine import select_device

    meta = report.meta
    meta["when"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        meta["GPU"] = (
            f"{props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
        )
        meta["driver"] = smi.splitlines()[0] if smi else "nvidia-smi not found"
    else:
        meta["GPU"] = "none visible to torch" + (" (--cpu-smoke)" if smoke else "")
    meta["CPU"] = f"{os.cpu_count()} cores, {platform.machine()}, torch threads {torch.get_num_threads()}"
    meta["python"] = f"{platform.python_version()} ({sys.executable})"
    meta["torch"] = (
        f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); "
        f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}; "
        f"cudnn.benchmark {torch.backends.cudnn.benchmark}"
    )
    meta["torchvision"] = torchvision.__version__
    meta["onnxruntime"] = f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}"
    meta["onnx / onnxscript"] = f"{onnx.__version__} / {onnxscript.__version__}"
    meta["numpy / pydantic"] = f"{np.__version__} / {pydantic.VERSION}"
    meta["code"] = code_identity()
    if torch.cuda.is_available():
        setup = select_device("auto")
        meta["select_device('auto')"] = (
            f"{setup.device}, amp {setup.amp_dtype}, channels_last {setup.channels_last}; native bf16 "
            f"{torch.cuda.is_bf16_supported(including_emulation=False)}"
        )


# --------------------------------------------------------------------------- data
@dataclass
class Context:
    args: argparse.Namespace
    report: Report
    tmp: Path
    device: Any = None
    source: str = ""
    manifest: Any = None  # usable rows
    root: Path | None = None
    names: list[str] = field(default_factory=list)
    training_data: Any = None
    batches: list = field(default_factory=list)
    variants: dict[str, dict[str, float]] = field(default_factory=dict)
    model_dir: Path | None = None
    onnx_path: Path | None = None
    fp16_path: Path | None = None
    parity: dict[str, Any] = field(default_factory=dict)

    def rows(self, split: str):
        return self.manifest[self.manifest["split"] == split]

    def train_params(self, **overrides):
        from synermix.config import TrainParams

        a = self.args
        wanted = {
            "method": "synermix",
            "inter_method": "mixup",
            "beta": 0.1,
            "arch": a.arch,
            "image_size": a.image_size,
            "epochs": a.epochs,
            "batch_size": a.batch,
            "lr": a.lr,
            "warmup_epochs": min(0.5, float(a.epochs)),
            "device": "cpu" if a.cpu_smoke else "cuda",
            "amp": True,
            "channels_last": True,
            "compile": False,
            "num_workers": a.workers,
            "cache_images": True,
            **overrides,
        }
        return TrainParams(**{k: v for k, v in wanted.items() if k in TrainParams.model_fields})


def write_synthetic(folder: Path, per_class: int, size: int, seed: int) -> None:
    """4 classes of grey cells with 0, 2, 4 or 6 dark 'cracks': learnable, not ELPV."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(4):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(150, 18, (size, size)), 0, 255)
            for _ in range(2 * c):
                row = int(rng.integers(2, size - 4))
                pixels[row : row + max(1, size // 48), :] *= 0.35
            if rng.random() < 0.5:
                pixels = pixels.T
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"class_{c}" / f"s{i:04d}.png")


def load_data(ctx: Context) -> None:
    from synermix.config import SourceSpec
    from synermix.data.manifest import class_names, read_manifest, read_quarantine, usable_rows
    from synermix.data.prepare import prepare_dataset

    a, report = ctx.args, ctx.report
    split = {"train": 0.7, "val": 0.15, "test": 0.15}
    if a.manifest and not a.synthetic:
        path = Path(a.manifest)
        frame = usable_rows(read_manifest(path), read_quarantine(path.parent / "no-quarantine.csv"))
        ctx.root, ctx.source = path.parent, f"manifest {path}"
    else:
        spec = None
        if not a.synthetic:
            if a.data:
                spec, ctx.source = SourceSpec("folder", Path(a.data)), f"folder {a.data}"
            elif importlib.util.find_spec("elpv_dataset") is not None:
                spec, ctx.source = SourceSpec("elpv"), "elpv-dataset package"
            elif (CARRY_DIR / "elpv").is_dir():
                spec = SourceSpec("folder", CARRY_DIR / "elpv")
                ctx.source = "folder .gpucheck/elpv (ELPV subset written by `gpu_check.sh prepare`)"
        if spec is None:
            folder = ctx.tmp / "synthetic"
            write_synthetic(folder, max(12, min(a.max_per_class, 60)), max(a.image_size, 48), a.seed)
            spec, ctx.source = SourceSpec("folder", folder), "SYNTHETIC images (no ELPV data found)"
            report.note(
                "no ELPV data (--manifest, --data, elpv-dataset or .gpucheck/elpv): trained on synthetic "
                "images; speed figures hold, accuracy figures mean nothing"
            )
        out = ctx.tmp / "prepared"
        result = prepare_dataset(
            spec, out, seed=a.seed, split=split, max_per_class=a.max_per_class, workers=os.cpu_count() or 2
        )
        frame = usable_rows(result.manifest, read_quarantine(out / "no-quarantine.csv"))
        ctx.root = out
    ctx.manifest = frame
    ctx.names = class_names(frame)
    counts = {s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")}
    if counts["train"] == 0 or counts["val"] == 0:
        raise RuntimeError(f"the data has no train or val images ({counts})")
    report.meta["data"] = f"{ctx.source}: {len(frame)} usable images, {len(ctx.names)} classes"
    split_counts = f"{counts['train']} / {counts['val']} / {counts['test']}"
    report.add("data", "prepare_dataset", "source", ctx.source)
    report.add("data", "prepare_dataset", "images train / val / test", split_counts)
    report.add("data", "prepare_dataset", "classes", ", ".join(ctx.names))


def build_loader(ctx: Context) -> None:
    import torch
    from torch.utils.data import DataLoader

    from synermix.data.samplers import ClassPairBatchSampler
    from synermix.training import load_training_data

    a, report = ctx.args, ctx.report
    if ctx.manifest is None:
        raise Skip("no data (the data part failed)")
    params = ctx.train_params()
    start = time.perf_counter()
    ctx.training_data = data = load_training_data(
        ctx.rows("train"), ctx.rows("val"), ctx.root, ctx.names, params
    )
    decode = time.perf_counter() - start
    pre = data.preprocessing
    case = LOADER_CASE
    report.add("loader", case, "input, batch", f"{pre.channels}x{a.image_size}x{a.image_size}, {a.batch}")
    report.add("loader", case, "decode + cache train/val (s)", decode, ".1f")
    report.add("loader", case, "train mean / std", f"{pre.mean} / {pre.std}")
    pin = ctx.device.type == "cuda"

    def collect(workers: int, count: int) -> tuple[list, float]:
        sampler = ClassPairBatchSampler(data.train_set.labels, a.batch, a.seed)
        loader = DataLoader(data.train_set, batch_sampler=sampler, num_workers=workers, pin_memory=pin)
        batches, images, t0 = [], 0, None
        while len(batches) < count:
            for batch in loader:
                if t0 is None:
                    t0 = time.perf_counter()  # from the first batch: worker start-up left out
                else:
                    images += batch[2].shape[0]
                batches.append(batch)
                if len(batches) >= count:
                    break
        rate = images / max(time.perf_counter() - t0, 1e-9) if images else float("nan")
        return batches, rate

    ctx.batches, rate = collect(a.workers, a.batches)
    sizes = [int(b[2].shape[0]) for b in ctx.batches]
    report.add("loader", case, "batches kept (images each)", f"{len(sizes)} ({min(sizes)}-{max(sizes)})")
    report.add("loader", case, f"loader images/s, {a.workers} workers", rate, ".0f")
    if a.workers != 0:
        _, rate0 = collect(0, min(4, max(2, a.batches)))
        report.add("loader", case, "loader images/s, 0 workers (params default)", rate0, ".0f")
    torch.manual_seed(a.seed)


# --------------------------------------------------------------------------- training variants
@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    channels_last: bool
    compile: bool
    bench: bool
    resident: bool

    @classmethod
    def parse(cls, name: str) -> Variant:
        precision, *flags = name.strip().split("-")
        unknown = set(flags) - VARIANT_FLAGS
        if precision not in ("fp32", "bf16", "fp16") or unknown:
            print(
                f"error: bad variant {name!r}: <fp32|bf16|fp16>[-cl][-compile][-bench][-resident]",
                file=sys.stderr,
            )
            raise SystemExit(2)
        return cls(name, precision, "cl" in flags, "compile" in flags, "bench" in flags, "resident" in flags)


def train_variant(ctx: Context, v: Variant) -> None:
    import torch

    from synermix.engine import DeviceSetup, build_optimizer, build_scheduler, train_one_epoch
    from synermix.mixup import MixRandom, SynerMixLoss
    from synermix.models import build_model

    a, report = ctx.args, ctx.report
    if not ctx.batches:
        raise Skip("no batches (the loader part failed)")
    cuda = ctx.device.type == "cuda"
    if not cuda and v.compile:
        raise Skip("torch.compile runs on CUDA only here (--cpu-smoke)")
    if not cuda and v.precision == "fp16" and not v.channels_last:
        raise Skip(
            "CPU fp16 autocast without channels_last is too slow for a smoke (fp16-cl runs GradScaler)"
        )
    if cuda and v.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise Skip("this GPU has no native bf16")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[v.precision]
    setup = DeviceSetup(ctx.device, dtype, v.channels_last)
    num_classes = len(ctx.names)
    channels = ctx.training_data.preprocessing.channels
    batches = ctx.batches
    if v.resident:
        batches = [tuple(t.to(ctx.device) for t in b) for b in batches]
    torch.backends.cudnn.benchmark = v.bench
    try:
        torch.manual_seed(a.seed)
        model = build_model(a.arch, num_classes, channels).to(ctx.device)
        if setup.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, "sgd", a.lr, 0.9, 5e-4)
        # linear warm-up over the warm-up epochs of both methods, then an almost flat cosine
        scheduler = build_scheduler(optimizer, len(batches), 1000, "cosine", 2.0 * a.warmup, 10, 0.5)
        scaler = torch.amp.GradScaler(ctx.device.type) if dtype == torch.float16 else None
        if v.compile:  # as train_model does it
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            model.run_stages = torch.compile(model.run_stages)
        methods = ("mixup", "synermix")
        losses = {m: SynerMixLoss(m, num_classes, MixRandom(a.seed), beta=0.1) for m in methods}

        def epoch(method: str, data, index: int) -> dict[str, float]:
            return train_one_epoch(model, losses[method], optimizer, scheduler, data, setup, index, scaler)

        # warm-up over every batch: each batch size (the pair sampler varies it) is seen
        # once, so cuDNN autotuning and dynamo's recompiles stay out of the timed rounds
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            for method in methods:
                epoch(method, batches, 0)
        warm = time.perf_counter() - t0
        graphs = _dynamo_graphs() if v.compile else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        stats: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        for r in range(a.rounds):
            for method in methods:
                stats[method].append(epoch(method, batches, r + 1))
        step = {m: statistics.median(s["epoch_seconds"] for s in stats[m]) / len(batches) for m in methods}
        rate = {m: statistics.median(s["images_per_s"] for s in stats[m]) for m in methods}
        ratio = step["synermix"] / step["mixup"]
        trail = [s["train_loss"] for s in stats["synermix"]]
        finite = all(math.isfinite(x) for x in trail + [s["train_loss"] for s in stats["mixup"]])
        decreasing = trail[-1] < trail[0]
        ctx.variants[v.name] = {"synermix_img_s": rate["synermix"], "ratio": ratio}

        add = report.add
        add("train step", v.name, "synermix images/s", rate["synermix"], ".0f")
        add("train step", v.name, "mixup images/s", rate["mixup"], ".0f")
        add(
            "train step",
            v.name,
            "synermix / mixup step ms",
            f"{step['synermix'] * 1e3:.1f} / {step['mixup'] * 1e3:.1f}",
        )
        add(
            "train step",
            v.name,
            "synermix / mixup step",
            ratio,
            ".2f",
            "PASS" if ratio <= SYNERMIX_TARGET else f"FAIL: over the {SYNERMIX_TARGET}x target",
        )
        add(
            "train step",
            v.name,
            "synermix loss, first -> last round",
            f"{trail[0]:.4f} -> {trail[-1]:.4f}",
            check="PASS"
            if finite and decreasing
            else ("FAIL: not finite" if not finite else "FAIL: not decreasing"),
        )
        add("train step", v.name, "warm-up s" + (" (incl. compile)" if v.compile else ""), warm, ".1f")
        if v.compile:
            after = _dynamo_graphs()
            text = f"{graphs} after warm-up, {after} after the timed rounds"
            add(
                "train step",
                v.name,
                "dynamo graphs compiled",
                text,
                check="PASS" if after == graphs else "FAIL: recompiled while timed",
            )
        if cuda:
            add("train step", v.name, "peak GPU memory GiB", torch.cuda.max_memory_allocated() / 2**30, ".2f")
        if scaler is not None:
            add("train step", v.name, "GradScaler scale at end", float(scaler.get_scale()), ".0f")
    finally:
        torch.backends.cudnn.benchmark = False
        if v.compile:
            torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _dynamo_graphs() -> int | str:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return "?"


def count_host_syncs(ctx: Context) -> None:
    """Synchronising CUDA calls in one training step per method, where they come from
    (torch.cuda.set_sync_debug_mode), with the project's default device setup."""
    import warnings

    import torch

    from synermix.engine import select_device
    from synermix.mixup import MixRandom, SynerMixLoss
    from synermix.models import build_model

    if ctx.device.type != "cuda":
        raise Skip("CUDA only (--cpu-smoke)")
    if not ctx.batches:
        raise Skip("no batches (the loader part failed)")
    setup = select_device("cuda")
    num_classes = len(ctx.names)
    model = build_model(ctx.args.arch, num_classes, ctx.training_data.preprocessing.channels).to(ctx.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x_orig, x_aug, y = ctx.batches[0]
    x_orig, x_aug, y = setup.to_device(x_orig), setup.to_device(x_aug), y.to(ctx.device)
    case = "host syncs"
    dtype = str(setup.amp_dtype).replace("torch.", "")
    ctx.report.add(
        "train step", case, "setup", f"select_device(): {dtype}, channels_last {setup.channels_last}"
    )
    for method in ("mixup", "synermix"):
        loss = SynerMixLoss(method, num_classes, MixRandom(0), beta=0.1)

        def step(loss=loss) -> None:
            with setup.autocast():
                parts = loss(model, x_orig, x_aug, y)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()

        step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        check = "PASS" if not syncs else "FAIL: the README says a step has no host sync"
        text = f"{len(syncs)}" + (f" ({', '.join(where)})" if where else "")
        ctx.report.add("train step", case, f"{method}: synchronising calls in one step", text, check=check)


def compare_variants(ctx: Context) -> None:
    """SynerMix images/s of every variant that ran, against fp32 (else the first one)."""
    if not ctx.variants:
        return
    label = "fp32" if "fp32" in ctx.variants else next(iter(ctx.variants))
    base = ctx.variants[label]["synermix_img_s"]
    for name, figures in ctx.variants.items():
        figure = f"{name}: synermix images/s x {label}"
        ctx.report.add("train step", "speed-up summary", figure, figures["synermix_img_s"] / base, ".2f")


# --------------------------------------------------------------------------- train_model
def run_train_model(ctx: Context) -> None:
    import torch

    from synermix.training import load_training_data, save_trained_model, train_model

    a, report = ctx.args, ctx.report
    if ctx.manifest is None:
        raise Skip("no data (the data part failed)")
    params = ctx.train_params(compile=a.train_compile)
    case = "train_model"
    setup = f"{params.method}, {params.epochs} epochs, {params.device}, amp {params.amp}, "
    setup += f"channels_last {params.channels_last}, compile {params.compile}, {params.num_workers} workers"
    report.add("train_model", case, "params", setup)
    checkpoint = ctx.tmp / "checkpoints" / "last.pt"
    start = time.perf_counter()
    data = ctx.training_data or load_training_data(
        ctx.rows("train"), ctx.rows("val"), ctx.root, ctx.names, params
    )
    result = train_model(data, ctx.names, params, a.seed, checkpoint_path=checkpoint)
    wall = time.perf_counter() - start
    history = result.history
    losses = [row["train_loss"] for row in history]
    finite = all(math.isfinite(x) for x in losses + [row["val_loss"] for row in history])
    decreasing = len(losses) < 2 or losses[-1] < losses[0]
    report.add(
        "train_model",
        case,
        "train loss per epoch",
        ", ".join(f"{x:.4f}" for x in losses),
        check="PASS"
        if finite and decreasing
        else ("FAIL: not finite" if not finite else "FAIL: not decreasing"),
    )
    report.add(
        "train_model", case, "val accuracy per epoch", ", ".join(f"{r['val_accuracy']:.3f}" for r in history)
    )
    report.add(
        "train_model", case, "images/s per epoch", ", ".join(f"{r['images_per_s']:.0f}" for r in history)
    )
    report.add("train_model", case, "wall s (incl. val)", wall, ".1f")
    report.add("train_model", case, "checkpoint MB", checkpoint.stat().st_size / 1e6, ".1f")
    ctx.model_dir = ctx.tmp / "model"
    save_trained_model(result, params, ctx.model_dir, {"manifest_sha256": "", "gpu_check": True})
    del result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def untrained_model_dir(ctx: Context) -> Path:
    """An untrained model saved as train_model's would be, so export and parity still run."""
    from synermix.data.transforms import Preprocessing
    from synermix.models import build_model
    from synermix.training import TrainingResult, save_trained_model

    params = ctx.train_params()
    if ctx.training_data is not None:
        pre = ctx.training_data.preprocessing
    else:
        pre = Preprocessing(params.image_size, 1, (0.5,), (0.25,))
    names = ctx.names or ["a", "b", "c", "d"]
    model = build_model(params.arch, len(names), pre.channels)
    out = ctx.tmp / "untrained"
    save_trained_model(TrainingResult(model, names, pre, [], 0), params, out, {"gpu_check": "untrained"})
    ctx.report.note("train_model failed or was skipped: export and parity ran on an untrained model")
    return out


# --------------------------------------------------------------------------- export
def run_export(ctx: Context, exporter: str) -> None:
    from synermix import onnx_export as ox
    from synermix.training import load_trained_model

    if ctx.model_dir is None:
        ctx.model_dir = untrained_model_dir(ctx)
    model, meta = load_trained_model(ctx.model_dir)
    pre = meta["preprocessing"]
    path = ctx.tmp / "onnx" / "model.onnx"
    metadata = ox.model_metadata(meta, exporter, 18)
    start = time.perf_counter()
    ox.export_onnx(model, pre["channels"], pre["image_size"], path, exporter, 18, metadata)
    ctx.onnx_path = path
    case = exporter if exporter == "dynamo" else f"{exporter} (fallback)"
    ctx.report.add("export", case, "export s (opset 18)", time.perf_counter() - start, ".1f")
    ctx.report.add("export", case, "model.onnx MB", path.stat().st_size / 1e6, ".1f")


def run_fp16(ctx: Context) -> None:
    from synermix import onnx_export as ox

    if ctx.onnx_path is None:
        raise Skip("no FP32 ONNX file (the export failed)")
    path = ctx.onnx_path.with_name("model.fp16.onnx")
    start = time.perf_counter()
    ox.convert_fp16(ctx.onnx_path, path)
    ctx.fp16_path = path
    ctx.report.add("export", "fp16", "convert_fp16 s", time.perf_counter() - start, ".1f")
    ctx.report.add("export", "fp16", "model.fp16.onnx MB", path.stat().st_size / 1e6, ".1f")


# --------------------------------------------------------------------------- parity
def parity_reference(ctx: Context) -> None:
    """Production inputs of real val/test images from file bytes, and PyTorch CPU fp32 logits."""
    import numpy as np
    import torch

    from synermix.data.transforms import Preprocessing, load_resized, normalize
    from synermix.inference import Classifier
    from synermix.training import load_trained_model

    if ctx.onnx_path is None or ctx.manifest is None:
        raise Skip("no ONNX file or no data")
    rows = ctx.manifest[ctx.manifest["split"].isin(["val", "test"])]
    if rows.empty:
        rows = ctx.manifest
    rows = rows.sort_values("path").head(ctx.args.parity_images)
    files = [ctx.root / p for p in rows["path"]]
    model, meta = load_trained_model(ctx.model_dir)
    names = list(meta["class_names"])
    cpu = Classifier(ctx.onnx_path, provider="cpu")
    inputs = np.stack([cpu.preprocess(f.read_bytes()) for f in files])
    labels = np.asarray([names.index(c) if c in names else -1 for c in rows["label"]])
    with torch.no_grad():
        ref = np.concatenate(
            [model(torch.from_numpy(inputs[i : i + 64])).double().numpy() for i in range(0, len(inputs), 64)]
        )
    pre = Preprocessing.from_dict(meta["preprocessing"])
    view = [normalize(load_resized(f, pre.image_size, pre.channels), pre) for f in files]
    ctx.parity = {
        "files": files,
        "inputs": inputs,
        "labels": labels,
        "ref": ref,
        "model": model,
        "cpu": cpu,
        "view": view,
    }
    accuracy = float((ref.argmax(1) == labels).mean())
    case = REFERENCE_CASE
    ctx.report.add("parity", case, "images (val + test, from file bytes)", len(files))
    ctx.report.add("parity", case, "accuracy", accuracy, ".4f")
    ctx.report.add("parity", case, "max abs logit (scale of the diffs)", float(abs(ref).max()), ".3g")


def softmax(z):
    import numpy as np

    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def compare(ctx: Context, case: str, run, kind: str, pad: bool = False, sync=None) -> float:
    """``run(batch) -> logits`` against the reference; kind: strict | tf32 | reduced.
    Returns the max abs logit difference."""
    import numpy as np

    p, report = ctx.parity, ctx.report
    inputs, ref, labels = p["inputs"], p["ref"], p["labels"]
    size = 64
    outs = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start : start + size]
        n = len(chunk)
        if pad and n < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
        outs.append(np.asarray(run(chunk), dtype=np.float64)[:n])
    got = np.concatenate(outs)
    first = inputs[:size]
    if len(first) < size:
        first = np.resize(first, (size, *inputs.shape[1:])).astype(np.float32)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        run(first)
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    logit = np.abs(got - ref)
    prob = np.abs(softmax(got) - softmax(ref))
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    acc, ref_acc = float((got.argmax(1) == labels).mean()), float((ref.argmax(1) == labels).mean())
    if kind == "strict":
        ok = logit.max() <= PARITY_TOL and agree == 1.0
        verdict = "PASS" if ok else f"FAIL: over {PARITY_TOL:g} or top-1 differs (export gate)"
    elif kind == "tf32":
        ok = logit.max() <= TF32_TOL and agree >= MIN_AGREEMENT
        verdict = ("PASS" if ok else "FAIL") + f" (TF32 on: informational {TF32_TOL:g})"
    else:
        ok = agree >= MIN_AGREEMENT and ref_acc - acc <= MAX_ACCURACY_DROP
        verdict = (
            "PASS" if ok else f"FAIL: agreement < {MIN_AGREEMENT} or accuracy drop > {MAX_ACCURACY_DROP}"
        )
    report.add(
        "parity", case, "max / mean abs logit diff", f"{logit.max():.3g} / {logit.mean():.3g}", check=verdict
    )
    report.add("parity", case, "max abs probability diff", float(prob.max()), ".3g")
    report.add("parity", case, "argmax agreement", agree, ".4f")
    report.add("parity", case, "accuracy (reference)", f"{acc:.4f} ({ref_acc:.4f})")
    report.add("parity", case, "ms per batch of 64 (median of 3)", statistics.median(times[1:]) * 1e3, ".2f")
    return float(logit.max())


def ort_case(ctx: Context, case: str, path_attr: str, provider: str, kind: str) -> None:
    import onnxruntime as ort

    from synermix import onnx_export as ox
    from synermix.inference import Classifier

    if not ctx.parity:
        raise Skip("no parity inputs (the reference part failed)")
    path = getattr(ctx, path_attr)
    if path is None:
        raise Skip(f"no {path_attr.replace('_path', '')} ONNX file (its export failed)")
    wanted = {
        "cpu": "CPUExecutionProvider",
        "cuda": "CUDAExecutionProvider",
        "tensorrt": "TensorrtExecutionProvider",
    }
    available = ort.get_available_providers()
    note = (
        f"onnxruntime {ort.__version__} offers {', '.join(available)}; the {wanted[provider]} needs "
        "onnxruntime-gpu" + (" built with TensorRT and libnvinfer" if provider == "tensorrt" else "")
    )
    if wanted[provider] not in available:
        raise Skip(note)
    if provider == "cuda" and ctx.device.type != "cuda":
        raise Skip(f"no GPU visible ({wanted[provider]} is offered but cannot run)")
    if provider == "tensorrt" and ctx.device.type != "cuda":
        raise Skip(f"no GPU visible ({wanted[provider]} is offered but cannot run)")
    clf = (
        ctx.parity["cpu"]
        if provider == "cpu" and path_attr == "onnx_path"
        else Classifier(path, provider=provider)
    )
    if clf.provider != wanted[provider]:
        raise Skip(f"asked for {wanted[provider]}, the session runs on {clf.provider} (libraries missing?)")
    if path_attr == "onnx_path":  # the export stage's own check and gate
        parity = ox.check_parity(ctx.parity["model"], clf, ctx.parity["files"], ctx.parity["view"])
        ctx.report.add(
            "parity",
            case,
            "check_parity: max abs logit diff, top-1",
            f"{parity.max_abs_diff:.3g}, {parity.top1_agreement:.4f}",
            check="PASS" if parity.passed(PARITY_TOL) else f"FAIL: export gate {PARITY_TOL:g} not met",
        )
        ctx.report.add(
            "parity", case, "production vs training input", parity.preprocessing_max_abs_diff, ".3g"
        )
    diff = compare(ctx, case, clf.logits, kind, pad=provider == "tensorrt")
    if provider == "cuda" and kind == "strict":
        ctx.parity["cuda_fp32_diff"] = diff


def ort_cuda_no_tf32(ctx: Context) -> None:
    """Diagnostic: the CUDA EP with use_tf32=0, run only when the CUDA fp32 row missed 1e-4."""
    import onnxruntime as ort

    diff = ctx.parity.get("cuda_fp32_diff") if ctx.parity else None
    if diff is None or diff <= PARITY_TOL:
        raise Skip("only when the CUDA EP fp32 row misses the 1e-4 gate")
    session = ort.InferenceSession(
        str(ctx.onnx_path), providers=[("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise Skip(f"the session runs on {session.get_providers()[0]}")
    name = session.get_inputs()[0].name
    compare(ctx, "onnxruntime CUDA EP fp32, use_tf32=0", lambda b: session.run(None, {name: b})[0], "strict")


def torch_cuda_case(ctx: Context, case: str, mode: str) -> None:
    import torch

    from synermix.engine import DeviceSetup, select_device
    from synermix.training import load_trained_model

    if not ctx.parity:
        raise Skip("no parity inputs (the reference part failed)")
    cuda = ctx.device.type == "cuda"
    model, _ = load_trained_model(ctx.model_dir)
    model = model.to(ctx.device).eval()
    kind = "strict"
    if mode == "val":  # what train_model's per-epoch evaluate() runs under
        setup = select_device("cuda" if cuda else "cpu")
        kind = "reduced" if setup.amp_dtype is not None else "tf32"
    elif mode == "fp16":
        setup, kind = DeviceSetup(ctx.device, torch.float16, True), "reduced"
    else:
        setup = DeviceSetup(ctx.device, None, False)
        kind = "tf32" if mode == "fp32-tf32" else "strict"
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if mode == "fp32-notf32":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    @torch.no_grad()
    def run(batch):
        with setup.autocast():
            logits = model(setup.to_device(torch.from_numpy(batch)))
        return logits.float().cpu().numpy()

    try:
        compare(ctx, case, run, kind, sync=torch.cuda.synchronize if cuda else None)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- ELPV subset for carrying
def export_data(folder: Path, per_class: int, seed: int) -> None:
    from synermix.data.prepare import cap_per_class
    from synermix.data.sources import list_elpv

    if folder.exists():
        if not (folder / DATA_MARKER).is_file():
            raise SystemExit(
                f"error: {folder} exists and was not written by gpu_check; choose another folder"
            )
        shutil.rmtree(folder)
    items = cap_per_class(list_elpv().items, per_class, seed)
    total = 0
    for item in items:
        target = folder / item.label / Path(item.source_path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = item.read()
        target.write_bytes(data)
        total += len(data)
    (folder / DATA_MARKER).write_text(
        "ELPV subset written by bench/gpu_check.py --export-data; safe to delete\n"
    )
    counts: dict[str, int] = {}
    for item in items:
        counts[item.label] = counts.get(item.label, 0) + 1
    print(f"wrote {len(items)} ELPV images ({total / 1e6:.1f} MB) to {folder}: {counts}")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny run on CPU to test this script")
    parser.add_argument(
        "--data", help="a <class>/<image> folder (default: elpv-dataset, else .gpucheck/elpv)"
    )
    parser.add_argument("--manifest", help="a prepared manifest.csv (images beside it)")
    parser.add_argument("--synthetic", action="store_true", help="force the synthetic dataset")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--batches", type=int, help="fixed batches per timed epoch")
    parser.add_argument("--rounds", type=int, help="timed rounds (mixup and synermix alternate)")
    parser.add_argument("--warmup", type=int, help="warm-up epochs over the fixed batches per method")
    parser.add_argument("--epochs", type=int, help="train_model epochs")
    parser.add_argument("--workers", type=int, help="DataLoader workers")
    parser.add_argument("--parity-images", type=int)
    parser.add_argument("--max-per-class", type=int)
    parser.add_argument("--budget", type=float, help="seconds for all parts together")
    parser.add_argument("--lr", type=float, help="SGD learning rate (train step and train_model)")
    parser.add_argument("--variants", help="comma list, e.g. fp32,bf16-cl,bf16-cl-compile")
    parser.add_argument("--train-compile", action="store_true", help="train_model with train.compile")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", help="report .md path (JSON beside it)")
    parser.add_argument(
        "--export-data", metavar="DIR", help="write an ELPV subset folder to carry, then stop"
    )
    parser.add_argument("--verbose", action="store_true", help="the project's INFO logs")
    args = parser.parse_args(argv)
    for name, (gpu, smoke) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.cpu_smoke else gpu)
    if args.export_data and args.max_per_class == DEFAULTS["max_per_class"][1]:
        args.max_per_class = DEFAULTS["max_per_class"][0]
    return args


def out_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.out:
        md = Path(args.out)
    else:
        name = "gpu_check_cpu_smoke.md" if args.cpu_smoke else "gpu_check.md"
        md = Path(os.environ["OUT"]) / name if os.environ.get("OUT") else ROOT / "reports" / "bench" / name
    return md, md.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_packages()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.export_data:
        export_data(Path(args.export_data), args.max_per_class, args.seed)
        return 0

    variants = [Variant.parse(n) for n in (args.variants.split(",") if args.variants else DEFAULT_VARIANTS)]
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "error: no CUDA device visible to torch; use --cpu-smoke to test this script on CPU",
            file=sys.stderr,
        )
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(1)
        report_note = (
            "CPU smoke: every part ran on CPU at toy size to test this script (the CUDA variants as "
            "code paths only, with CPU autocast); no figure here says anything about a GPU"
        )
    md, js = out_paths(args)
    report = Report(md, js, args.budget, args.cpu_smoke)
    try:
        machine_details(report, args.cpu_smoke)
    except Exception as exc:
        report.note(f"machine details incomplete: {one_line(exc)}")
    if args.cpu_smoke:
        report.note(report_note)
    report.meta["workload"] = (
        f"{args.arch}, {args.image_size} px, batch {args.batch}, SGD lr {args.lr:g}; "
        f"train step: {args.batches} fixed batches x "
        f"{args.rounds} rounds per method after {args.warmup} warm-up epoch(s); "
        f"train_model {args.epochs} epochs, "
        f"{args.workers} workers; budget {args.budget:.0f} s"
    )
    print(f"synermix GPU check -> {md}")
    for key, value in report.meta.items():
        print(f"  {key}: {value}")

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = Context(args, report, Path(tmp), device=torch.device("cpu" if args.cpu_smoke else "cuda"))
        report.attempt("data", "prepare_dataset", 120, lambda: load_data(ctx))
        report.attempt("loader", LOADER_CASE, 120, lambda: build_loader(ctx))
        eager = [v for v in variants if not v.compile]
        compiled = [v for v in variants if v.compile]
        for v in eager:
            report.attempt("train step", v.name, 60, lambda v=v: train_variant(ctx, v))
        report.attempt("train step", "host syncs", 30, lambda: count_host_syncs(ctx))
        report.attempt(
            "train_model", "train_model", 150 if args.train_compile else 90, lambda: run_train_model(ctx)
        )
        report.attempt("export", "dynamo", 120, lambda: run_export(ctx, "dynamo"))
        if ctx.onnx_path is None:
            report.attempt("export", "torchscript (fallback)", 90, lambda: run_export(ctx, "torchscript"))
        report.attempt("export", "fp16", 60, lambda: run_fp16(ctx))
        report.attempt("parity", REFERENCE_CASE, 60, lambda: parity_reference(ctx))
        ort_cases = (
            ("onnxruntime CPU EP fp32", "onnx_path", "cpu", "strict"),
            ("onnxruntime CUDA EP fp32", "onnx_path", "cuda", "strict"),
            ("onnxruntime CUDA EP fp32, use_tf32=0", None, "cuda", "strict"),
            ("onnxruntime CUDA EP fp16", "fp16_path", "cuda", "reduced"),
            ("onnxruntime CPU EP fp16", "fp16_path", "cpu", "reduced"),
        )
        for case, attr, provider, kind in ort_cases:
            if attr is None:
                report.attempt("parity", case, 90, lambda: ort_cuda_no_tf32(ctx))
            else:
                fn = lambda c=case, at=attr, pr=provider, k=kind: ort_case(ctx, c, at, pr, k)  # noqa: E731
                report.attempt("parity", case, 90, fn)
        torch_cases = (
            ("PyTorch CUDA fp32, TF32 off", "fp32-notf32"),
            (EVAL_CASE, "fp32-tf32"),
            (VAL_CASE, "val"),
            ("PyTorch CUDA fp16 autocast + CL", "fp16"),
        )
        for case, mode in torch_cases:
            label = case.replace("CUDA", "on CPU (smoke)") if args.cpu_smoke else case
            report.attempt("parity", label, 90, lambda c=label, m=mode: torch_cuda_case(ctx, c, m))
        for v in compiled:  # last but one: the slowest parts
            wait = 0.0 if args.cpu_smoke else 45.0
            report.attempt("train step", v.name, 180, lambda v=v: train_variant(ctx, v), min_seconds=wait)
        compare_variants(ctx)
        report.attempt(
            "parity",
            "onnxruntime TensorRT EP fp32",
            180,
            lambda: ort_case(ctx, "onnxruntime TensorRT EP fp32", "onnx_path", "tensorrt", "tf32"),
            min_seconds=30,
        )
    report.write()
    print()
    print(report.table())
    print()
    counts = report.counts()
    print(
        f"{counts['checks_passed']} checks passed, {counts['checks_failed']} failed; "
        f"parts {counts['parts_ok']} OK, "
        f"{counts['parts_failed']} FAILED, {counts['parts_skipped']} SKIPPED; {report.elapsed:.0f} s; "
        f"report {md} (+ {js.name})"
    )
    if args.cpu_smoke:  # tiny runs test the script; their figures cannot meet the targets
        return 1 if counts["parts_failed"] else 0
    return 1 if counts["checks_failed"] or counts["parts_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
