"""Which model a command runs: the one place a model spec is read.

A spec is an ``.onnx`` file, a bundle folder (verified against its SHA256SUMS first), or a
registered version, ``models:/<name>@<alias>`` (followed: the version behind the alias)
or ``models:/<name>/<version>``. ``synermix predict``, ``synermix serve``, ``pilot-eval``
and the bundle command resolve specs here, and ``train.init`` parses its ``models:/``
form here. MLflow is imported only for a registry spec: a line machine may not have it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synermix.bundle import MODEL_FILE, is_bundle, verify_bundle
from synermix.errors import UserError

REGISTRY_SCHEME = "models:/"


@dataclass(frozen=True)
class RegistrySpec:
    """``models:/name@alias`` (alias set) or ``models:/name/3`` (version set)."""

    name: str
    alias: str | None = None
    version: str | None = None


def is_registry(spec: str) -> bool:
    return spec.startswith(REGISTRY_SCHEME)


def version_uri(name: str, version: str | int) -> str:
    """``models:/<name>/<version>``."""
    return f"{REGISTRY_SCHEME}{name}/{version}"


def parse_registry(spec: str) -> RegistrySpec | None:
    """A well-formed ``models:/`` spec, or None (the caller words the error for its option)."""
    rest = spec[len(REGISTRY_SCHEME) :]
    name, at, alias = rest.partition("@")
    if at and name and alias and "/" not in alias:
        return RegistrySpec(name, alias=alias)
    name, slash, version = rest.rpartition("/")
    if slash and name and version.isdigit():
        return RegistrySpec(name, version=version)
    return None


def split_alias(spec: str) -> tuple[str, str] | None:
    """(name, alias) of a ``models:/<name>@<alias>`` spec; None for a fixed version."""
    rest = spec.removeprefix(REGISTRY_SCHEME)
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias
    return None


def model_file(spec: str, tmp: Path, tracking_uri: str | None = None) -> Path:
    """The ONNX file behind ``spec``: an .onnx file, a bundle folder (verified first), or a
    registered version ``models:/<name>@<alias>`` / ``models:/<name>/<version>``, which is
    downloaded into ``tmp`` (MLflow is imported only then: a line machine may not have it)."""
    if is_registry(spec):
        return _registry_file(spec, tmp, tracking_uri)
    path = Path(spec)
    if path.is_dir():
        if not is_bundle(path):
            raise UserError(
                f"{path}: a folder but not a bundle (no SHA256SUMS + model.onnx); see synermix bundle"
            )
        return verify_bundle(path)
    if not path.is_file():
        raise UserError(f"{path}: no ONNX model there; run the export stage (dvc repro) or pass --model")
    return path


def _registry_file(spec: str, tmp: Path, tracking_uri: str | None) -> Path:
    """Download a registered version's model.onnx. An alias is followed only when its move
    is recorded and the version's evidence holds (:func:`synermix.evidence.checked_alias`);
    the version it names then is the one downloaded, so a move in between cannot swap it."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from synermix import evidence, registry
    from synermix.tracking import client, quiet_mlflow_logs

    quiet_mlflow_logs()
    parsed = parse_registry(spec)
    if parsed is None:
        raise UserError(
            f"{spec}: not a registered model; write models:/<name>@<alias> or models:/<name>/<version>"
        )
    store = client(tracking_uri)
    try:
        version = parsed.version or evidence.checked_alias(store, parsed.name, str(parsed.alias))
        mv = registry.get_version(store, parsed.name, version)
        folder = Path(
            download_artifacts(
                artifact_uri=version_uri(parsed.name, version), dst_path=str(tmp), tracking_uri=tracking_uri
            )
        )
    except MlflowException as exc:
        raise UserError(f"{spec}: cannot fetch it from MLflow ({exc.message})") from None
    if not (folder / MODEL_FILE).is_file():
        raise UserError(f"{spec} has no model.onnx: only versions from the register stage run here")
    evidence.check_file(folder / MODEL_FILE, mv)
    return folder / MODEL_FILE


def version_file(client: Any, name: str, version: str, dst: Path) -> Path:
    """A registered version's ONNX file, downloaded into ``dst`` (the lookup predict and
    serve make for ``models:/<name>/<version>``)."""
    dst.mkdir(parents=True, exist_ok=True)
    return model_file(version_uri(name, version), dst, client.tracking_uri)


def fingerprint(spec: str, tracking_uri: str | None = None) -> str:
    """A cheap value that changes when the model behind ``spec`` changes."""
    if is_registry(spec):
        split = split_alias(spec)
        if split is None:  # a fixed version never changes
            return spec
        from synermix import registry
        from synermix.tracking import client

        version = registry.aliases_of(client(tracking_uri), split[0]).get(split[1])
        return f"{spec}={version}"
    path = Path(spec)
    sums = path / "SHA256SUMS"
    if sums.is_file():
        # the checksums, and every file's size and time: a file rewritten under an unchanged
        # SHA256SUMS is a change too (loading it then fails verification, as it should)
        digest = hashlib.sha256(sums.read_bytes())
        for file in sorted(p for p in path.rglob("*") if not p.is_dir()):
            info = file.lstat()
            digest.update(f"{file.relative_to(path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def registry_about(spec: str, fingerprint_value: str) -> dict[str, str]:
    """Name, version and alias for a registered model (from the spec and its fingerprint)."""
    if not is_registry(spec):
        return {}
    split = split_alias(spec)
    if split is not None:
        return {"name": split[0], "alias": split[1], "version": fingerprint_value.rsplit("=", 1)[1]}
    name, _, version = spec.removeprefix(REGISTRY_SCHEME).partition("/")
    return {"name": name, "version": version}
