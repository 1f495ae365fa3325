"""The MLflow model registry: versions, aliases and the record of every alias move.

Versions move between ``candidate``, ``pilot`` and ``production`` with aliases
(``models:/<name>@<alias>``), never the deprecated stages. Policy (which move is allowed
when) lives in :mod:`synermix.rollout`; this module does the moves and keeps them honest:

- **One move at a time.** MLflow has no compare-and-set on aliases, so a move holds a
  lock: the registered model ``<name>.alias-lock``, which MLflow creates atomically (a
  second create fails with RESOURCE_ALREADY_EXISTS, on SQLite and on a server alike).
  The lock carries its holder's random token; a holder deletes the lock only while it
  still carries that token, so a holder that outlived ``stale_lock_seconds`` never
  removes the next holder's lock. It exists for the second or so of a move; one older
  than ``stale_lock_seconds``, or one whose holder process is gone (same machine, same
  boot, same PID namespace), was left by a crashed command and is broken. Breaking takes
  a second lock (``<name>.alias-lock.break``) and re-reads the token first, so of two
  waiters that saw the same stale lock only one breaks it, and the other never deletes
  the lock the first then took.
- **Every move is recorded** as tags: on the registered model, ``alias_log.<ms>.<id>`` =
  JSON {alias, version, previous, action, by, at, reason} (the history that rollback and
  ``synermix status`` read); on the version that gains the alias,
  ``alias.<alias>.{at,by,reason,previous,action}`` and ``held.<alias>``; on the version
  that loses it, ``alias.<alias>.removed_at`` and ``alias.<alias>.replaced_by``.
- **An intent comes first.** Before the alias is written, the move is written as
  ``alias_intent.<id>``; it is deleted once the history is complete. A command killed in
  between leaves the intent, and the next command that takes the lock (any move,
  ``rollback``, ``status``) reconciles it: the history record is written when the alias
  did move, the intent dropped when it did not (:func:`reconcile`).
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
INTENT_PREFIX = "alias_intent."
LOCK_SUFFIX = ".alias-lock"
BREAK_SUFFIX = ".break"
RECONCILED_NOTE = " [recorded when reconciled: the command that moved it was cut off]"


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


def _process_marks() -> dict[str, str]:
    """What tells whether a lock's holder process still runs: the host, this boot, the
    PID namespace and the PID. Only with all three of the first equal does a PID mean the
    same process (containers share host names; PIDs repeat across namespaces and boots)."""
    marks = {"host": socket.gethostname(), "pid": str(os.getpid())}
    try:
        marks["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        marks["pidns"] = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # not Linux: dead holders are then only broken when stale
        pass
    return marks


def _holder_is_gone(tags: dict[str, str]) -> bool:
    """True only when the lock's holder ran here (same host, boot and PID namespace) and
    its process no longer exists; False whenever that cannot be known."""
    here = _process_marks()
    if any(not tags.get(k) or tags.get(k) != here.get(k) for k in ("host", "boot", "pidns")):
        return False
    try:
        pid = int(tags.get("pid", ""))
    except ValueError:
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _create_lock(client: Any, lock: str, tags: dict[str, str], description: str) -> bool:
    """Create ``lock``; False when it exists already."""
    from mlflow.exceptions import MlflowException

    while True:
        try:
            client.create_registered_model(lock, tags=tags, description=description)
            return True
        except MlflowException as exc:
            if _missing(exc):
                # MLflow's SQL store answers a duplicate create by reading the existing
                # model back; when the holder released the lock in between, that read
                # fails with "not found". The lock is free: try again at once.
                continue
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            return False


def _token_of(model: Any) -> str:
    return dict(model.tags or {}).get("token", "")


def release_lock(client: Any, lock: str, token: str) -> bool:
    """Delete ``lock`` if it still carries ``token``; False (and the lock left alone) when
    another command holds it now (ours was broken as stale while we held it)."""
    current = get_model(client, lock)
    if current is None:
        return False
    if _token_of(current) != token:
        log.warning(
            "the alias lock %s was taken over while this command held it (it ran past "
            "registry.stale_lock_seconds); leaving the new holder's lock alone",
            lock,
        )
        return False
    _delete_quietly(client, lock)
    return True


def break_lock(client: Any, lock: str, seen_token: str, stale_seconds: float) -> bool:
    """Delete the stale ``lock`` seen with ``seen_token``, under the break lock, only if it
    still carries that token; False when another waiter broke it (or is breaking it)."""
    breaker = f"{lock}{BREAK_SUFFIX}"
    token = uuid.uuid4().hex
    if not _create_lock(client, breaker, {"token": token, **_process_marks()}, f"Breaking {lock}."):
        existing = get_model(client, breaker)
        if existing is not None and time.time() - existing.creation_timestamp / 1000 > stale_seconds:
            log.warning("removing a break lock left by a crashed command (%s)", breaker)
            release_lock(client, breaker, _token_of(existing))
        return False
    try:
        current = get_model(client, lock)
        if current is None or _token_of(current) != seen_token:
            return False  # broken and taken by another waiter since we looked
        log.warning("breaking a stale alias lock (%s)", dict(current.tags or {}))
        _delete_quietly(client, lock)
        return True
    finally:
        release_lock(client, breaker, token)


@contextmanager
def alias_lock(
    client: Any, name: str, wait_seconds: float = 60.0, stale_seconds: float = 300.0
) -> Iterator[str]:
    """Hold the registry's alias lock for ``name`` (see the module docstring); yields the
    holder's token."""
    lock = f"{name}{LOCK_SUFFIX}"
    token = uuid.uuid4().hex
    tags = {"holder": f"{identity()} pid {os.getpid()}", "token": token, **_process_marks()}
    description = (
        f"Held by synermix while it moves an alias of '{name}' (seconds). "
        "One older than a few minutes was left by a crashed command: delete it."
    )
    deadline = time.monotonic() + wait_seconds
    while not _create_lock(client, lock, tags, description):
        existing = get_model(client, lock)
        if existing is not None:
            age = time.time() - existing.creation_timestamp / 1000
            seen = dict(existing.tags or {})
            if age > stale_seconds or _holder_is_gone(seen):
                why = f"{age:.0f} s old" if age > stale_seconds else f"its process {seen.get('pid')} is gone"
                log.info("alias lock %s: %s", lock, why)
                if break_lock(client, lock, _token_of(existing), stale_seconds):
                    continue
        if time.monotonic() > deadline:
            who = dict(existing.tags or {}).get("holder", "?") if existing is not None else "?"
            raise UserError(
                f"another alias move on '{name}' has held the lock for over {wait_seconds:g} s ({who}); "
                f"retry, or delete the registered model '{lock}' if that command crashed"
            )
        time.sleep(0.05 + random.random() * 0.2)
    try:
        yield token
    finally:
        release_lock(client, lock, token)


def _delete_quietly(client: Any, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if not _missing(exc):
            raise


def _record(client: Any, name: str, move: AliasMove) -> None:
    """The history entry and the version marks of a move whose alias is written."""
    key = f"{ALIAS_LOG_PREFIX}{int(time.time() * 1000):013d}.{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(name, key, json.dumps(move.to_dict(), sort_keys=True))
    for field in ("at", "by", "reason", "previous", "action"):
        client.set_model_version_tag(name, move.version, f"alias.{move.alias}.{field}", getattr(move, field))
    client.set_model_version_tag(name, move.version, model_tags.held(move.alias), "true")
    if move.previous:
        client.set_model_version_tag(name, move.previous, f"alias.{move.alias}.removed_at", move.at)
        client.set_model_version_tag(name, move.previous, f"alias.{move.alias}.replaced_by", move.version)


def pending_intents(client: Any, name: str) -> dict[str, AliasMove]:
    """Moves begun and not finished (their command was cut off), by tag key."""
    model = get_model(client, name)
    found: dict[str, AliasMove] = {}
    for key, value in sorted(dict(model.tags or {}).items() if model else []):
        if key.startswith(INTENT_PREFIX):
            try:
                found[key] = AliasMove(**json.loads(value))
            except (json.JSONDecodeError, TypeError):
                log.warning("dropping unreadable alias intent %s", key)
                found[key] = AliasMove("", "", "", "", "", "", "")
    return found


def reconcile(client: Any, name: str) -> list[AliasMove]:
    """Finish or drop the intents of cut-off moves; call with the alias lock held.

    Returns the moves whose history this wrote (the alias had moved, the record had not)."""
    written = []
    for key, intent in pending_intents(client, name).items():
        holder = aliases_of(client, name).get(intent.alias) if intent.alias else None
        recorded = intent.alias and any(m == intent for m in alias_history(client, name, intent.alias))
        if intent.alias and holder == intent.version and not recorded:
            move = AliasMove(**{**intent.to_dict(), "reason": intent.reason + RECONCILED_NOTE})
            _record(client, name, move)
            written.append(move)
            log.warning(
                "%s@%s: recorded the move to version %s by %s at %s, whose command was cut off "
                "after moving the alias",
                name,
                intent.alias,
                intent.version,
                intent.by,
                intent.at,
            )
        elif intent.alias and not recorded:
            log.warning(
                "%s@%s: a move to version %s (%s, %s) was cut off before the alias moved; "
                "the alias stays on version %s",
                name,
                intent.alias,
                intent.version,
                intent.by,
                intent.at,
                holder or "none",
            )
        client.delete_registered_model_tag(name, key)
    return written


def reconcile_now(client: Any, name: str, wait_seconds: float = 60.0, stale_seconds: float = 300.0) -> None:
    """:func:`reconcile` under the alias lock, when there is anything to reconcile."""
    if pending_intents(client, name):
        with alias_lock(client, name, wait_seconds, stale_seconds):
            reconcile(client, name)


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
        reconcile(client, name)
        previous = aliases_of(client, name).get(alias, "")
        if previous == str(version):
            log.info("%s@%s is already version %s: nothing to move", name, alias, version)
            return None
        # registered-model tags hold 5000 characters on PostgreSQL: keep the entry well below
        move = AliasMove(alias, str(version), previous, action, identity(by)[:200], now_utc(), reason[:2000])
        intent = f"{INTENT_PREFIX}{uuid.uuid4().hex}"
        client.set_registered_model_tag(name, intent, json.dumps(move.to_dict(), sort_keys=True))
        client.set_registered_model_alias(name, alias, str(version))
        _record(client, name, move)
        client.delete_registered_model_tag(name, intent)
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


def last_move(client: Any, name: str, alias: str) -> AliasMove | None:
    """The last recorded move of ``alias`` (None when none is recorded)."""
    moves = alias_history(client, name, alias)
    return moves[-1] if moves else None


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
