"""Workers and job control from the command line: ``--workers N`` runs N processes on one job;
``jobs status|pause|resume|cancel``; ``forget-column`` for a column encrypted by mistake."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.reencrypt.tables import FINISH, ranges_table
from tests.test_cli import (
    CLI,
    Cli,
    cli,  # noqa: F401 (a fixture)
    configure_here,
    count_prefix,
    emails,
    models,  # noqa: F401 (a fixture)
    setup_database,
    work,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.databases("postgresql", "mariadb")


def test_workers_n_runs_n_processes_on_one_job(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,  # noqa: F811
    work: Path,  # noqa: F811
    models: ModuleType,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    models.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(models.users.insert(), emails(240))
    cli("keys", "rotate", "pii")
    # Rate-limited so that the two joining processes (a second or so to start) get ranges.
    out = cli(
        "reencrypt", "cli_users.email", "--workers", "3", "--batch-size", "4",
        "--range-rows", "8", "--rate", "40", "--lease", "3",
    ).stdout  # fmt: skip
    assert "reencrypt cli_users.email: finished" in out
    assert count_prefix(engine, "cli_users", "email", "kf2:pii:2:") == 240
    r = ranges_table.c
    with engine.connect() as conn:
        owners = (
            conn.execute(
                sa.select(r.owner).where(r.table_name == "cli_users", r.range_no != FINISH)
            )
            .scalars()
            .all()
        )
    processes = {owner.split(":")[1] for owner in owners}
    assert len(owners) >= 30 and len(processes) >= 2, "ranges were shared between processes"

    refused = cli("reencrypt", "cli_users.email", "--workers", "2", "--join", code=2).stderr
    assert "--join adds this process" in refused


def test_pause_resume_cancel_and_forget_a_column_encrypted_by_mistake(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,  # noqa: F811
    work: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE wrong (id INTEGER PRIMARY KEY, body VARCHAR(400))"))
        conn.execute(
            sa.text("INSERT INTO wrong (id, body) VALUES (:i, :b)"),
            [{"i": i, "b": f"plain {i}"} for i in range(1, 1001)],
        )
    job = subprocess.Popen(
        [*CLI, "encrypt-column", "wrong.body", "--key", "pii", "--batch-size", "5",
         "--rate", "25", "--lease", "1.5"],
        cwd=work, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        # A worker shows as "starting" until its first heartbeat: wait for "working".
        while not {"rows done", "working"} <= set(
            re.findall(r"rows done|working", status := cli("jobs", "status").stdout)
        ):
            assert time.monotonic() < deadline and job.poll() is None, status
            time.sleep(0.2)
        assert "encrypt wrong.body" in status

        second = cli("encrypt-column", "wrong.body", "--key", "pii", code=1).stderr
        assert "already running on wrong.body" in second and "--join" in second

        assert "paused" in cli("jobs", "pause", "wrong.body").stdout, cli("jobs", "status").stdout
        time.sleep(1.5)
        held = count_prefix(engine, "wrong", "body", "kf2:pii:1:")
        time.sleep(1.0)
        assert count_prefix(engine, "wrong", "body", "kf2:pii:1:") == held
        assert "(PAUSED)" in cli("jobs", "status").stdout
        cli("jobs", "resume", "wrong.body")

        assert "cancelled encrypt of wrong.body" in cli("jobs", "cancel", "wrong.body").stdout
        _, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1 and "was cancelled" in err
    assert "no job under way" in cli("jobs", "status").stdout
    assert "no unfinished jobs" in cli("status").stdout

    # Still known as encrypted, and still holding ciphertext: forgetting it is refused.
    refused = cli("forget-column", "wrong.body", code=1).stderr
    assert "decrypt the column first" in refused and "kms-field decrypt-column" in refused
    cli("decrypt-column", "wrong.body", "--key", "pii")
    assert count_prefix(engine, "wrong", "body", "kf") == 0
    missing = cli("forget-column", "wrong.body", code=1).stderr
    assert "not a known encrypted column" in missing
