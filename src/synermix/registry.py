"""The MLflow model registry: versions, aliases and the record of every alias move.

Versions move between ``candidate``, ``pilot`` and ``production`` with aliases
(``models:/<name>@<alias>``), never the deprecated stages. Policy (which move is allowed
when) lives in :mod:`synermix.rollout`; this module does the moves and keeps them honest:

- **One move at a time.** MLflow has no compare-and-set on aliases, so a move holds a
  lock: the registered model ``<name>.alias-lock``, which MLflow creates atomically (a
  second create fails with RESOURCE_ALREADY_EXISTS, on SQLite and on a server alike).
  It exists for the second or so of a move; one older than ``stale_lock_seconds`` was
  left by a crashed command and is broken.
- **Every move is recorded** as tags: on the registered model, ``alias_log.<ms>.<id>`` =
  JSON {alias, version, previous, action, by, at, reason} (the history that rollback and
  ``synermix status`` read); on the version that gains the alias,
  ``alias.<alias>.{at,by,reason,previous,action}`` and ``held.<alias>``; on the version
  that loses it, ``alias.<alias>.removed_at`` and ``alias.<alias>.replaced_by``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from synermix import model_tags
from synermix.errors import UserError

log = logging.getLogger(__name__)

ALIAS_LOG_PREFIX = "alias_log."
LOCK_SUFFIX = ".alias-lock"


@dataclass(frozen=True)
class AliasedVersion:
    name: str
    alias: str
    version: str
    run_id: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.alias} (version {self.version})"


@dataclass(frozen=True)
class AliasMove:
    """One alias move; ``previous`` is the version that held the alias before ('' if none)."""

    alias: str
    version: str
    previous: str
    action: str  # register | promote | rollback
    by: str
    at: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def identity(by: str | None = None) -> str:
    """Who moves an alias: ``by`` when given, else the login name and the host."""
    if by:
        return by
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def get_model(client: Any, name: str) -> Any | None:
    """The registered model, or None when there is none of that name."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


def ensure_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    found = get_model(client, name)
    if found is not None:
        return found
    try:
        client.create_registered_model(
            name,
            description="Inspection-line image classifier built by the synermix pipeline (dvc repro). "
            "Aliases: candidate (passed its gates), pilot (on the pilot line), production.",
        )
    except MlflowException as exc:  # created by a concurrent register: fine
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.get_registered_model(name)


def aliases_of(client: Any, name: str) -> dict[str, str]:
    """alias -> version for the registered model ({} when there is no such model)."""
    model = get_model(client, name)
    return {a: str(v) for a, v in dict(model.aliases or {}).items()} if model else {}


def find_alias(client: Any, name: str, alias: str) -> AliasedVersion | None:
    """The version of registered model ``name`` that holds ``alias``; None when there is none."""
    version = aliases_of(client, name).get(alias)
    if version is None:
        return None
    found = client.get_model_version(name, str(version))
    return AliasedVersion(name, alias, str(found.version), found.run_id or "", found.source)


def get_version(client: Any, name: str, version: str) -> Any:
    """The model version, or a UserError naming what exists."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _missing(exc) and getattr(exc, "error_code", "") != "INVALID_PARAMETER_VALUE":
            raise
    known = ", ".join(str(v.version) for v in list_versions(client, name)) or "none"
    raise UserError(f"registered model '{name}' has no version {version} (versions: {known})")


def list_versions(client: Any, name: str) -> list[Any]:
    """Every version of the model, oldest first."""
    if get_model(client, name) is None:
        return []
    found = client.search_model_versions(f"name = '{name}'", max_results=10_000)
    return sorted(found, key=lambda v: int(v.version))


def download_version(client: Any, name: str, version: str, dst: Path) -> Path:
    """Copy the version's files into ``dst`` (which must exist) and return the folder."""
    from mlflow.artifacts import download_artifacts

    uri = f"models:/{name}/{version}"
    return Path(download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=client.tracking_uri))


def pytorch_files(folder: Path) -> Path | None:
    """The folder holding model.json + weights.pt in a downloaded version, if any.

    Versions registered by the register stage keep them under ``extra_files/`` next to
    the ONNX model (the champion check re-scores them with PyTorch); older ones held
    them at the top.
    """
    for candidate in (folder / "extra_files", folder):
        if (candidate / "model.json").is_file() and (candidate / "weights.pt").is_file():
            return candidate
    return None


@contextmanager
def alias_lock(
    client: Any, name: str, wait_seconds: float = 60.0, stale_seconds: float = 300.0
) -> Iterator[None]:
    """Hold the registry's alias lock for ``name`` (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{identity()} pid {os.getpid()}"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"holder": holder},
                description=f"Held by synermix while it moves an alias of '{name}' (seconds). "
                f"One older than a few minutes was left by a crashed command: delete it.",
            )
            break
        except MlflowException as exc:
            if _missing(exc):
                # MLflow's SQL store answers a duplicate create by reading the existing
                # model back; when the holder released the lock in between, that read
                # fails with "not found". The lock is free: try again at once.
                continue
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = get_model(client, lock)
        if existing is not None:
            age = time.time() - existing.creation_timestamp / 1000
            if age > stale_seconds:
                log.warning("breaking a stale alias lock (%.0f s old, %s)", age, dict(existing.tags or {}))
                _delete_quietly(client, lock)
                continue
        if time.monotonic() > deadline:
            who = dict(existing.tags or {}).get("holder", "?") if existing is not None else "?"
            raise UserError(
                f"another alias move on '{name}' has held the lock for over {wait_seconds:g} s ({who}); "
                f"retry, or delete the registered model '{lock}' if that command crashed"
            )
        time.sleep(0.05 + random.random() * 0.2)
    try:
        yield
    finally:
        _delete_quietly(client, lock)


def _delete_quietly(client: Any, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if not _missing(exc):
            raise


def move_alias(
    client: Any,
    name: str,
    alias: str,
    version: str,
    *,
    action: str,
    reason: str,
    by: str | None = None,
    wait_seconds: float = 60.0,
    stale_seconds: float = 300.0,
) -> AliasMove | None:
    """Give ``alias`` to ``version`` and record the move; None when it already holds it."""
    with alias_lock(client, name, wait_seconds, stale_seconds):
        previous = aliases_of(client, name).get(alias, "")
        if previous == str(version):
            log.info("%s@%s is already version %s: nothing to move", name, alias, version)
            return None
        # registered-model tags hold 5000 characters on PostgreSQL: keep the entry well below
        move = AliasMove(alias, str(version), previous, action, identity(by)[:200], now_utc(), reason[:2000])
        client.set_registered_model_alias(name, alias, str(version))
        key = f"{ALIAS_LOG_PREFIX}{int(time.time() * 1000):013d}.{uuid.uuid4().hex[:8]}"
        client.set_registered_model_tag(name, key, json.dumps(move.to_dict(), sort_keys=True))
        for field in ("at", "by", "reason", "previous", "action"):
            client.set_model_version_tag(name, str(version), f"alias.{alias}.{field}", getattr(move, field))
        client.set_model_version_tag(name, str(version), model_tags.held(alias), "true")
        if previous:
            client.set_model_version_tag(name, previous, f"alias.{alias}.removed_at", move.at)
            client.set_model_version_tag(name, previous, f"alias.{alias}.replaced_by", str(version))
    log.info(
        "%s@%s: version %s -> %s (%s by %s: %s)",
        name,
        alias,
        previous or "none",
        version,
        action,
        move.by,
        reason,
    )
    return move


def alias_history(client: Any, name: str, alias: str | None = None) -> list[AliasMove]:
    """Recorded moves, oldest first (all aliases, or one)."""
    model = get_model(client, name)
    if model is None:
        return []
    moves = []
    for key, value in sorted(dict(model.tags or {}).items()):
        if not key.startswith(ALIAS_LOG_PREFIX):
            continue
        try:
            move = AliasMove(**json.loads(value))
        except (json.JSONDecodeError, TypeError) as exc:
            log.warning("ignoring unreadable alias log entry %s (%s)", key, exc)
            continue
        if alias is None or move.alias == alias:
            moves.append(move)
    return moves


def rollback_target(moves: list[AliasMove], current: str) -> str | None:
    """The version to put back: the one that held the alias before the current holder.

    Promotions push onto a stack and rollbacks pop it, so two rollbacks in a row go two
    versions back rather than toggling between the last two.
    """
    stack: list[str] = []
    for move in moves:
        if move.action == "rollback":
            while stack and stack[-1] != move.version:
                stack.pop()
            if not stack:
                stack.append(move.version)
        elif not stack or stack[-1] != move.version:
            stack.append(move.version)
    if not stack or stack[-1] != current:  # moved outside synermix: start from the holder
        stack.append(current)
    below = [v for v in stack[:-1] if v != current]
    return below[-1] if below else None
