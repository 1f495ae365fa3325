"""The alias moves of the model registry on a real MLflow registry (SQLite): the alias lock
under racing processes and threads, a stale lock, and the rollback policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from synermix import registry
from synermix.errors import UserError
from synermix.registry import AliasMove, rollback_target
from synermix.tracking import client

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


def test_two_promotions_racing_leave_a_consistent_state(fake_registry, tmp_path):
    """Four processes promote four versions to pilot at once: each move is recorded with the
    holder it really replaced, and the alias ends on the last recorded move's version."""
    params, c, add, uri = fake_registry
    versions = [add(gates_passed="true") for _ in range(4)]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "synermix.cli",
                "--params",
                str(params_file),
                "promote",
                "pilot",
                "--version",
                v,
                "--reason",
                f"race {v}",
                "--by",
                f"racer-{v}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in versions
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    moves = registry.alias_history(c, "synermix", "pilot")
    assert sorted(m.version for m in moves) == sorted(versions)
    assert [m.previous for m in moves] == ["", *[m.version for m in moves[:-1]]]
    assert registry.aliases_of(c, "synermix")["pilot"] == moves[-1].version
    for m in moves:  # each version's own record agrees with the log
        tags = c.get_model_version("synermix", m.version).tags
        assert tags["alias.pilot.previous"] == m.previous and tags["alias.pilot.by"] == m.by
    assert registry.get_model(c, "synermix.alias-lock") is None


def test_alias_lock_waits_then_breaks_a_stale_lock(fake_registry):
    _params, c, add, _ = fake_registry
    v = add(gates_passed="true")
    c.create_registered_model("synermix.alias-lock", tags={"holder": "crashed-promote"})
    with pytest.raises(UserError, match="crashed-promote"):
        registry.move_alias(c, "synermix", "pilot", v, action="promote", reason="r", wait_seconds=0.3)
    assert registry.aliases_of(c, "synermix") == {}
    move = registry.move_alias(
        c, "synermix", "pilot", v, action="promote", reason="r", wait_seconds=5, stale_seconds=0.01
    )
    assert move is not None and registry.aliases_of(c, "synermix") == {"pilot": v}
    # moving an alias to the version that holds it records nothing
    assert registry.move_alias(c, "synermix", "pilot", v, action="promote", reason="again") is None
    assert len(registry.alias_history(c, "synermix")) == 1


def move(version: str, previous: str, action: str = "promote") -> AliasMove:
    return AliasMove("production", version, previous, action, "me", "2026-11-28T00:00:00Z", "r")


def test_rollback_goes_back_through_promotions_not_toggling():
    history = [move("1", ""), move("2", "1"), move("3", "2")]
    assert rollback_target(history, "3") == "2"
    history.append(move("2", "3", "rollback"))
    assert rollback_target(history, "2") == "1"
    history.append(move("1", "2", "rollback"))
    assert rollback_target(history, "1") is None
    assert rollback_target([move("1", "")], "1") is None
    # an alias set by hand outside synermix: roll back to the last recorded holder
    assert rollback_target([move("1", ""), move("2", "1")], "7") == "2"


def test_racing_alias_moves_in_threads_serialise(fake_registry):
    """Eight moves released at the same instant: the lock makes them take turns, so every
    recorded move names the holder it replaced (without the lock, several would read the
    same holder and the history would fork)."""
    import threading

    _params, c, add, uri = fake_registry
    versions = [add(gates_passed="true") for _ in range(8)]
    start = threading.Barrier(len(versions))
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            mine = client(uri)
            start.wait()
            registry.move_alias(mine, "synermix", "pilot", version, action="promote", reason="race")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    moves = registry.alias_history(c, "synermix", "pilot")
    assert sorted(m.version for m in moves) == sorted(versions)
    assert [m.previous for m in moves] == ["", *[m.version for m in moves[:-1]]]
    assert registry.aliases_of(c, "synermix")["pilot"] == moves[-1].version


def test_alias_lock_taken_when_the_holder_releases_during_a_duplicate_create(fake_registry, monkeypatch):
    """The interleaving CI hit: a create finds the lock held (IntegrityError), MLflow's SQL
    store reads the existing model back to word its error, and the holder has released
    the lock in between, so the create fails with "not found". The lock is free then:
    the waiter must take it, not fail the move."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    _params, c, add, _ = fake_registry
    version = add(gates_passed="true")
    lock = f"synermix{registry.LOCK_SUFFIX}"
    c.create_registered_model(lock)  # held by "another command"
    original = SqlAlchemyStore.get_registered_model
    released: list[str] = []

    def holder_releases_first(self, name):
        if name == lock and not released:
            released.append(name)
            c.delete_registered_model(lock)
        return original(self, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", holder_releases_first)
    move = registry.move_alias(c, "synermix", "pilot", version, action="promote", reason="race")
    assert released == [lock]
    assert move.version == version
    assert registry.aliases_of(c, "synermix")["pilot"] == version
    assert registry.get_model(c, lock) is None


def test_a_holder_that_outlived_its_lock_leaves_the_next_holders_lock_alone(fake_registry):
    """The holder used to delete the lock by name in `finally`: one that ran past
    stale_lock_seconds removed the lock of the command that had broken it and taken over."""
    _params, c, _add, _ = fake_registry
    lock = f"synermix{registry.LOCK_SUFFIX}"
    with registry.alias_lock(c, "synermix") as mine:
        # our lock is broken as stale and another command takes it, token "theirs"
        assert registry.break_lock(c, lock, mine, stale_seconds=300)
        c.create_registered_model(lock, tags={"token": "theirs"})
    # leaving the block released nothing: the lock is theirs
    assert registry.get_model(c, lock).tags["token"] == "theirs"
    assert not registry.release_lock(c, lock, mine)
    assert registry.release_lock(c, lock, "theirs") and registry.get_model(c, lock) is None


def test_two_waiters_that_saw_one_stale_lock_break_it_once(fake_registry):
    """A stale lock was deleted by name: a second waiter that had read the same stale lock
    deleted the lock the first waiter took after breaking it."""
    _params, c, _add, _ = fake_registry
    lock = f"synermix{registry.LOCK_SUFFIX}"
    c.create_registered_model(lock, tags={"token": "crashed"})
    first_saw = second_saw = registry.get_model(c, lock).tags["token"]
    assert registry.break_lock(c, lock, first_saw, stale_seconds=300)
    c.create_registered_model(lock, tags={"token": "first"})  # the first waiter's new lock
    assert not registry.break_lock(c, lock, second_saw, stale_seconds=300)
    assert registry.get_model(c, lock).tags["token"] == "first"
    # a break lock left by a breaker that crashed is removed once stale, then breaking works
    c.create_registered_model(f"{lock}{registry.BREAK_SUFFIX}", tags={"token": "dead-breaker"})
    assert not registry.break_lock(c, lock, "first", stale_seconds=300)
    assert registry.get_model(c, lock).tags["token"] == "first"
    assert not registry.break_lock(c, lock, "first", stale_seconds=0)  # removes the dead break lock
    assert registry.break_lock(c, lock, "first", stale_seconds=0)
    assert registry.get_model(c, lock) is None
    assert registry.get_model(c, f"{lock}{registry.BREAK_SUFFIX}") is None


def test_a_lock_whose_process_is_gone_is_broken_at_once(fake_registry):
    """kill -9 during a move left the lock for stale_lock_seconds (5 minutes) before."""
    _params, c, add, _ = fake_registry
    version = add(gates_passed="true")
    lock = f"synermix{registry.LOCK_SUFFIX}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = registry._process_marks()
    c.create_registered_model(
        lock, tags={**here, "pid": str(dead.pid), "token": "killed", "holder": "killed"}
    )
    move = registry.move_alias(c, "synermix", "pilot", version, action="promote", reason="r", wait_seconds=5)
    assert move is not None and registry.get_model(c, lock) is None
    # the same PID on another host (or a live PID) says nothing: wait, then refuse
    c.create_registered_model(lock, tags={**here, "host": "elsewhere", "pid": str(dead.pid), "holder": "far"})
    with pytest.raises(UserError, match="far"):
        registry.move_alias(
            c, "synermix", "candidate", version, action="promote", reason="r", wait_seconds=0.3
        )
    c.delete_registered_model(lock)
    c.create_registered_model(lock, tags={**here, "pid": "1", "holder": "init"})
    with pytest.raises(UserError, match="init"):
        registry.move_alias(
            c, "synermix", "candidate", version, action="promote", reason="r", wait_seconds=0.3
        )


def test_a_move_cut_off_after_the_alias_write_is_recorded_at_the_next_command(fake_registry, monkeypatch):
    """The alias was written, then the command died before the history record: the alias
    had moved with no history, and rollback found no earlier holder."""
    from synermix import evidence, rollout

    params, c, add, _ = fake_registry
    first, second = add(gates_passed="true"), add(gates_passed="true")
    registry.move_alias(c, "synermix", "pilot", first, action="promote", reason="first")
    real_record = registry._record

    def killed(*args):
        raise KeyboardInterrupt  # the command dies between the alias write and the record

    monkeypatch.setattr(registry, "_record", killed)
    with pytest.raises(KeyboardInterrupt):
        registry.move_alias(c, "synermix", "pilot", second, action="promote", reason="second", by="qa")
    monkeypatch.setattr(registry, "_record", real_record)
    assert registry.aliases_of(c, "synermix")["pilot"] == second
    assert [m.version for m in registry.alias_history(c, "synermix", "pilot")] == [first]
    [intent] = registry.pending_intents(c, "synermix").values()
    assert (intent.version, intent.previous, intent.by) == (second, first, "qa")
    assert "cut off before it was recorded" in evidence.alias_problems(c, "synermix", "pilot", second)[0]

    rollout.status(params)  # the next command reconciles
    moves = registry.alias_history(c, "synermix", "pilot")
    assert [(m.previous, m.version) for m in moves] == [("", first), (first, second)]
    assert moves[-1].reason == "second" + registry.RECONCILED_NOTE and moves[-1].by == "qa"
    assert c.get_model_version("synermix", second).tags["alias.pilot.previous"] == first
    assert registry.pending_intents(c, "synermix") == {}
    assert evidence.alias_problems(c, "synermix", "pilot", second) == []
    assert rollout.rollback(params, "pilot", "back")["to"] == first


def test_a_move_cut_off_before_the_alias_write_leaves_no_record(fake_registry, monkeypatch):
    _params, c, add, _ = fake_registry
    first, second = add(gates_passed="true"), add(gates_passed="true")
    registry.move_alias(c, "synermix", "pilot", first, action="promote", reason="first")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(c), "set_registered_model_alias", killed)
    with pytest.raises(KeyboardInterrupt):
        registry.move_alias(c, "synermix", "pilot", second, action="promote", reason="second")
    monkeypatch.undo()
    assert len(registry.pending_intents(c, "synermix")) == 1
    registry.reconcile_now(c, "synermix")
    assert registry.pending_intents(c, "synermix") == {}
    assert registry.aliases_of(c, "synermix")["pilot"] == first
    assert [m.version for m in registry.alias_history(c, "synermix", "pilot")] == [first]
