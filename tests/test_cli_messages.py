"""What the command line says to a new user: commands and flags (never Python calls), URLs it
cannot use named with the one to write, a mistyped SQLite path left alone, waits explained,
`status` bounded in width, `keys rewrap` touching only what needs it.

Every command runs for real as a subprocess (tests/test_cli.py's runner).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from tests.test_cli import Cli, clean_environment, configure_here, emails, setup_database

PYTHON_CALL = re.compile(r"\b[a-z_]+\(|\b[a-z_]+=")  # create_data_key(, confirm=, codec=


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    work = tmp_path / "work"
    work.mkdir()
    from tests.test_cli import MODELS

    (work / "cli_models.py").write_text(MODELS, encoding="utf-8")
    return Cli(work, {**clean_environment(), "KMS_FIELD_ACTIVE_TTL": "0"})


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_cli_language(line: str) -> None:
    found = PYTHON_CALL.search(line.replace("context=...", "").replace("bind_to=...", ""))
    assert found is None, f"Python in a command-line message ({found.group(0)!r}): {line}"


@pytest.mark.databases("sqlite")
def test_a_missing_key_is_named_with_the_command_that_creates_it(
    cli: Cli, db_url: str, tmp_path: Path
) -> None:
    setup_database(cli, db_url, tmp_path / "dev.key")
    line = error_line(cli("reencrypt", "cli_users.email", "--key", "pi", code=1))
    assert "`kms-field keys create pi`" in line and "--index" in line, line
    assert_cli_language(line)


@pytest.mark.databases("sqlite")
def test_a_bad_context_flag_is_answered_in_flags(cli: Cli, db_url: str, tmp_path: Path) -> None:
    setup_database(cli, db_url, tmp_path / "dev.key")
    line = error_line(
        cli("reencrypt", "cli_users.email", "--key", "pii", "--context", "bad", code=1)
    )
    assert line == "kms-field: error: --context 'bad': write it as TABLE.COLUMN (one dot)", line


@pytest.mark.databases("sqlite")
def test_destroy_and_undecryptable_rows_name_flags_and_no_false_comfort(
    cli: Cli, db_url: str, engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "dev.key"
    setup_database(cli, db_url, key_file)
    registry = configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    users = sa.Table(
        "cli_users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    users.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(users.insert(), emails(3))
        stored = conn.execute(sa.text("SELECT email FROM cli_users WHERE id = 2")).scalar_one()
        tampered = stored[:-4] + ("AAAA" if not stored.endswith("AAAA") else "BBBB")
        conn.execute(sa.text("UPDATE cli_users SET email = :v WHERE id = 2"), {"v": tampered})
    registry.rotate_data_key("pii")

    line = error_line(cli("reencrypt", "cli_users.email", code=1))
    assert "primary key 2" in line, line
    assert "every row is readable" not in line  # row 2 is not
    assert "--skip-undecryptable" in line, line
    assert_cli_language(line)

    cli("keys", "create", "spare")
    cli("keys", "rotate", "spare")
    time.sleep(2.2)  # active_ttl (0 s) plus the 2 s margin since the rotation
    cli("keys", "retire", "spare", "--version", "1")
    line = error_line(cli("keys", "destroy", "spare", "--version", "1", code=1))
    assert "--yes-destroy" in line, line
    assert_cli_language(line)
    line = error_line(cli("keys", "destroy", "spare", "--version", "1", "--yes-destroy", code=1))
    assert "--skip-grace-period" in line, line
    assert_cli_language(line)


@pytest.mark.databases("sqlite")
def test_rotate_states_the_active_ttl_in_use(cli: Cli, db_url: str, tmp_path: Path) -> None:
    setup_database(cli, db_url, tmp_path / "dev.key")
    out = cli("keys", "rotate", "pii", env={"KMS_FIELD_ACTIVE_TTL": "7"}).stdout
    assert "active_ttl (7 s from KMS_FIELD_ACTIVE_TTL here" in out, out
    assert "60 s" not in out
    del cli.env["KMS_FIELD_ACTIVE_TTL"]
    out = cli("keys", "rotate", "pii", "--force").stdout
    assert "active_ttl (60 s by default here" in out, out


@pytest.mark.parametrize(
    ("url", "better"),
    [
        ("postgres://app@db.internal/app", "postgresql+psycopg://"),
        ("mysql://root@127.0.0.1/app", "mysql+pymysql://"),
    ],
)
def test_urls_without_our_drivers_name_the_url_to_write(cli: Cli, url: str, better: str) -> None:
    line = error_line(cli("status", env={"KMS_FIELD_DATABASE_URL": url}, code=2))
    assert better in line and "KMS_FIELD_DATABASE_URL" in line, line


def test_status_on_a_mistyped_sqlite_path_creates_no_file(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    line = error_line(cli("status", env={"KMS_FIELD_DATABASE_URL": f"sqlite:///{path}"}, code=2))
    assert str(path) in line and "does not exist" in line and "kms-field setup" in line, line
    assert not path.exists()
    relative = error_line(
        cli("keys", "list", env={"KMS_FIELD_DATABASE_URL": "sqlite:///x.db"}, code=2)
    )
    assert str(cli.cwd / "x.db") in relative
    assert not (cli.cwd / "x.db").exists()
    # `setup` is the command that makes a new database.
    cli("setup", env={"KMS_FIELD_DATABASE_URL": f"sqlite:///{path}"})
    assert path.exists()


@pytest.mark.databases("sqlite")
def test_a_job_says_what_it_waits_for_without_verbose(
    cli: Cli, db_url: str, engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "dev.key"
    setup_database(cli, db_url, key_file)
    configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    users = sa.Table(
        "cli_users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    users.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(users.insert(), emails(5))
    cli.env["KMS_FIELD_ACTIVE_TTL"] = "1"
    cli("keys", "rotate", "pii")
    started = time.monotonic()
    proc = cli("reencrypt", "cli_users.email")
    waits = [line for line in proc.stderr.splitlines() if "waiting" in line]
    assert len(waits) == 1, proc.stderr
    assert "active_ttl 1 s" in waits[0] and "'pii' version 2" in waits[0], waits[0]
    assert time.monotonic() - started >= 1  # it did wait


@pytest.mark.databases("sqlite")
def test_status_stays_narrow_after_many_rotations(
    cli: Cli, db_url: str, engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "dev.key"
    setup_database(cli, db_url, key_file)
    registry = configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    users = sa.Table(
        "cli_users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    users.metadata.create_all(engine)
    for version in range(2, 13):  # rows left on every version
        with engine.begin() as conn:
            conn.execute(users.insert(), emails(1, start=version))
        registry.rotate_data_key("pii")
    cli("reencrypt", "cli_users.email", "--dry-run")  # records nothing; models declare it
    out = cli("status", env={"COLUMNS": "200"}).stdout
    census = [line for line in out.splitlines() if "cli_users.email" in line and "│" in line]
    assert len(census) == 1, out
    assert census[0].count("│") <= 12, census[
        0
    ]  # column, 4 versions, 2 formats, NULL, other, total
    assert "older" in out  # the older versions' rows, summed
    total = re.findall(r"\d+", census[0].split("│")[-2])
    assert total == ["11"], census[0]


@pytest.mark.databases("sqlite")
def test_rewrap_touches_only_the_versions_that_need_it(
    cli: Cli, db_url: str, tmp_path: Path
) -> None:
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    setup_database(cli, db_url, old_key)
    cli("keys", "create", "other")
    cli("keys", "rotate", "pii")
    cli("keys", "rotate", "pii", "--force")
    cli("init-local", str(new_key))
    moved = {
        "KMS_FIELD_MASTER_KEY": f"local:{new_key}",
        "KMS_FIELD_PREVIOUS_MASTER_KEYS": f"local:{old_key}",
    }
    first = cli("keys", "rewrap", "pii", env=moved).stdout
    assert "3 data key versions rewrapped" in first, first
    second = cli("keys", "rewrap", env=moved).stdout
    assert "1 data key version rewrapped" in second, second
    assert "3 key versions are already wrapped by the master key" in second, second
    third = cli("keys", "rewrap", env=moved).stdout
    assert "no key version to rewrap" in third, third


HELP_IMPORTS = """
import sys
from sqlalchemy_kms_field.cli import main

status = [main([*args, "--help"]) for args in ([], ["keys"], ["reencrypt"], ["keys", "destroy"])]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"sqlalchemy", "rich", "boto3", "botocore"})
print(status, heavy, file=sys.stderr)
"""


def test_kms_field_help_imports_nothing_heavy() -> None:
    """`kms-field --help` (and each command's) imports neither SQLAlchemy nor rich nor boto3:
    it took over a second on a busy machine (README, Performance: bench_cli_help.py)."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: kms-field keys destroy" in proc.stdout
    assert proc.stderr.strip() == "[0, 0, 0, 0] []", proc.stderr
