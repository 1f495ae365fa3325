"""A stage's clock: a line with its elapsed time when it ends, and a heartbeat line every
minute while it runs with its output going to a file or a CI log (where a progress bar that
redraws one line shows nothing for a five-minute epoch).

The stage's start time is also what its MLflow run records as its start, so a run spans the
stage's real work and not only the logging at its end.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from synermix.errors import UserError

log = logging.getLogger(__name__)

#: seconds between heartbeat lines (SYNERMIX_HEARTBEAT_SECONDS overrides; 0 switches them off)
HEARTBEAT_SECONDS = 60.0

_started: dict[str, float] = {}


def stage_started_ms() -> int | None:
    """When the running stage started (ms since the epoch), None outside a stage clock."""
    started = _started.get("at")
    return int(started * 1000) if started is not None else None


def elapsed_text(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m03s``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def heartbeat_seconds() -> float:
    raw = os.environ.get("SYNERMIX_HEARTBEAT_SECONDS", "")
    try:
        return max(float(raw), 0.0) if raw else HEARTBEAT_SECONDS
    except ValueError:
        return HEARTBEAT_SECONDS


@contextmanager
def stage_clock(stage: str, stream=None) -> Iterator[None]:
    """Time one stage; beat every :func:`heartbeat_seconds` when ``stream`` (stderr) is not
    a terminal. Ends with ``stage X finished in ...``, or ``stage X stopped after ...`` when
    it failed (not for a :class:`UserError`: bad input is one line, the error's)."""
    stream = stream if stream is not None else sys.stderr
    started = time.time()
    _started["at"] = started
    log.debug("stage %s started", stage)  # dvc prints "Running stage"; bad input stays one line
    stop = threading.Event()
    beat_every = heartbeat_seconds()
    beating = None
    isatty = getattr(stream, "isatty", None)
    if beat_every > 0 and not (callable(isatty) and isatty()):

        def beat() -> None:
            while not stop.wait(beat_every):
                log.info("stage %s still running: %s elapsed", stage, elapsed_text(time.time() - started))

        beating = threading.Thread(target=beat, name=f"heartbeat-{stage}", daemon=True)
        beating.start()
    finished = False
    said = False  # a UserError is its own one-line message: no "stopped after" beside it
    try:
        yield
        finished = True
    except UserError:
        said = True
        raise
    finally:
        stop.set()
        if beating is not None:
            beating.join(timeout=5)
        _started.pop("at", None)
        took = elapsed_text(time.time() - started)
        if finished:
            log.info("stage %s finished in %s", stage, took)
        elif not said:
            log.warning("stage %s stopped after %s", stage, took)
