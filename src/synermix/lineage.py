"""Where a stage run comes from: the ``dvc repro`` that started it and the dvc.lock it saw.

Every stage is its own process, so the stages of one ``dvc repro`` find each other
through a *pipeline key*: the DVC process they all descend from (host, process id and
start time, which no other process ever shares). ``SYNERMIX_PIPELINE_KEY`` overrides it,
for another orchestrator that wants its stages grouped. A stage run by hand
(``synermix train``) has no key and stands alone in MLflow.

The dvc.lock hash of a stage is the sha256 of its dvc.lock entry (command, dependency
and output hashes, params) as canonical JSON; the same entry always gives the same hash:

    python -c "import yaml,json,hashlib,sys; e=yaml.safe_load(open('dvc.lock'))['stages'][sys.argv[1]];
    print(hashlib.sha256(json.dumps(e, sort_keys=True, separators=(',', ':')).encode()).hexdigest())" train
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from synermix.paths import DVC_LOCK

log = logging.getLogger(__name__)

PIPELINE_KEY_ENV = "SYNERMIX_PIPELINE_KEY"
#: the pipeline's stages in dvc.yaml order (a linear chain: each depends on the one before)
STAGES = ("prepare", "validate", "tune", "train", "evaluate", "export", "register")


def _is_dvc_run(cmdline: list[str]) -> bool:
    """A ``dvc repro`` / ``dvc exp run`` process, however it was started."""
    names = [Path(part).name for part in cmdline]
    for i, name in enumerate(names):
        if name in ("dvc", "dvc.exe"):  # the dvc script, or `python -m dvc`
            return any(word in names[i + 1 :] for word in ("repro", "exp", "queue-worker"))
    return False


def pipeline_key() -> str | None:
    """The key shared by every stage of this ``dvc repro`` (None outside DVC)."""
    if os.environ.get(PIPELINE_KEY_ENV):
        return os.environ[PIPELINE_KEY_ENV]
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the project's dependencies
        return None
    try:
        for proc in psutil.Process().parents():
            try:
                if _is_dvc_run(proc.cmdline()):
                    return f"dvc:{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"
            except (psutil.AccessDenied, psutil.ZombieProcess, psutil.NoSuchProcess):
                continue
    except psutil.Error as exc:
        log.debug("cannot walk the process tree (%s): no pipeline parent run", exc)
    return None


def entry_hash(entry: Any) -> str:
    """sha256 of a dvc.lock stage entry as canonical JSON."""
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def dvc_lock_hashes(root: Path, before: str | None = None) -> dict[str, str]:
    """Stage -> hash of its dvc.lock entry, for the stages upstream of ``before``.

    ``before=None`` takes every stage in the file. A stage downstream of ``before`` is
    left out: its entry belongs to an older run and does not describe this one's inputs.
    """
    import yaml

    path = root / DVC_LOCK
    if not path.is_file():
        return {}
    try:
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as exc:
        log.warning("%s is not readable (%s): no dvc.lock hashes in the run", path, exc)
        return {}
    upstream = STAGES[: STAGES.index(before)] if before in STAGES else None
    return {name: entry_hash(entry) for name, entry in stages.items() if upstream is None or name in upstream}


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes; None when there is no such file (yet)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
