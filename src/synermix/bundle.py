"""The deploy bundle: one folder a factory line can run without MLflow, DVC or the training code.

A registered model lives in MLflow, which a line machine usually cannot reach. A bundle is
the same model as plain files, checkable with coreutils and runnable with
:mod:`synermix.inference` (numpy, Pillow, onnxruntime)::

    <bundle>/
      model.onnx           the FP32 model; its metadata holds class names and preprocessing
      model.fp16.onnx      optional GPU variant (same metadata)
      model.int8.onnx      optional CPU variant (same metadata)
      labels.txt           one class name per line, in label-index order
      preprocessing.json   image file -> model input: sizes, channels, mean/std, resizes
      MODEL_CARD.md        what the model is for, its evidence and lineage, how to run it
      bundle.json          machine-readable: format version, registry info, classes, files
      SHA256SUMS           ``sha256sum`` format over every other file

``labels.txt`` and ``preprocessing.json`` repeat what ``model.onnx`` says about itself, for
tools that do not read ONNX metadata; :func:`verify_bundle` checks that they still agree.
``cd <bundle> && sha256sum -c SHA256SUMS`` checks a copy on any machine; :func:`verify_bundle`
does the same and also refuses files nobody listed (a bundle is a closed set).

A bundle is written into a temporary sibling folder and renamed into place at the end, so a
half-written bundle is never visible under its final name and existing files are never
overwritten.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from synermix import evidence, model_tags, registry
from synermix.config import Params
from synermix.errors import UserError
from synermix.inference import DEFAULT_MAX_PIXELS, ModelInfo
from synermix.tracking import client_for, redact_uri

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
#: ONNX files a bundle may hold; MODEL_FILE is required, the variants are optional
MODEL_FILES = (MODEL_FILE, "model.fp16.onnx", "model.int8.onnx")
LABELS_FILE = "labels.txt"
PREPROCESSING_FILE = "preprocessing.json"
CARD_FILE = "MODEL_CARD.md"
MANIFEST_FILE = "bundle.json"
SUMS_FILE = "SHA256SUMS"
#: files every bundle has besides SUMS_FILE (variants are optional)
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, PREPROCESSING_FILE, CARD_FILE, MANIFEST_FILE)

_FIX = "re-create it with `synermix bundle`"
#: one ``sha256sum`` line: digest, a space, ' ' (text) or '*' (binary) mode, the file name
_SUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_MAX_LISTED_PROBLEMS = 5
#: ``info`` keys the model card has a place for; others are listed under "Other"
_KNOWN_INFO_KEYS = frozenset(
    (
        *("model_name", "version", "alias", "aliases", "created_at", "tracking_uri", "description"),
        *("metrics", "gates", "gates_passed", "pilot", "data", "training", "onnx", "lineage"),
        "alias_history",
    )
)


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle as the manifest and the model card describe it."""

    name: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> BundleFile:
        return cls(path.name, path.stat().st_size, sha256_file(path))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed (models can be hundreds of MB)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_bundle(path: Path) -> bool:
    """Whether ``path`` looks like a bundle folder (not whether it is intact: see verify_bundle)."""
    path = Path(path)
    return path.is_dir() and (path / SUMS_FILE).is_file() and (path / MODEL_FILE).is_file()


# --- reading a model's own description -------------------------------------------------------


@dataclass(frozen=True)
class _OnnxModel:
    info: ModelInfo
    input_name: str
    output_name: str


def _read_onnx(path: Path) -> _OnnxModel:
    """What an ONNX file says about itself, read with onnxruntime as a line machine would.

    onnxruntime rather than ``onnx``: the bundle's promise is that the line needs only the
    inference dependencies, and loading the file this way also proves it is a model
    onnxruntime accepts. Graph optimisation is off because only the metadata is wanted.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) subclass Exception only
        raise UserError(f"{path}: not an ONNX model onnxruntime can load ({exc}); export it again") from exc
    try:
        info = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unusable model metadata ({exc})") from exc
    return _OnnxModel(info, session.get_inputs()[0].name, session.get_outputs()[0].name)


def _preprocessing_spec(model: _OnnxModel) -> dict[str, Any]:
    """``preprocessing.json``: everything needed to turn an image file into the model input.

    The numbers come from the model's metadata (ModelInfo); ``steps`` spells out the order
    :class:`synermix.inference.Preprocessor` applies them in, for a line that reimplements it.
    """
    info = model.info
    size, channels = info.image_size, info.channels
    steps = [
        "decode the file; refuse images with more than max_pixels pixels (decompression-bomb guard)",
        "apply the EXIF orientation",
        "canonical mode: 8-bit grey (L) for grey-level sources (16-bit scaled by 1/257), RGB otherwise",
    ]
    if info.prepare_image_size:
        steps.append(
            f"resize the shorter side to prepare_image_size={info.prepare_image_size} (bilinear, "
            "keep aspect ratio), as the prepare stage did to the training images"
        )
    steps += [
        f"convert to the model's {channels} channel(s): "
        + (
            "grey (L; RGB becomes L = 0.299 R + 0.587 G + 0.114 B)"
            if channels == 1
            else "RGB (grey repeated)"
        ),
        f"resize policy {info.resize}: shorter side to image_size={size} (bilinear), centre crop "
        f"{size} x {size}",
        "x = (pixel / 255 - mean[c]) / std[c] per channel c, float32",
        f"layout N x C x H x W = N x {channels} x {size} x {size}, input '{model.input_name}'",
        f"output '{model.output_name}': N x {len(info.class_names)} logits; softmax gives the "
        "probabilities of the classes in labels.txt order",
    ]
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "input_name": model.input_name,
        "output_name": model.output_name,
        "dtype": "float32",
        "layout": "NCHW",
        **info.preprocessing.to_dict(),  # image_size, channels, mean, std, resize
        "prepare_image_size": info.prepare_image_size,
        "max_pixels": DEFAULT_MAX_PIXELS,
        "steps": steps,
    }


# --- writing ---------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    """Refuse any ``out`` that holds something: a bundle never overwrites or deletes user data."""
    if out.is_symlink() or (os.path.lexists(out) and not out.is_dir()):
        raise UserError(f"{out} exists and is not a folder: give a new or empty folder for the bundle")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"{out} already exists and is not empty: give a new or empty folder for the bundle "
            "(it never overwrites files)"
        )


def _check_sources(onnx_files: Mapping[str, Path]) -> dict[str, Path]:
    unknown = sorted(set(onnx_files) - set(MODEL_FILES))
    if MODEL_FILE not in onnx_files or unknown:
        raise ValueError(f"onnx_files needs {MODEL_FILE!r} and only names from {MODEL_FILES}, got {unknown}")
    sources = {name: Path(onnx_files[name]) for name in MODEL_FILES if name in onnx_files}
    for name, src in sources.items():
        if not src.is_file():
            raise UserError(f"{src}: no such file (for {name} of the bundle); run the export stage first")
    return sources


def _check_variant(name: str, variant: ModelInfo, main: ModelInfo) -> None:
    """A variant must come from the same trained weights as model.onnx, not another run."""
    same_weights = variant.extra.get("weights_sha256") == main.extra.get("weights_sha256")
    if variant.class_names != main.class_names or not same_weights:
        raise UserError(
            f"{name} was exported from other weights or classes than {MODEL_FILE}: "
            "bundle the files of one export stage run"
        )


def _jsonable(value: Any) -> Any:
    """Strict JSON for any consumer: NaN/inf become null, unknown objects their str()."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _write_sums(folder: Path) -> None:
    """``SHA256SUMS`` exactly as ``sha256sum`` writes it: ``<hex>  <name>``, sorted by name."""
    names = sorted(p.name for p in folder.iterdir() if p.name != SUMS_FILE)
    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in names)
    (folder / SUMS_FILE).write_text(lines, encoding="utf-8")


def _fill(tmp: Path, sources: Mapping[str, Path], info: Mapping[str, Any]) -> ModelInfo:
    """Write every bundle file into ``tmp``; the model described is the copy that ships."""
    for name, src in sources.items():
        shutil.copyfile(src, tmp / name)
    model = _read_onnx(tmp / MODEL_FILE)
    for name in sources:
        if name != MODEL_FILE:
            _check_variant(name, _read_onnx(tmp / name).info, model.info)
    names = model.info.class_names
    if any(not n or "\n" in n or "\r" in n for n in names):
        raise UserError(f"{sources[MODEL_FILE]}: a class name is empty or spans lines: {names!r}")
    (tmp / LABELS_FILE).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    preprocessing = _preprocessing_spec(model)
    (tmp / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=2) + "\n", encoding="utf-8")

    described = [BundleFile.of(tmp / n) for n in (*sources, LABELS_FILE, PREPROCESSING_FILE)]
    card = render_model_card(
        info, names, described, preprocessing=preprocessing, decision=decision_spec(model.info)
    )
    (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "info": _jsonable(info),
        "class_names": names,
        "model": _jsonable(model.info.extra),
        "files": [asdict(f) for f in (*described, BundleFile.of(tmp / CARD_FILE))],
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _write_sums(tmp)
    return model.info


def _remove_litter(parent: Path, name: str) -> None:
    """Remove the hidden build folders of bundles for ``name`` whose writer died (kill -9,
    power loss): ``.<name>.<pid>.<random>.partial`` with no such process alive."""
    for tmp in parent.glob(f".{glob.escape(name)}.*.partial"):
        pid = tmp.name[len(name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or not tmp.is_dir() or tmp.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: another bundle is being written there now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        log.info("removing %s: a bundle left half-built by a writer that died", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def write_bundle(onnx_files: Mapping[str, Path], out: Path, info: Mapping[str, Any]) -> Path:
    """Write a deploy bundle of ``onnx_files`` (bundle name -> source file) to ``out``.

    ``onnx_files`` must hold ``model.onnx`` and may hold ``model.fp16.onnx`` and
    ``model.int8.onnx``; they are copied, never moved. ``info`` is the registry's description
    of the model version (free form, see :func:`render_model_card`), stored as given in
    ``bundle.json``. ``out`` must not exist or be an empty folder. Everything is built in a
    hidden sibling folder (same file system, so the final rename is atomic); on any failure
    it is removed and ``out`` is left as it was.
    """
    out = Path(out)
    _check_out(out)
    sources = _check_sources(onnx_files)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_litter(parent, out.name)
    # the pid in the name tells a later run whether the writer is still alive
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=parent))
    try:
        model_info = _fill(tmp, sources, info)
        # mkdtemp makes the folder private (0700); a bundle gets the usual umask permissions
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        try:
            # rename(2) replaces an empty folder and refuses a non-empty one, even one that
            # filled up since _check_out: the OS keeps the never-overwrite promise
            os.replace(tmp, out)
        except OSError as exc:
            raise UserError(
                f"{out}: cannot move the bundle into place ({exc.strerror or exc}); "
                "give a new or empty folder"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "bundle %s: %s, %d classes, %d files",
        out,
        ", ".join(sources),
        len(model_info.class_names),
        len(list(out.iterdir())),
    )
    return out


# --- verifying -------------------------------------------------------------------------------


def _read_sums(folder: Path) -> tuple[dict[str, str], list[str]]:
    """Listed ``name -> digest`` and the problems with the SHA256SUMS lines themselves."""
    listed: dict[str, str] = {}
    problems: list[str] = []
    text = (folder / SUMS_FILE).read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        match = _SUM_LINE.fullmatch(line)
        name = match.group(2) if match else ""
        # names are flat file names: anything else was not written by write_bundle
        if not match or "/" in name or "\\" in name or name in (".", "..", SUMS_FILE) or name in listed:
            problems.append(f"{SUMS_FILE} line {number} (malformed)")
            continue
        listed[name] = match.group(1).lower()
    return listed, problems


def _check_files(folder: Path) -> list[str]:
    """Every problem with the file set and its checksums, one ``name (why)`` each."""
    if not (folder / SUMS_FILE).is_file():
        return [f"{SUMS_FILE} (missing)"]
    listed, problems = _read_sums(folder)
    present = {p.name for p in folder.iterdir() if p.name != SUMS_FILE}
    for name in sorted(set(listed) | present | set(REQUIRED_FILES)):
        path = folder / name
        if name not in listed and name not in present:
            problems.append(f"{name} (missing)")
        elif name not in listed:
            problems.append(f"{name} (not listed in {SUMS_FILE})")
        elif not path.is_file():
            problems.append(f"{name} (missing)")
        elif sha256_file(path) != listed[name]:
            problems.append(f"{name} (checksum mismatch)")
    return problems


def verify_bundle(folder: Path) -> Path:
    """Check a bundle before running it; return its ``model.onnx``.

    A line must not run a model that was damaged in a copy or edited by hand: every file
    listed in SHA256SUMS must exist with that checksum, nothing unlisted may sit beside them,
    and labels.txt must agree with the class names inside model.onnx. Raises
    :class:`UserError` naming the first bad files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such bundle folder; create one with `synermix bundle`")
    problems = _check_files(folder)
    if problems:
        shown = ", ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        if more > 0:
            shown += f" and {more} more"
        raise UserError(f"{folder}: the bundle is not intact: {shown}; {_FIX}")
    model = folder / MODEL_FILE
    class_names = _read_onnx(model).info.class_names
    labels = (folder / LABELS_FILE).read_text(encoding="utf-8").splitlines()
    if labels != class_names:
        raise UserError(
            f"{folder / LABELS_FILE} lists {labels} but {MODEL_FILE} was trained on {class_names}; {_FIX}"
        )
    log.info(
        "bundle %s verified: %d files intact, %d classes", folder, len(list(folder.iterdir())), len(labels)
    )
    return model


# --- the model card --------------------------------------------------------------------------


def _value(value: Any, decimals: int | None = None) -> str:
    """One-line text for any value; floats with ``decimals`` places, else 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            return str(number)
        return f"{number:.{decimals}f}" if decimals is not None else f"{number:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_value(v, decimals)}" for k, v in value.items() if v is not None)
    if isinstance(value, list | tuple):
        return ", ".join(_value(v, decimals) for v in value)
    return " ".join(str(value).split())


def _cell(value: Any, decimals: int | None = None) -> str:
    return _value(value, decimals).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _bullets(mapping: Mapping[str, Any], decimals: int | None = None, indent: str = "") -> list[str]:
    """Key-value bullets; nested mappings become nested bullets, empty values are skipped."""
    lines: list[str] = []
    for key, value in mapping.items():
        if value is None or (isinstance(value, str | Mapping | list | tuple) and not value):
            continue
        if isinstance(value, Mapping):
            lines.append(f"{indent}- {_value(key)}:")
            lines += _bullets(value, decimals, indent + "  ")
        else:
            lines.append(f"{indent}- {_value(key)}: {_value(value, decimals)}")
    return lines


def _records_table(records: Sequence[Mapping[str, Any]], preferred: Sequence[str], decimals: int | None):
    """A table over dicts: the ``preferred`` columns that occur, then any others seen."""
    seen = [k for r in records for k in r]
    columns = [c for c in preferred if c in seen]
    columns += [c for c in dict.fromkeys(seen) if c not in columns]
    rows = [[_cell(r.get(c), decimals) for c in columns] for r in records]
    return _table([_value(c) for c in columns], rows)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) and value else None


def _section(title: str, body: list[str]) -> list[str]:
    return [f"## {title}", "", *body, ""] if body else []


def _header(info: Mapping[str, Any]) -> list[str]:
    name, version = _value(info.get("model_name")), _value(info.get("version"))
    title = f"{name or 'Model'} version {version}" if version else (name or "Model card")
    raw = info.get("aliases")
    aliases = [info.get("alias"), *(raw if isinstance(raw, list | tuple) else [raw])]
    names = dict.fromkeys(_value(a) for a in aliases if _value(a))  # ordered, without repeats
    facts = {
        "Registered model": f"models:/{name}/{version}" if name and version else None,
        "Aliases": ", ".join(f"@{a}" for a in names) or None,
        "Created": info.get("created_at"),
        "Tracking server": info.get("tracking_uri"),
    }
    lines = [f"# {title}", "", *_bullets(facts)]
    if info.get("description"):
        lines += ["", _value(info["description"])]
    return [*lines, ""]


def decision_spec(model: ModelInfo) -> dict[str, Any] | None:
    """The decision rule stored in the ONNX model (what predict and serve apply), for the card."""
    point = model.operating_point
    if point is None and model.unknown_above is None:
        return None
    out: dict[str, Any] = {"unknown_above": model.unknown_above}
    if point is not None:
        out |= {
            "defect_classes": list(point.defect_classes),
            "accept_below": point.accept_below,
            "reject_from": point.reject_from,
            "fit": dict(point.fit),
        }
    return out


def _decision_section(decision: Mapping[str, Any] | None) -> list[str]:
    if not decision:
        return _section(
            "Decisions on the line",
            ["The model carries no operating point: it answers classes and probabilities only."],
        )
    body: list[str] = []
    if decision.get("defect_classes"):
        fit = _mapping(decision.get("fit")) or {}
        body += [
            f"Defect classes: {', '.join(decision['defect_classes'])}; P(defect) is their summed calibrated "
            "probability. Every prediction carries one decision:",
            "",
            f"- `accept` (a good part): P(defect) below {decision['accept_below']:.4f}",
            f"- `review` (a person looks): P(defect) from {decision['accept_below']:.4f} up to "
            f"{decision['reject_from']:.4f}",
            f"- `reject` (a defective part): P(defect) from {decision['reject_from']:.4f}",
        ]
        if fit.get("fixed"):
            body += ["", f"Thresholds fixed by `{fit['fixed']}`."]
        elif fit:
            limits = _mapping(fit.get("limits")) or {}
            shown = ", ".join(f"{k} {v}" for k, v in limits.items() if v is not None and k != "review")
            body += [
                "",
                f"Fitted on {fit.get('images')} {fit.get('fitted_on', 'val')} images"
                + (f" to meet {shown}" if shown else "")
                + f" at the lowest mean cost: escape {_cell(fit.get('escape_rate'), 4)}, overkill "
                f"{_cell(fit.get('overkill_rate'), 4)}, review {_cell(fit.get('review_rate'), 4)} there. "
                "The test-split rates with their intervals are under Metrics and in the evaluation report.",
            ]
    if decision.get("unknown_above") is not None:
        body += [
            "",
            f"- `unknown` (not a part this model knows; before any other decision): the distance of the "
            f"image's features to the nearest class is above {decision['unknown_above']:.4g}",
        ]
    return _section("Decisions on the line", body)


def _intended_use(class_names: Sequence[str]) -> list[str]:
    classes = ", ".join(class_names) or "the classes below"
    text = (
        f"A visual inspection classifier: each image gets one of {len(class_names)} classes "
        f"({classes}), a calibrated probability for every class and, where the model carries an "
        "operating point, a decision (accept, review, reject, unknown; see Decisions on the line). "
        "It supports inspection and does not replace it: parts decided `review` or `unknown` go "
        "to a person. It was "
        "evaluated only on images like its training data (camera, lighting, product); read "
        "Data, Metrics and Pilot evidence before using it on anything else."
    )
    return _section("Intended use", [text])


def _gates(info: Mapping[str, Any]) -> list[str]:
    body: list[str] = []
    passed = info.get("gates_passed")
    if isinstance(passed, bool):
        body += ["All gates passed." if passed else "**Gates failed.**", ""]
    elif passed is not None and passed != "":
        body += [f"Gates: {_value(passed)}", ""]
    gates = _mapping(info.get("gates"))
    if gates:
        records = [
            {"gate": name, **(dict(g) if isinstance(g, Mapping) else {"status": g})}
            for name, g in gates.items()
        ]
        body += _records_table(records, ("gate", "status", "threshold", "observed", "margin"), 4)
    return _section("Gates", body)


def render_model_card(
    info: Mapping[str, Any],
    class_names: Sequence[str],
    files: Sequence[BundleFile],
    preprocessing: Mapping[str, Any] | None = None,
    decision: Mapping[str, Any] | None = None,
) -> str:
    """``MODEL_CARD.md``: plain markdown, the same text for the same inputs (no clock inside).

    ``info`` is free form: every key is optional, values may be missing or None, and a
    section whose data is absent is left out. Known keys: model_name, version, alias,
    aliases, created_at, tracking_uri, description, metrics, gates, gates_passed, pilot,
    data, training, onnx, lineage, alias_history; any other key lands under "Other".
    """
    info = info or {}
    lines = _header(info)
    lines += _intended_use(class_names)
    lines += _decision_section(decision)
    lines += _section(
        "Classes", _table(["index", "class"], [[str(i), _cell(c)] for i, c in enumerate(class_names)])
    )
    file_rows = [[f"`{f.name}`", _size(f.bytes), f"`{f.sha256[:12]}`"] for f in files]
    lines += _section(
        "Files",
        [*_table(["file", "size", "sha256 (first 12)"], file_rows), "", f"Full checksums: `{SUMS_FILE}`."],
    )
    if preprocessing:
        steps = preprocessing.get("steps")
        facts = {k: v for k, v in preprocessing.items() if k != "steps"}
        body = _bullets(facts)
        if isinstance(steps, list | tuple) and steps:
            body += ["", "From image file to model input:", ""]
            body += [f"{i}. {_value(s)}" for i, s in enumerate(steps, start=1)]
        lines += _section("Preprocessing", body)
    for key, title in (("data", "Data"), ("training", "Training")):
        if _mapping(info.get(key)):
            lines += _section(title, _bullets(info[key]))
    metrics = _mapping(info.get("metrics"))
    if metrics:
        rows = [[_cell(k), _cell(v, 4)] for k, v in metrics.items() if v is not None]
        lines += _section("Metrics", _table(["metric", "value"], rows))
    lines += _gates(info)
    if _mapping(info.get("pilot")):
        lines += _section("Pilot evidence", _bullets(info["pilot"], decimals=4))
    if _mapping(info.get("onnx")):
        lines += _section("ONNX export", _bullets(info["onnx"]))
    if _mapping(info.get("lineage")):
        lines += _section("Lineage", _bullets(info["lineage"]))
    history = info.get("alias_history")
    if isinstance(history, list | tuple):
        records = [h for h in history if isinstance(h, Mapping)]
        if records:
            preferred = ("at", "action", "alias", "version", "previous", "by", "reason")
            lines += _section("Alias history", _records_table(records, preferred, None))
    lines += _section("Other", _bullets({k: v for k, v in info.items() if k not in _KNOWN_INFO_KEYS}))
    lines += _section(
        "How to run",
        [
            "Check the copy, inside the bundle folder:",
            "",
            "```",
            f"sha256sum -c {SUMS_FILE}",
            "```",
            "",
            "Classify images (one CSV row per image with its decision; `--abstain P` also marks images "
            "whose top class probability is below P):",
            "",
            "```",
            "synermix predict --model <bundle folder> images/",
            "synermix predict --model <bundle folder> --abstain P --out predictions.csv images/",
            "```",
        ],
    )
    return "\n".join(lines).rstrip("\n") + "\n"


# --- from the registry: the version a bundle is made of -------------------------------------


def card_info(client: Any, name: str, mv: Any, alias: str | None, folder: Path) -> dict[str, Any]:
    """What the bundle's model card and bundle.json say about a version, from its tags,
    its recorded alias moves and the training metadata it carries."""
    tags = dict(mv.tags or {})

    def group(prefix: str) -> dict[str, str]:
        return model_tags.group(tags, prefix)

    gates = model_tags.gates_of(tags)
    meta: dict[str, Any] = {}
    files = registry.pytorch_files(folder)
    if files is not None:
        meta = json.loads((files / "model.json").read_text())
    keys = (
        "arch",
        "width",
        "method",
        "inter_method",
        "beta",
        "epochs",
        "selected_epoch",
        "selected_by",
        "seed",
    )
    training = {k: meta[k] for k in keys if meta.get(k) is not None}
    init = meta.get("init") or {}
    if init:
        # where the starting weights came from: scratch, ImageNet, a file or a registered model
        training["init"] = init.get("spec", "")
        training["init_source"] = init.get("source", "")
        if init.get("sha256"):
            training["init_sha256"] = init["sha256"]
    if meta.get("tuned"):
        training["tuned"] = meta["tuned"]
    aliases = sorted(a for a, v in registry.aliases_of(client, name).items() if v == str(mv.version))
    lineage_keys = ("git_commit", "git_dirty", *[k for k in tags if k.endswith("_run_id")])
    return {
        "model_name": name,
        "version": str(mv.version),
        "alias": alias or "",
        "aliases": aliases,
        "created_at": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "model_uri": f"models:/{name}/{mv.version}",
        "tracking_uri": redact_uri(client.tracking_uri),
        "description": mv.description or "",
        "gates_passed": tags.get(model_tags.GATES_PASSED, ""),
        "metrics": {k: float(v) for k, v in group(model_tags.METRIC_PREFIX).items()},
        "gates": gates,
        "pilot": group(model_tags.PILOT_PREFIX) or None,
        "data": {"manifest_sha256": tags.get("manifest_sha256", ""), "classes": tags.get("classes", "")},
        "training": training,
        "lineage": {
            **{k: tags[k] for k in lineage_keys if k in tags},
            "dvc_lock": group(model_tags.DVC_LOCK_PREFIX),
        },
        "onnx": {
            "sha256": tags.get(model_tags.ONNX_SHA256, ""),
            "opset": tags.get("onnx_opset", ""),
            "exporter": tags.get("onnx_exporter", ""),
            "parity_max_abs_diff": tags.get("parity_max_abs_diff", ""),
            "temperature": tags.get("temperature", ""),
        },
        "alias_history": [
            m.to_dict() for m in registry.alias_history(client, name) if m.version == str(mv.version)
        ],
    }


def bundle_version(
    params: Params, out: Path, alias: str | None = "production", version: str | None = None
) -> dict:
    """``synermix bundle``: a deploy bundle of the registered version holding ``alias`` (or
    ``version``), its model card filled from the version's tags (:func:`card_info`)."""
    from synermix.rollout import holder

    client = client_for(params)
    name = params.registry.model_name
    if version is None:
        alias = alias or "production"
        version = holder(client, name, alias, "version to bundle")  # names the way out when none holds it
        evidence.checked_alias(client, name, alias, version)
        label = f"{name}@{alias} (version {version})"
    else:
        alias, label = None, f"{name} version {version}"
    mv = registry.get_version(client, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download_version(client, name, str(version), Path(tmp))
        sources = {"model.onnx": folder / "model.onnx"}
        sources |= {
            n: folder / "extra_files" / n for n in MODEL_FILES[1:] if (folder / "extra_files" / n).is_file()
        }
        if not sources["model.onnx"].is_file():
            raise UserError(
                f"{label} holds no model.onnx: only versions from the register stage can be bundled"
            )
        evidence.check_file(sources["model.onnx"], mv)
        info = card_info(client, name, mv, alias, folder)
        write_bundle(sources, out, info)
    log.info("bundle of %s written to %s (check it with: cd %s && sha256sum -c SHA256SUMS)", label, out, out)
    return {"out": str(out), "version": str(version), "alias": alias or "", "files": sorted(sources)}
