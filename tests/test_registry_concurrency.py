"""Invariant 4 under threads and processes: one KMS unwrap per version, active_ttl, rotations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.registry import data_key_context
from tests.concurrent_reader import expected_email
from tests.helpers import (
    MASTER_KEY_B64,
    configure_local,
    local_master_key,
    raw_values,
    reset_global_registry,
)
from tests.kms_server import KmsServer

ROOT = Path(__file__).resolve().parent.parent
THREADS = 8
T = TypeVar("T")


def accounts_table() -> sa.Table:
    return sa.Table(
        "accounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )


def all_at_once(fn: Callable[[], T], count: int = THREADS) -> list[T]:
    """Call ``fn`` from ``count`` threads released together; re-raise the first error."""
    barrier = threading.Barrier(count)
    results: list[T | None] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


@pytest.fixture
def kms_alias(kms: KmsServer) -> str:
    alias = f"alias/kf-concurrency-{uuid.uuid4().hex[:12]}"
    kms.create_alias(alias, kms.create_key("concurrency"))
    return alias


@pytest.fixture
def kms_registry(
    kms: KmsServer, kms_alias: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[kf.KeyRegistry]:
    reset_global_registry(monkeypatch)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
    store = kf.SqlKeyStore(engine)
    store.create_table()
    yield kf.configure(
        master_key=kf.AwsKmsMasterKey(kms_alias, client=kms.client()), key_store=store
    )
    engine.dispose()


# (a) A fresh process, eight threads, two versions: two Decrypt calls -----------------------------


def test_fresh_process_unwraps_each_version_once_under_eight_threads(
    kms: KmsServer, kms_alias: str, kms_registry: kf.KeyRegistry, tmp_path: Path
) -> None:
    engine = kms_registry.key_store.engine
    table = accounts_table()
    table.create(engine)
    kf.create_data_key("pii")
    with engine.begin() as conn:
        conn.execute(
            table.insert(), [{"id": i, "email": expected_email(i)} for i in range(1, 5001)]
        )
    kf.rotate_data_key("pii")
    with engine.begin() as conn:
        conn.execute(
            table.insert(), [{"id": i, "email": expected_email(i)} for i in range(5001, 10_001)]
        )
    with engine.connect() as conn:
        per_version = conn.execute(
            sa.text(
                "SELECT substr(email, 1, 10) AS head, count(*) FROM accounts "
                "GROUP BY substr(email, 1, 10) ORDER BY head"
            )
        ).all()
    assert [tuple(r) for r in per_version] == [("kf2:pii:1:", 5000), ("kf2:pii:2:", 5000)]
    engine.dispose()  # the subprocess gets the file to itself

    kms.reset_counts()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "concurrent_reader.py"),
            str(tmp_path / "app.sqlite"),
            kms_alias,
            str(THREADS),
        ],
        cwd=ROOT,
        env={**os.environ, **kms.env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    per_thread = json.loads(result.stdout)
    assert per_thread == [{"rows": 10_000, "wrong": 0}] * THREADS
    # One DescribeKey resolves the alias to the key ARN that every wrapped key must name.
    assert kms.counts == {"DescribeKey": 1, "Decrypt": 2}


# (b) Single flight in this process ---------------------------------------------------------------


def test_single_flight_unwraps_once_for_eight_threads(
    kms: KmsServer, kms_registry: kf.KeyRegistry
) -> None:
    kf.create_data_key("pii")
    kf.rotate_data_key("pii")
    for _ in range(3):
        kms_registry.forget()
        kms.reset_counts()
        keys = all_at_once(lambda: kms_registry.data_key("pii", 1))
        assert kms.counts == {"Decrypt": 1}
        assert len({id(k) for k in keys}) == 1
        assert keys[0].version == 1

    # Both versions and the active lookup at once: still one unwrap per version.
    kms_registry.forget()
    kms.reset_counts()
    jobs = [
        lambda: kms_registry.data_key("pii", 1),
        lambda: kms_registry.data_key("pii", 2),
        lambda: kms_registry.active_key("pii"),
    ]
    counter = iter(range(THREADS * 3))
    keys = all_at_once(lambda: jobs[next(counter) % 3](), THREADS * 3)
    assert sorted(k.version for k in keys) == [1] * THREADS + [2] * (2 * THREADS)
    assert kms.counts == {"Decrypt": 2}


def test_a_failed_unwrap_does_not_block_the_others(
    kms: KmsServer, kms_registry: kf.KeyRegistry
) -> None:
    kf.create_data_key("pii")
    kms_registry.forget()
    kms.reset_counts()
    kms.inject("Decrypt", "AccessDeniedException", times=1)
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            kms_registry.data_key("pii", 1)
            outcomes.append("ok")
        except kf.MasterKeyError as exc:
            outcomes.append(exc.code)

    all_at_once(attempt)
    assert outcomes.count("AccessDeniedException") == 1
    assert outcomes.count("ok") == THREADS - 1
    assert kms.counts == {"Decrypt": 2}  # the failure, then one successful unwrap


# (c) active_ttl: another process moves to a new version on its own ------------------------------


def test_active_ttl_moves_a_second_process_to_the_new_version(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 0.5
    reset_global_registry(monkeypatch)
    this_process = configure_local(engine, active_ttl=ttl)  # writes through the column type
    other_process = kf.KeyRegistry(local_master_key(), kf.SqlKeyStore(engine))
    table = accounts_table()
    table.create(engine)
    next_id = iter(range(1, 1_000_000))  # not 0: MariaDB reads id 0 as "generate one"

    def write() -> int:
        row_id = next(next_id)
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=row_id, email=expected_email(row_id)))
        value = raw_values(engine, "accounts", "email")[-1]
        return int(value.split(":")[2])

    before = time.monotonic()
    assert write() == 1  # reads the active version: cached until (this moment) + ttl
    after = time.monotonic()
    assert other_process.rotate_data_key("pii").version == 2

    writes: list[tuple[float, float, int]] = []  # (started, finished, version written)
    while not writes or writes[-1][2] == 1:
        started = time.monotonic()
        version = write()
        writes.append((started, time.monotonic(), version))
        assert started < after + ttl + 5, "never moved to version 2"
        time.sleep(0.05)
    started = time.monotonic()
    writes.append((started, time.monotonic(), write()))  # and it stays there

    for started, finished, version in writes:
        if finished < before + ttl:  # certainly inside the TTL: the cached, old version
            assert version == 1, writes
        if started > after + ttl:  # certainly past it: the new version
            assert version == 2, writes
    versions = [v for _, _, v in writes]
    assert versions == sorted(versions), "went back to version 1"
    assert this_process.active_key("pii").version == 2
    with engine.connect() as conn:
        emails = conn.execute(sa.select(table.c.id, table.c.email)).all()
    assert all(email == expected_email(row_id) for row_id, email in emails)


# (d) Two processes rotating at the same moment -------------------------------------------------


def test_concurrent_rotations_from_two_processes(
    db_url: str, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine)  # version 1
    workers = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "rotate_worker.py"), db_url, "pii", "5"],
            cwd=ROOT,
            env={**os.environ, "KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:  # both start at the same moment
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    created = [json.loads(out) for out, _ in outputs]
    assert all(len(c) == 5 for c in created)
    assert sorted(created[0] + created[1]) == list(range(2, 12))

    stored = registry.key_store.versions("pii")
    assert [k.version for k in stored] == list(range(1, 12))
    states = {k.version: k.state for k in stored}
    assert kf.KeyState.PENDING not in states.values()
    assert registry.key_store.active_version("pii") == 11
    assert [v for v, s in states.items() if s is kf.KeyState.ACTIVE] == [11], states
    assert all(s is kf.KeyState.READABLE for v, s in states.items() if v != 11), states
    registry.forget()
    for version in range(1, 12):  # every version unwraps under its own context
        assert registry.data_key("pii", version).version == version
    assert registry.active_key("pii").version == 11


@pytest.mark.databases("sqlite")
def test_a_slow_rotation_finishing_last_does_not_leave_two_active_versions(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving two processes can produce, step by step through the key store's API:
    process A reserves version 2, process B rotates to 3, then A stores and activates 2."""
    reset_global_registry(monkeypatch)
    registry = configure_local(engine)
    store = registry.key_store
    master = local_master_key()

    slow_version = store.reserve_version("pii")  # process A
    assert slow_version == 2
    assert registry.rotate_data_key("pii").version == 3  # process B, start to end
    _, wrapped, master_key_id = master.generate_data_key(data_key_context("pii", slow_version))
    store.store_wrapped("pii", slow_version, wrapped, master_key_id)  # process A again
    store.activate("pii", slow_version)

    assert store.active_version("pii") == 3
    states = {k.version: k.state for k in store.versions("pii")}
    assert states == {
        1: kf.KeyState.READABLE,
        2: kf.KeyState.READABLE,
        3: kf.KeyState.ACTIVE,
    }


def test_a_long_sqlite_write_transaction_outliving_active_ttl_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite without WAL: a write transaction that has spilled its cache holds an exclusive
    lock, so re-reading the active version on another connection fails ("database is
    locked"). The registry goes on with the version it knows (within stale_ttl), says so, and
    tries again."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}", connect_args={"timeout": 0.2})
    reset_global_registry(monkeypatch)
    store = configure_local(engine, active_ttl=0.3).key_store
    # Within stale_ttl of its last read it goes on (test_key_states checks the bound itself).
    registry = kf.configure(
        master_key=local_master_key(), key_store=store, active_ttl=0.3, stale_ttl=60
    )
    t = sa.Table(
        "t",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("e", kf.EncryptedString(100, key="pii")),
    )
    t.create(engine)
    values = [f"user{i}@example.com" for i in range(3000)]
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA cache_size=5")  # spill (and lock) after a few pages
        conn.execute(t.insert(), [{"e": v} for v in values[:1500]])
        time.sleep(0.4)  # active_ttl expires inside the transaction
        conn.execute(t.insert(), [{"e": v} for v in values[1500:]])
    assert "could not re-read the key versions from the key store" in caplog.text
    with engine.connect() as conn:
        assert conn.execute(sa.select(t.c.e).order_by(t.c.id)).scalars().all() == values

    # Once the store can be read again, a rotation is picked up as usual.
    registry.rotate_data_key("pii")
    time.sleep(0.4)
    assert registry.active_key("pii").version == 2
    engine.dispose()
