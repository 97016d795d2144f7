"""The Celery path end to end: real Celery worker processes on the RabbitMQ broker this machine
runs, one of them SIGKILLed mid-way; the job still finishes and every row reads."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.exc import ConfigurationError
from sqlalchemy_kms_field.reencrypt import unfinished_jobs
from sqlalchemy_kms_field.reencrypt.tables import FINISH, ranges_table
from tests.databases import REQUIRE_DATABASES
from tests.helpers import reset_global_registry
from tests.test_concurrent_writers import decrypted, setup_users, stored_versions

celery = pytest.importorskip("celery")
BROKER = os.environ.get("KMS_FIELD_TEST_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
ROOT = Path(__file__).parent.parent


def broker_answers() -> bool:
    url = urllib.parse.urlsplit(BROKER)
    try:
        socket.create_connection((url.hostname, url.port or 5672), timeout=2).close()
    except OSError:
        return False
    return True


pytestmark = [pytest.mark.databases("postgresql")]


@pytest.fixture
def broker() -> None:
    """RabbitMQ must answer; CI (KMS_FIELD_REQUIRE_DATABASES=1) fails rather than skips."""
    if broker_answers():
        return
    message = (
        f"the Celery tests' broker does not answer at {BROKER.rpartition('@')[2]}: start RabbitMQ "
        "or point KMS_FIELD_TEST_CELERY_BROKER at one"
    )
    if REQUIRE_DATABASES:
        pytest.fail(f"{message}. KMS_FIELD_REQUIRE_DATABASES=1 forbids skipping.", pytrace=False)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    kf.LocalMasterKey.generate_file(path)
    return path


@pytest.fixture
def celery_workers(broker: None) -> Any:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def ranges_by_owner(engine: sa.Engine) -> dict[str, int]:
    r = ranges_table.c
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(ranges_table.name):
            return {}
        rows = conn.execute(
            sa.select(r.owner, sa.func.sum(r.rows_done))
            .where(r.range_no != FINISH)
            .group_by(r.owner)
        ).all()
    return {str(owner): int(n) for owner, n in rows if owner}


def celery_env(db_url: str, key_file: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KF_CELERY_BROKER": BROKER,
        "KF_CELERY_DB_URL": db_url,
        "KF_CELERY_KEY_FILE": str(key_file),
        "PYTHONPATH": str(ROOT),
    }


def start_celery_workers(
    started: list[Any], n: int, queue: str, env: dict[str, str], tmp_path: Path
) -> None:
    """``n`` real Celery worker processes of tests.celery_app on ``queue``."""
    for i in range(n):
        log = (tmp_path / f"celery-{i}.log").open("w")
        started.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tests.celery_app",
                    "worker",
                    "--pool=solo",
                    "--concurrency=1",
                    "-Q",
                    queue,
                    "-n",
                    f"kf{i}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel=INFO",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )


def test_celery_workers_finish_the_job_though_one_is_sigkilled(
    engine: sa.Engine, db_url: str, key_file: Path, tmp_path: Path, celery_workers: list[Any]
) -> None:
    rows = 20_000
    registry = setup_users(engine, key_file, rows, active_ttl=1.0)
    registry.rotate_data_key("pii")
    queue = f"kf-test-{secrets.token_hex(4)}"  # this test's own queue on the shared broker
    start_celery_workers(celery_workers, 2, queue, celery_env(db_url, key_file), tmp_path)
    from sqlalchemy_kms_field.celery import enqueue_job
    from tests.celery_app import app  # no database configured in this process's import

    sent = enqueue_job(
        app, "users", "email", key="pii", workers=2, queue=queue, batch_size=250,
        range_rows=1000, lease_seconds=2.0, rows_per_second=3000,
    )  # fmt: skip
    assert len(sent) == 2
    # Both Celery workers at work (each holds ranges), then one is killed mid-way.
    deadline = time.monotonic() + 90
    while len(ranges_by_owner(engine)) < 2:
        assert time.monotonic() < deadline, (tmp_path / "celery-0.log").read_text()[-3000:]
        assert all(p.poll() is None for p in celery_workers)
        time.sleep(0.1)
    victim = celery_workers[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    deadline = time.monotonic() + 120
    while unfinished_jobs(engine) or stored_versions(engine) != {2: rows}:
        assert time.monotonic() < deadline, (tmp_path / "celery-0.log").read_text()[-3000:]
        assert celery_workers[0].poll() is None, "the surviving worker died"
        time.sleep(0.2)
    assert len(decrypted(engine)) == rows  # every row readable
    r = ranges_table.c
    with engine.connect() as conn:
        finished = (
            conn.execute(sa.select(r.finished_at).where(r.table_name == "users")).scalars().all()
        )
    assert finished and all(f is not None for f in finished), "every range finished once"


def test_celery_workers_reindex_the_blind_index_column_the_models_declare(
    engine: sa.Engine, db_url: str, key_file: Path, tmp_path: Path, celery_workers: list[Any]
) -> None:
    # The worker's app is installed with the models (tests/celery_app.py): the task finds the
    # column's BlindIndex there; nothing but names and the run's id travels through the broker.
    from tests.test_blind_index import INDEX, INDEX_KEY, Base, insert_users, raw_indexes

    store = kf.SqlKeyStore(engine)
    store.create_table()
    registry = kf.configure(
        master_key=kf.LocalMasterKey.from_file(key_file), key_store=store, active_ttl=1.0
    )
    registry.create_data_key("pii")
    registry.create_index_key(INDEX_KEY)
    Base.metadata.create_all(engine)
    rows = 3000
    emails = {i: f"user{i}@example.com" for i in range(1, rows + 1)}
    insert_users(engine, emails)
    registry.rotate_index_key(INDEX_KEY)
    v1, v2 = (f"kf2:{INDEX_KEY}:{v}:" for v in (1, 2))
    assert all(v.startswith(v1) for v in raw_indexes(engine).values())
    queue = f"kf-test-{secrets.token_hex(4)}"
    start_celery_workers(celery_workers, 2, queue, celery_env(db_url, key_file), tmp_path)
    from sqlalchemy_kms_field.celery import enqueue_job
    from tests.celery_app import app

    sent = enqueue_job(
        app, "bidx_users", "email_index", operation="reindex", metadata=Base.metadata,
        workers=2, queue=queue, batch_size=200, range_rows=600,
    )  # fmt: skip
    assert len(sent) == 2
    deadline = time.monotonic() + 120
    while unfinished_jobs(engine):
        assert time.monotonic() < deadline, (tmp_path / "celery-0.log").read_text()[-3000:]
        assert all(p.poll() is None for p in celery_workers), "a Celery worker died"
        time.sleep(0.2)
    # Every row's index recomputed under v2, each the index of its own email.
    stored = raw_indexes(engine)
    assert all(v.startswith(v2) for v in stored.values())
    assert stored == {i: INDEX.compute(e) for i, e in emails.items()}


def test_enqueue_refuses_what_a_task_cannot_carry() -> None:
    from sqlalchemy_kms_field.celery import enqueue_job
    from tests.test_blind_index import Base

    app = celery.Celery("kf_refusals", broker="memory://")
    with pytest.raises(
        ConfigurationError, match=r"needs the models' BlindIndex: pass enqueue_job\(metadata"
    ):
        enqueue_job(app, "bidx_users", "email_index", workers=2, operation="reindex")
    with pytest.raises(ConfigurationError, match="declares no BlindIndex column"):
        enqueue_job(
            app, "bidx_users", "email", workers=2, operation="reindex", metadata=Base.metadata
        )
    with pytest.raises(ConfigurationError, match="indexed under 'email-index'; drop key="):
        enqueue_job(
            app, "bidx_users", "email_index", key="pii", workers=2, operation="reindex",
            metadata=Base.metadata,
        )  # fmt: skip
    with pytest.raises(ConfigurationError, match="needs key="):
        enqueue_job(app, "users", "email", workers=2)
    with pytest.raises(ConfigurationError, match="not an option"):
        enqueue_job(app, "users", "email", key="pii", workers=2, engine_url="postgresql://x")
    with pytest.raises(ConfigurationError, match="workers=0"):
        enqueue_job(app, "users", "email", key="pii", workers=0)
