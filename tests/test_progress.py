"""The stage clock: start and elapsed-time lines, a heartbeat only when no terminal watches,
and the start time the stage's MLflow run takes."""

import io
import logging
import time

import pytest

from synermix import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def beats(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]


def test_heartbeat_to_a_file_and_the_elapsed_time(caplog, monkeypatch):
    monkeypatch.setenv("SYNERMIX_HEARTBEAT_SECONDS", "0.1")
    caplog.set_level(logging.INFO, logger="synermix.progress")
    before = int(time.time() * 1000)
    with progress.stage_clock("train", stream=io.StringIO()):
        assert before <= progress.stage_started_ms() <= before + 50
        time.sleep(0.45)
    assert progress.stage_started_ms() is None  # outside a stage again
    lines = beats(caplog)
    assert len(lines) >= 2 and lines[0] == "stage train still running: 0s elapsed"
    messages = [r.getMessage() for r in caplog.records]
    assert "stage train started" not in messages  # DEBUG: dvc already says "Running stage"
    assert messages[-1] == "stage train finished in 0s"


def test_no_heartbeat_on_a_terminal_and_a_failure_says_so(caplog, monkeypatch):
    monkeypatch.setenv("SYNERMIX_HEARTBEAT_SECONDS", "0.05")
    caplog.set_level(logging.INFO, logger="synermix.progress")
    with pytest.raises(RuntimeError), progress.stage_clock("evaluate", stream=Terminal()):
        time.sleep(0.2)
        raise RuntimeError("boom")
    assert beats(caplog) == []
    last = caplog.records[-1]
    assert last.levelno == logging.WARNING and last.getMessage() == "stage evaluate stopped after 0s"


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (3723, "1h02m03s")])
def test_elapsed_text(seconds, text):
    assert progress.elapsed_text(seconds) == text


def test_heartbeat_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("SYNERMIX_HEARTBEAT_SECONDS", raising=False)
    assert progress.heartbeat_seconds() == progress.HEARTBEAT_SECONDS == 60
    monkeypatch.setenv("SYNERMIX_HEARTBEAT_SECONDS", "0")
    assert progress.heartbeat_seconds() == 0
    monkeypatch.setenv("SYNERMIX_HEARTBEAT_SECONDS", "soon")
    assert progress.heartbeat_seconds() == 60


def test_bad_input_stays_one_line(caplog):
    from synermix.errors import UserError

    caplog.set_level(logging.INFO, logger="synermix.progress")
    with pytest.raises(UserError), progress.stage_clock("prepare", stream=Terminal()):
        raise UserError("data.source folder 'x' does not exist")
    assert caplog.records == []
