"""``kms-field keys retire`` and ``keys destroy`` as a subprocess, on every database: the
census of every column names an undeclared one, destroy waits its grace period unless a loud
flag says otherwise, and says what it erased and what it could not reach."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.cli.output import ScanDisplay
from sqlalchemy_kms_field.scan import ScanProgress
from tests.helpers import unwrapped_key
from tests.test_cli import (
    CLI,
    MODELS,
    Cli,
    census_row,
    clean_environment,
    configure_here,
    emails,
    key_file_secret,
    load_module,
    setup_database,
)

ADDRESSES = ["1 Main St, Springfield", "22 Rue de la Paix, Paris", "5 Baker St, London"]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    (path / "cli_models.py").write_text(MODELS, encoding="utf-8")
    return path


@pytest.fixture
def cli(work: Path) -> Cli:
    return Cli(work, {**clean_environment(), "KMS_FIELD_ACTIVE_TTL": "0"})


@pytest.fixture
def models(work: Path) -> Iterator[ModuleType]:
    yield load_module(work / "cli_models.py")


# The application's other table: the models the command line imports do not declare it.
ORDERS = sa.Table(
    "cli_orders",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("ship_to", kf.EncryptedString(400, key="pii")),
    sa.Column("note", sa.Text),
)


def test_retire_and_destroy_census_every_column(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,
    work: Path,
    models: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    registry = configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    models.metadata.create_all(engine)
    ORDERS.create(engine)
    users = emails(5)
    with engine.begin() as conn:
        conn.execute(models.users.insert(), users)
        conn.execute(ORDERS.insert(), [{"id": i, "ship_to": a} for i, a in enumerate(ADDRESSES)])
    cli("keys", "rotate", "pii")
    cli("reencrypt", "cli_users.email")  # the one column the models declare

    out = cli("keys", "retire", "pii", "--version", "1", code=1)
    assert "cli_orders.ship_to: 3 rows, undeclared" in out.stderr
    assert "--key pii" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "census of data key 'pii' v1: scanned" in out.stdout
    assert " columns that can hold a value) in (default) in " in out.stdout
    assert registry.key_store.get("pii", 1).state is kf.KeyState.READABLE

    cli("reencrypt", "cli_orders.ship_to", "--key", "pii")
    retired = cli("keys", "retire", "pii", "--version", "1").stdout
    assert "retired data key 'pii' version 1" in retired
    assert census_row(retired, "cli_users.email")["v1 (retired)"] == "0"

    refused = cli("keys", "destroy", "pii", "--version", "1", "--yes-destroy", code=1).stderr
    assert "grace period of 3 days ends in" in refused and "--skip-grace-period" in refused
    bad = cli("keys", "destroy", "pii", "--version", "1", "--grace-period", "3x", code=2).stderr
    assert "--grace-period" in bad

    # A copy of an old value lands in a column nobody declared: destroy looks again.
    planted = registry.data_key("pii", 2).encrypt_text(b"x", b"").replace("pii:2:", "pii:1:")
    with engine.begin() as conn:
        conn.execute(ORDERS.update().where(ORDERS.c.id == 0).values(note=planted))
    skip = ["keys", "destroy", "pii", "--version", "1", "--yes-destroy", "--skip-grace-period"]
    out = cli(*skip, code=1)
    assert "WARNING: --skip-grace-period" in out.stdout  # loud, even when refused
    assert "cli_orders.note: 1 rows, undeclared" in out.stderr
    assert registry.key_store.get("pii", 1).wrapped_key != b""
    with engine.begin() as conn:
        conn.execute(ORDERS.update().values(note=None))

    destroyed = cli(*skip).stdout
    assert "WARNING: --skip-grace-period" in destroyed
    assert "destroyed data key 'pii' version 1" in destroyed
    assert "  reached: " in destroyed and "  not reached: " in destroyed
    assert "backups" in destroyed
    if engine.dialect.name == "postgresql":
        assert "VACUUM FULL rewrote the key table" in destroyed
    assert registry.key_store.get("pii", 1).state is kf.KeyState.DESTROYED
    registry.forget()
    with engine.connect() as conn:
        assert conn.execute(sa.select(ORDERS.c.ship_to).order_by(ORDERS.c.id)).scalars().all() == [
            *ADDRESSES
        ]
    secrets = [key_file_secret(key_file), unwrapped_key(registry, "pii", 2)]
    cli.assert_never_printed(secrets, [*ADDRESSES, *(u["email"] for u in users)])


def test_status_counts_each_format_and_the_scan_takes_schemas(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,
    work: Path,
    models: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    registry = configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    models.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(models.users.insert(), emails(4))
        conn.execute(
            sa.text("INSERT INTO cli_users (id, email) VALUES (10, :a), (11, :b)"),
            {"a": "kf1:pii:1:" + "A" * 40, "b": "kf1:pii:1:" + "B" * 40},
        )
    row = census_row(cli("status").stdout, "cli_users.email")
    assert (row["v1 (active)"], row["kf1 rows"], row["kf2 rows"]) == ("6", "2", "4")
    [column] = json.loads(cli("status", "--json").stdout)["columns"]
    assert column["by_format"] == {"kf1": 2, "kf2": 4}

    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM cli_users WHERE id >= 10"))  # they hold no real value
    cli("keys", "rotate", "pii")
    cli("reencrypt", "cli_users.email")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA kf_test_archive")
        conn.exec_driver_sql("CREATE TABLE kf_test_archive.old_users (id INT, email BYTEA)")
        conn.execute(
            sa.text("INSERT INTO kf_test_archive.old_users VALUES (1, :v)"),
            {"v": registry.data_key("pii", 1).encrypt_binary(b"archived", b"")},
        )
    wrong = cli("keys", "retire", "pii", "--version", "1", "--schema", "nowhere", code=1).stderr
    assert "'nowhere' does not exist" in wrong and "--schema" in wrong
    out = cli("keys", "retire", "pii", "--version", "1", "--schema", "kf_test_archive", code=1)
    assert "kf_test_archive.old_users.email: 1 rows, undeclared" in out.stderr
    assert "in (default), kf_test_archive in " in out.stdout
    out = cli("keys", "retire", "pii", "--version", "1", "--all-schemas", code=1)
    assert "kf_test_archive.old_users.email: 1 rows, undeclared" in out.stderr
    assert "in (default), kf_test_archive in " in out.stdout  # public is the default schema


# The scan's progress ---------------------------------------------------------------------------


class Printed:
    """What ScanDisplay needs of the App: a console and say(); lines said are kept."""

    def __init__(self, terminal: bool) -> None:
        from rich.console import Console

        self.console = Console(file=io.StringIO(), force_terminal=terminal, width=120)
        self.lines: list[str] = []

    def say(self, text: str = "", style: str | None = None) -> None:
        self.lines.append(text)


def scan_steps(total: int) -> list[ScanProgress]:
    return [
        ScanProgress(i, total, f"t{i}", 2 * i, i / 10, "(default), kf_test_a")
        for i in range(1, total + 1)
    ]


def test_scan_progress_plain_lines_off_a_terminal() -> None:
    app = Printed(terminal=False)
    with ScanDisplay(app, "census of data key 'pii' v1", every_seconds=0) as display:
        for step in scan_steps(3):
            display(step)
    assert app.lines == [
        "census of data key 'pii' v1: 1/3 tables (t1)",
        "census of data key 'pii' v1: 2/3 tables (t2)",
        "census of data key 'pii' v1: scanned 3 tables (6 columns that can hold a value) in "
        "(default), kf_test_a in 0.3 s",
    ]
    quiet = Printed(terminal=False)
    with ScanDisplay(quiet, "census", every_seconds=60) as display:
        for step in scan_steps(50):
            display(step)
    assert len(quiet.lines) == 1 and "scanned 50 tables" in quiet.lines[0]


@pytest.mark.databases("sqlite")
def test_scan_progress_bar_on_a_terminal(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,
    work: Path,
    models: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    models.metadata.create_all(engine)
    with engine.begin() as conn:
        for i in range(40):  # tables enough for the bar to be drawn
            conn.exec_driver_sql(f"CREATE TABLE t{i:02} (id INTEGER PRIMARY KEY, a TEXT, b BLOB)")
    cli("keys", "rotate", "pii")
    cli("reencrypt", "cli_users.email")

    leader, follower = pty.openpty()
    env = {**cli.env, "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen([*CLI, "keys", "retire", "pii", "--version", "1"],
                            cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=subprocess.PIPE)  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    output = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[" in output  # drawn for a terminal
    assert "tables" in output
    # 40, cli_users, and the 7 tables of kms-field setup (3 where job workers coordinate, 1 of
    # tenant keys)
    assert "scanned 48 tables" in output
    assert "retired data key 'pii' version 1" in output
