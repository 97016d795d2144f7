"""``kms-field status`` shows an unfinished job's rows left, rate and ETA (the figures that
``kms_field.job.*`` publishes for a running job), in its table and in ``--json``."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from tests.test_cli import (  # noqa: F401 - fixtures
    Cli,
    cli,
    configure_here,
    emails,
    models,
    setup_database,
    table_rows,
    work,
)


def test_status_shows_rate_and_eta_of_an_unfinished_job(
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
        conn.execute(models.users.insert(), emails(40))
        raw = sa.table("cli_users", sa.column("id"), sa.column("email"))  # stops the job
        conn.execute(raw.insert().values(id=41, email="kf2:pii:1:" + "A" * 60))
        conn.execute(models.users.insert(), emails(9, start=42))
    cli("keys", "rotate", "pii")
    # Throttled to last 2 s: MariaDB keeps the start and update times in whole seconds.
    cli("reencrypt", "cli_users.email", "--batch-size", "8", "--rate", "20", code=1)

    [job] = json.loads(cli("status", "--json").stdout)["unfinished_jobs"]
    assert job["rows_done"] == 40
    assert job["rows_left"] == 10  # the damaged row and the nine after it
    assert job["rate"] > 0
    assert job["eta_seconds"] == pytest.approx(10 / job["rate"])
    [row] = table_rows(cli("status").stdout, "column", "rows left", "rate", "eta")
    assert row["rows left"] == "10" and row["rate"].endswith("rows/s") and row["eta"].endswith("s")
