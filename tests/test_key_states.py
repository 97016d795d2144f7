"""Every process learns of key state changes within active_ttl, and fails closed when it cannot.

The review found that a process went on reading and writing under a version destroyed
elsewhere, and that one failed re-read of the key store made it write a new row under a
destroyed version. These tests reproduce both through real databases and real processes; the
key store is made unreadable through the database itself (its table renamed away).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from tests.helpers import (
    MASTER_KEY_B64,
    configure_local,
    local_master_key,
    raises_kf,
    raw_values,
    reset_global_registry,
)

ROOT = Path(__file__).resolve().parent.parent


def people_table() -> sa.Table:
    return sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )


@pytest.fixture
def people(engine: sa.Engine) -> Iterator[sa.Table]:
    table = people_table()
    table.create(engine)
    yield table


def insert(engine: sa.Engine, table: sa.Table, row_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(table.insert().values(id=row_id, email=f"user{row_id}@example.com"))


def versions_written(engine: sa.Engine) -> list[int]:
    return [int(v.split(":")[2]) for v in raw_values(engine, "people", "email")]


def other_process(engine: sa.Engine) -> kf.KeyRegistry:
    """What another process (an operator's) does to the key store: its own registry."""
    return kf.KeyRegistry(local_master_key(), kf.SqlKeyStore(engine))


def destroy(engine: sa.Engine, version: int) -> None:
    """Retire then destroy a version in the key store, as an operator's process would once
    its census and grace periods allow it (they are another module's tests)."""
    store = kf.SqlKeyStore(engine)
    store.set_state("pii", version, kf.KeyState.RETIRED)
    store.destroy("pii", version)


def rename_key_table(engine: sa.Engine, old: str, new: str) -> None:
    quote = engine.dialect.identifier_preparer.quote
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {quote(old)} RENAME TO {quote(new)}"))


# Another process stops decrypting a destroyed version within active_ttl -------------------------


def test_a_destroyed_version_stops_decrypting_in_another_process_within_active_ttl(
    db_url: str, engine: sa.Engine, people: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 0.5
    reset_global_registry(monkeypatch)
    configure_local(engine)
    insert(engine, people, 1)  # under version 1
    other_process(engine).rotate_data_key("pii")
    reader = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "state_reader.py"), db_url, str(ttl)],
        cwd=ROOT,
        env={**os.environ, "KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "ready", reader.stderr
        time.sleep(0.3)
        destroyed_at = time.time()
        destroy(engine, 1)
        time.sleep(ttl + 1.0)
        out, err = reader.communicate("", timeout=60)  # closing stdin stops it
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    reads = [(float(t), outcome) for t, outcome in (line.split() for line in out.splitlines())]
    assert any(o == "ok" and t < destroyed_at for t, o in reads), "never read before"
    late = [o for t, o in reads if t > destroyed_at + ttl + 0.2]  # 0.2 s: one read's time
    assert late, "no read after active_ttl"
    assert set(late) == {"DecryptionError"}, reads


def test_this_process_drops_a_version_destroyed_elsewhere_and_writes_under_the_new_one(
    engine: sa.Engine, people: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 0.3
    reset_global_registry(monkeypatch)
    registry = configure_local(engine, active_ttl=ttl)
    insert(engine, people, 1)
    with engine.connect() as conn:
        assert conn.execute(sa.select(people.c.email)).scalar_one() == "user1@example.com"
    other_process(engine).rotate_data_key("pii")
    destroy(engine, 1)
    time.sleep(ttl + 0.05)

    assert registry.key_for_header("kf1:pii:1") is None  # dropped from memory
    with engine.connect() as conn, raises_kf(kf.DecryptionError, "destroyed"):
        conn.execute(sa.select(people.c.email)).scalar_one()
    insert(engine, people, 2)
    assert versions_written(engine) == [1, 2]


# The key store cannot be read: bounded staleness, then fail closed -------------------------------


def test_an_unreadable_key_store_never_leads_to_a_write_under_a_destroyed_version(
    engine: sa.Engine, people: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's reproduction: the process knew version 1 as active; version 1 was rotated
    away and destroyed; the re-read failed once. The old fallback wrote under version 1."""
    ttl, stale = 0.2, 0.6
    reset_global_registry(monkeypatch)
    registry = configure_local(engine, active_ttl=ttl)
    kf.configure(
        master_key=local_master_key(),
        key_store=registry.key_store,
        active_ttl=ttl,
        stale_ttl=stale,
    )
    insert(engine, people, 1)  # version 1 confirmed active now
    other_process(engine).rotate_data_key("pii")
    destroy(engine, 1)
    rename_key_table(engine, "kms_field_keys", "kms_field_keys_away")
    time.sleep(stale + 0.05)

    with raises_kf(kf.KeyStateError, "could not be read") as raised:
        insert(engine, people, 2)
    assert "stale_ttl" in str(raised.value)
    with engine.connect() as conn, raises_kf(kf.KeyStateError, "stale_ttl"):
        conn.execute(sa.select(people.c.email)).all()  # decrypting fails closed too
    assert versions_written(engine) == [1]

    rename_key_table(engine, "kms_field_keys_away", "kms_field_keys")
    insert(engine, people, 3)
    assert versions_written(engine) == [1, 2]  # row 3 under version 2, nothing else


def test_a_short_outage_is_ridden_out_within_stale_ttl_then_fails_closed(
    engine: sa.Engine,
    people: sa.Table,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ttl, stale = 0.2, 0.8
    reset_global_registry(monkeypatch)
    configure_local(engine)
    registry = kf.configure(
        master_key=local_master_key(),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=ttl,
        stale_ttl=stale,
    )
    before = time.monotonic()
    registry.active_key("pii")  # confirmed here
    after = time.monotonic()
    rename_key_table(engine, "kms_field_keys", "kms_field_keys_away")

    outcomes: list[tuple[float, bool]] = []
    row_id = 0
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_kms_field"):
        while time.monotonic() < after + stale + 0.4:
            row_id += 1
            started = time.monotonic()
            try:
                insert(engine, people, row_id)
                outcomes.append((started, True))
            except kf.KeyStateError:  # raised as itself: no StatementError lists the values
                outcomes.append((started, False))
            time.sleep(0.03)
    assert "going on with the versions known" in caplog.text
    assert any(ok for _, ok in outcomes), "did not ride out the outage"
    assert any(t > before + ttl and ok for t, ok in outcomes), "stopped at active_ttl already"
    assert all(t < after + stale for t, ok in outcomes if ok), "wrote past stale_ttl"
    assert not outcomes[-1][1], "did not fail closed"
    assert set(versions_written(engine)) == {1}

    rename_key_table(engine, "kms_field_keys_away", "kms_field_keys")
    insert(engine, people, 10_000)  # readable again: goes on at once
    with engine.connect() as conn:
        emails = conn.execute(sa.select(people.c.id, people.c.email)).all()
    assert all(email == f"user{i}@example.com" for i, email in emails)


def test_stale_ttl_is_checked(engine: sa.Engine) -> None:
    store = kf.SqlKeyStore(engine)
    with pytest.raises(kf.ConfigurationError, match="stale_ttl"):
        kf.KeyRegistry(local_master_key(), store, active_ttl=10, stale_ttl=5)
    assert kf.KeyRegistry(local_master_key(), store, active_ttl=10).stale_ttl == 30


def test_the_hot_path_reads_the_key_store_once_per_active_ttl(
    engine: sa.Engine, people: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_global_registry(monkeypatch)
    configure_local(engine, active_ttl=30)
    insert(engine, people, 1)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    for row_id in range(2, 52):
        insert(engine, people, row_id)
    with engine.connect() as conn:
        assert len(conn.execute(sa.select(people.c.email)).all()) == 51
    assert not [s for s in statements if "kms_field_keys" in s]
