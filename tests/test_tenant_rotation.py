"""Rotating one tenant's key (issue 13, point 3): its rows, and only them, move to the new version.

The job is SIGKILLed half way while the application keeps writing that tenant's rows: every row
stays readable with its last written value, a rerun finishes, no other tenant's row changes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import tenants
from sqlalchemy_kms_field.tenant_rotation import reencrypt_tenant, reencrypt_tenants
from tests.helpers import MASTER_KEY_B64, configure_local, reset_tenants
from tests.scripts.tenant_rotate_job import metadata, notes

ROOT = Path(__file__).resolve().parent.parent
ROWS = 60


@pytest.fixture
def db(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    reset_tenants(monkeypatch)
    configure_local(engine, active_ttl=0.5)
    kf.create_tenant_table()
    metadata.create_all(engine)
    for tenant, ids in ((42, range(1, ROWS + 1)), (43, range(1001, 1011))):
        with engine.begin() as conn:
            conn.execute(
                notes.insert(), [{"id": i, "tenant_id": tenant, "body": f"{i}-0"} for i in ids]
            )
    yield engine


def raw(engine: sa.Engine, tenant: int) -> dict[int, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, body FROM notes WHERE tenant_id = :t"), {"t": tenant}
        )
        return dict(rows.all())


def values(engine: sa.Engine, tenant: int) -> dict[int, str]:
    with engine.connect() as conn:
        query = sa.select(notes.c.id, notes.c.body).where(notes.c.tenant_id == tenant)
        return dict(conn.execute(query).all())


def on_version(engine: sa.Engine, tenant: int, version: int) -> int:
    head = f"kf2:pii.t.{tenant}:{version}:"
    return sum(v.startswith(head) for v in raw(engine, tenant).values())


def job(db_url: str, batch: int, pause: float) -> subprocess.Popen[str]:
    env = {
        "KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64,
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
    }
    script = str(ROOT / "tests/scripts/tenant_rotate_job.py")
    return subprocess.Popen(
        [sys.executable, script, db_url, "42", str(batch), str(pause)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True,
    )  # fmt: skip


def test_a_tenants_rotation_survives_sigkill_and_a_concurrent_writer(
    db: sa.Engine, db_url: str
) -> None:
    other_before = raw(db, 43)
    kf.rotate_tenant_key("pii", 42)
    last = {i: f"{i}-0" for i in range(1, ROWS + 1)}
    stop, errors, paused = threading.Event(), [], threading.Lock()

    def write() -> None:  # the application, updating tenant 42's rows meanwhile
        n = 0
        rng = random.Random(7)
        while not stop.is_set():
            n += 1
            row_id = rng.randrange(1, ROWS + 1)
            try:
                with paused:  # a write and its record, never half seen by the checks
                    with db.begin() as conn:
                        conn.execute(
                            notes.update()
                            .where(notes.c.id == row_id, notes.c.tenant_id == 42)
                            .values(body=f"{row_id}-{n}")
                        )
                    last[row_id] = f"{row_id}-{n}"
            except Exception as exc:  # a lock timeout would be worth seeing, not hiding
                errors.append(exc)
            time.sleep(0.02)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        first = job(db_url, batch=4, pause=0.1)
        deadline = time.monotonic() + 60
        while on_version(db, 42, 2) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        assert first.returncode == -signal.SIGKILL
        moved = on_version(db, 42, 2)
        assert 12 <= moved < ROWS  # killed half way
        with paused:
            assert values(db, 42) == last  # every row readable, none lost or stale
        second = job(db_url, batch=16, pause=0.0)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        assert out.startswith("done ")
    finally:
        stop.set()
        writer.join()
    assert not errors, errors[0]
    assert on_version(db, 42, 2) == ROWS
    assert values(db, 42) == last
    assert raw(db, 43) == other_before  # no other tenant's row touched


def test_rotating_every_tenant_in_one_job(db: sa.Engine) -> None:
    kf.get_registry().active_ttl = 0
    tenants.configure_tenants(max_age=0)
    more = range(44, 48)
    for tenant in more:
        kf.ensure_tenant_key("pii", tenant)
        with db.begin() as conn:
            conn.execute(notes.insert(), {"id": tenant * 100, "tenant_id": tenant, "body": "x"})
    started = time.monotonic()
    jobs = reencrypt_tenants(notes, "body", [42, 43, *more], batch_size=7)
    # Every key rotated first: one wait of (max_age + 2 s) for all, not one per tenant (12 s).
    assert time.monotonic() - started < 8
    assert [(j.tenant, j.version, j.rows) for j in jobs[:2]] == [("42", 2, ROWS), ("43", 2, 10)]
    assert all(on_version(db, t, 2) == 1 for t in more)
    assert on_version(db, 42, 2) == ROWS and on_version(db, 43, 2) == 10
    assert values(db, 43) == {i: f"{i}-0" for i in range(1001, 1011)}
    with pytest.raises(kf.ConfigurationError, match="tenant="):
        plain = sa.Table("plain", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("v", kf.EncryptedText(key="pii")))  # fmt: skip
        reencrypt_tenant(plain, "v", 42)


NOTES_MODELS = """\
import sqlalchemy as sa
import sqlalchemy_kms_field as kf

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("body", kf.EncryptedText(key="pii", tenant="tenant_id")),
)
"""


def test_the_command_rotates_named_tenants_or_all(
    db: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    from tests.test_cli import Cli, clean_environment

    (tmp_path / "notes_models.py").write_text(NOTES_MODELS, encoding="utf-8")
    key_file = tmp_path / "master.b64"
    cli = Cli(
        tmp_path,
        {**clean_environment(), "KMS_FIELD_DATABASE_URL": db_url, "KMS_FIELD_ACTIVE_TTL": "0",
         "KMS_FIELD_MASTER_KEY": "local-env:KF_TEST_MASTER", "KF_TEST_MASTER": MASTER_KEY_B64,
         "KMS_FIELD_MODELS": "notes_models:metadata", "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    del key_file
    other = raw(db, 43)
    out = cli("tenants", "rotate", "pii", "42").stdout
    assert f"tenant '42': key version 2, {ROWS} rows re-encrypted (notes.body)" in out
    assert on_version(db, 42, 2) == ROWS and raw(db, 43) == other
    out = cli("tenants", "rotate", "pii", "--all").stdout
    assert "tenant '42': key version 3" in out and "tenant '43': key version 2, 10 rows" in out
    assert values(db, 42) == {i: f"{i}-0" for i in range(1, ROWS + 1)}
    cli("tenants", "rotate", "pii", code=2)  # neither tenants nor --all
    # The intermediate key's rotation, then every tenant key rewrapped: no value row touched.
    before = {**raw(db, 42), **raw(db, 43)}
    cli("keys", "rotate", "pii")
    out = cli("tenants", "rewrap", "pii").stdout
    assert "5 tenant key versions rewrapped under 'pii' version 2" in out
    assert {**raw(db, 42), **raw(db, 43)} == before
    tenants.get_keyring().forget()
    assert values(db, 42) == {i: f"{i}-0" for i in range(1, ROWS + 1)}
    listed = cli("tenants", "list", "pii").stdout
    assert "2 tenants, 5 key versions" in listed


def test_the_job_outwaits_a_process_still_writing_under_the_old_version(
    db: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    ttl = 3.0  # longer than the 2 s margin, so that only the wait for active_ttl covers it
    kf.get_registry().active_ttl = ttl  # the job's active_ttl is the application's
    tenants.configure_tenants()
    ready, stop, out = tmp_path / "ready", tmp_path / "stop", tmp_path / "out.json"
    env = {"KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64, "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    script = str(ROOT / "tests/scripts/tenant_app_writer.py")
    writer = subprocess.Popen(
        [sys.executable, script, db_url, str(ttl), str(ROWS), str(ready), str(stop), str(out)],
        stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the writer did not start"
        rotated = time.monotonic()
        kf.rotate_tenant_key("pii", 42)  # the writer goes on under version 1 for up to ttl
        job = reencrypt_tenant(notes, "body", 42, batch_size=8)
        took = time.monotonic() - rotated
    finally:
        stop.touch()
        _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    report = json.loads(out.read_text())
    assert took >= ttl + 2  # it waited for every process to have moved to version 2
    assert job.version == 2
    assert on_version(db, 42, 2) == ROWS  # nothing left behind on version 1
    expected = {i: f"{i}-0" for i in range(1, ROWS + 1)}
    expected.update({int(k): v for k, v in report["last"].items()})
    assert values(db, 42) == expected
