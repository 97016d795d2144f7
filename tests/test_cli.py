"""The kms-field command line, run for real as a subprocess and configured only by environment
variables or a config file, on every database (and AWS KMS through moto's server).

The test process writes and reads rows through the column types, with a registry configured on
the same key file and database, to check what the command line did to them.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pty
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import registry as kf_registry
from tests.helpers import assert_no_secret, raw_values, reset_global_registry, unwrapped_key
from tests.kms_server import KmsServer

CLI = [sys.executable, "-m", "sqlalchemy_kms_field.cli"]

MODELS = """\
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import registry as kf_registry

metadata = sa.MetaData()
users = sa.Table(
    "cli_users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("email", kf.EncryptedString(320, key="pii")),
)
"""
MODELS_SETTING = "cli_models:metadata"

# An ORM model with a blind index, in a module of its own so that the tests above never see it.
PEOPLE_MODELS = """\
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_kms_field as kf


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "cli_people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key="email-index", normalizer="email"), unique=True
    )
"""
PEOPLE_SETTING = "cli_people:Base"
INDEX_KEY = "email-index"


@dataclass
class Cli:
    """Runs ``kms-field`` in ``cwd`` with exactly ``env`` (plus per-call additions)."""

    cwd: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, code: int = 0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*CLI, *args],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.outputs += [proc.stdout, proc.stderr]
        assert proc.returncode == code, (
            f"kms-field {' '.join(args)} exited {proc.returncode}, expected {code}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        if code:  # one line of ours, or argparse's usage and its error line
            assert re.search(r"^kms-field[ a-z-]*: error: ", proc.stderr, re.M), proc.stderr
        return proc

    def assert_never_printed(self, secrets: list[bytes], plaintexts: list[str]) -> None:
        text = "\n".join(self.outputs)
        assert_no_secret(text, secrets)
        for value in plaintexts:
            assert value not in text, f"plaintext {value!r} in the output"


def clean_environment() -> dict[str, str]:
    """This process's environment without any kms-field setting, and with UTF-8 output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_FIELD_") and k != "COLUMNS"}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    (path / "cli_models.py").write_text(MODELS, encoding="utf-8")
    (path / "cli_people.py").write_text(PEOPLE_MODELS, encoding="utf-8")
    return path


@pytest.fixture
def cli(work: Path) -> Cli:
    # The test process is the application here, with active_ttl=0: the command line need not
    # wait for other processes after a rotation.
    return Cli(work, {**clean_environment(), "KMS_FIELD_ACTIVE_TTL": "0"})


def load_module(path: Path) -> ModuleType:
    """A module the command line imports by name, loaded in this process under a name of its
    own (each test gets fresh tables and classes)."""
    spec = importlib.util.spec_from_file_location(f"{path.stem}_{uuid.uuid4().hex}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def models(work: Path) -> Iterator[ModuleType]:
    """The same models module the command line imports, loaded in this process."""
    yield load_module(work / "cli_models.py")


@pytest.fixture
def people(work: Path) -> Iterator[ModuleType]:
    """The ORM model with a blind index that the command line imports, loaded in this process."""
    yield load_module(work / "cli_people.py")


def configure_here(
    engine: sa.Engine, master_key: kf.MasterKey, monkeypatch: pytest.MonkeyPatch
) -> kf.KeyRegistry:
    reset_global_registry(monkeypatch)
    return kf.configure(master_key=master_key, key_store=kf.SqlKeyStore(engine), active_ttl=0)


def emails(n: int, start: int = 1) -> list[dict[str, Any]]:
    return [{"id": i, "email": f"person.{i}.{uuid.uuid4().hex[:6]}@example.com"}
            for i in range(start, start + n)]  # fmt: skip


def read_emails(engine: sa.Engine, table: sa.Table) -> dict[int, str | None]:
    with engine.connect() as conn:
        return {r.id: r.email for r in conn.execute(sa.select(table).order_by(table.c.id))}


def key_file_secret(path: Path) -> bytes:
    return base64.b64decode(path.read_text(encoding="ascii").strip())


def unwrapped_index_key(registry: kf.KeyRegistry, name: str, version: int) -> bytes:
    stored = registry.key_store.get(name, version)
    context = kf_registry.key_context(name, version, "index")
    return registry.master_key.unwrap(stored.wrapped_key, context, stored.master_key_id)


def count_prefix(engine: sa.Engine, table: str, column: str, prefix: str) -> int:
    """Rows of ``table.column`` whose stored value starts with ``prefix``, by SQL alone."""
    quote = engine.dialect.identifier_preparer.quote
    query = sa.text(f"SELECT count(*) FROM {quote(table)} WHERE {quote(column)} LIKE :p")
    with engine.connect() as conn:
        return int(conn.execute(query, {"p": prefix + "%"}).scalar_one())


# Reading the tables the command prints -----------------------------------------------------


def _cells(line: str) -> list[str] | None:
    if "│" not in line and "┃" not in line:
        return None
    return [c.strip() for c in re.split("[│┃]", line)[1:-1]]


def table_rows(text: str, *required: str) -> list[dict[str, str]]:
    """The rows of the first table printed in ``text`` whose headers include ``required``."""
    lines = text.splitlines()
    found = [
        (i, cells)
        for i, cells in enumerate(map(_cells, lines))
        if cells and all(r in cells for r in required)
    ]
    assert found, f"no table with the columns {required} in:\n{text}"
    start, headers = found[0]
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("└"):
            break
        cells = _cells(line)
        if cells is not None and len(cells) == len(headers):
            rows.append(dict(zip(headers, cells, strict=True)))
    return rows


def census_row(text: str, column: str, title: str | None = None) -> dict[str, str]:
    """The census of ``column`` in the first census table (or the one titled ``title``)."""
    if title is not None:
        assert title in text, text
        text = text.split(title, 1)[1]
    rows = [r for r in table_rows(text, "column", "NULL", "other") if r["column"] == column]
    assert len(rows) == 1, text
    return rows[0]


def setup_database(cli: Cli, db_url: str, key_file: Path) -> None:
    cli.env.update(
        KMS_FIELD_DATABASE_URL=db_url,
        KMS_FIELD_MASTER_KEY=f"local:{key_file}",
        KMS_FIELD_MODELS=MODELS_SETTING,
    )
    out = cli("init-local", str(key_file)).stdout
    assert "NOT FOR PRODUCTION" in out
    assert key_file.stat().st_mode & 0o077 == 0
    setup = cli("setup").stdout
    assert "kms_field_keys: created" in setup
    assert "kms_field_jobs: created" in setup
    created = cli("keys", "create", "pii").stdout
    assert "created data key 'pii' version 1" in created


# The whole life of a data key ---------------------------------------------------------------


def test_rotate_reencrypt_retire_destroy(
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
    users: sa.Table = models.users
    models.metadata.create_all(engine)
    rows = emails(30)
    with engine.begin() as conn:
        conn.execute(users.insert(), [*rows, {"id": 31, "email": None}])
    originals = read_emails(engine, users)

    rotated = cli("keys", "rotate", "pii").stdout
    assert "version 2 is now active" in rotated
    assert "kms-field reencrypt cli_users.email" in rotated

    status = cli("status").stdout
    row = census_row(status, "cli_users.email")
    assert (row["v1 (readable)"], row["v2 (active)"], row["NULL"], row["other"]) == (
        "30", "0", "1", "0",
    )  # fmt: skip
    assert "no unfinished jobs" in status

    refused = cli("keys", "retire", "pii", "--version", "1", code=1).stderr
    assert "still used" in refused and "cli_users.email: 30 rows" in refused
    assert len(refused.strip().splitlines()) == 1

    dry = cli("reencrypt", "cli_users.email", "--dry-run").stdout
    assert (
        "dry run: 30 rows of cli_users.email would be re-encrypted to data key 'pii' version 2"
        in dry
    )
    assert raw_values(engine, "cli_users", "email")[0].startswith("kf2:pii:1:")

    # No --key: the models say cli_users.email is under 'pii'. Not a terminal: plain lines.
    done = cli("reencrypt", "cli_users.email", "--batch-size", "3").stdout
    assert re.search(r"reencrypt cli_users.email: 30/30 rows \(100%\), [\d,]+ rows/s", done), done
    assert "reencrypt cli_users.email: finished" in done
    assert "rows written: 30" in done and "conflicts:    0" in done

    status = cli("status").stdout
    row = census_row(status, "cli_users.email")
    assert (row["v1 (readable)"], row["v2 (active)"], row["NULL"]) == ("0", "30", "1")
    assert "no unfinished jobs" in status
    assert all(
        v is None or v.startswith("kf2:pii:2:") for v in raw_values(engine, "cli_users", "email")
    )
    assert read_emails(engine, users) == originals

    secrets = [key_file_secret(key_file)] + [unwrapped_key(registry, "pii", v) for v in (1, 2)]
    retired = cli("keys", "retire", "pii", "--version", "1").stdout
    assert "retired data key 'pii' version 1" in retired
    row = census_row(retired, "cli_users.email")
    assert (row["v1 (retired)"], row["v2 (active)"]) == ("0", "30")

    refused = cli("keys", "destroy", "pii", "--version", "1", code=1).stderr
    assert "--yes-destroy" in refused
    refused = cli("keys", "destroy", "pii", "--version", "1", "--yes-destroy", code=1).stderr
    assert "grace period of 3 days" in refused and "--skip-grace-period" in refused
    assert (
        "destroyed data key 'pii' version 1"
        in cli(
            "keys", "destroy", "pii", "--version", "1", "--yes-destroy", "--grace-period", "0"
        ).stdout
    )
    listed = table_rows(cli("keys", "list").stdout, "name", "version", "state")
    assert [(r["version"], r["state"]) for r in listed] == [("1", "destroyed"), ("2", "active")]
    registry.forget()
    assert read_emails(engine, users) == originals  # v2 alone reads every row

    cli.assert_never_printed(secrets, [r["email"] for r in rows])


def test_unfinished_job_blocks_rotation_and_undecryptable_rows_are_reported(
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
    rows = emails(10)
    with engine.begin() as conn:
        conn.execute(models.users.insert(), rows)
        # A value with our header that does not authenticate, written around the column type.
        raw = sa.table("cli_users", sa.column("id"), sa.column("email"))
        conn.execute(raw.insert().values(id=11, email="kf2:pii:1:" + "A" * 60))
    cli("keys", "rotate", "pii")

    failed = cli("reencrypt", "cli_users.email", "--batch-size", "4", code=1).stderr
    assert "primary key 11" in failed and "rerun" in failed
    assert len(failed.strip().splitlines()) == 1

    status = cli("status").stdout
    jobs = table_rows(status, "column", "operation", "target version", "rows done")
    assert [(j["column"], j["operation"], j["target version"], j["rows done"]) for j in jobs] == [
        ("cli_users.email", "reencrypt", "2", "8")
    ]
    refused = cli("keys", "rotate", "pii", code=1).stderr
    assert "unfinished" in refused and "--force" in refused and "cli_users.email" in refused
    assert "version 3 is now active" in cli("keys", "rotate", "pii", "--force").stdout

    done = cli("reencrypt", "cli_users.email", "--key", "pii", "--skip-undecryptable").stdout
    assert "reencrypt cli_users.email: finished" in done
    assert re.search(r"WARNING: 1 rows could not be decrypted .* Primary keys: 11\b", done), done
    status = json.loads(cli("status", "--json").stdout)
    assert status["unfinished_jobs"] == []
    [column] = status["columns"]
    assert column["column"] == "cli_users.email" and column["key"] == "pii"
    assert column["by_version"] == {"1": 1, "2": 0, "3": 10}
    assert [(k["version"], k["state"]) for k in status["keys"]] == [
        (1, "readable"), (2, "readable"), (3, "active"),
    ]  # fmt: skip
    refused = cli("keys", "retire", "pii", "--version", "1", code=1).stderr
    assert "cli_users.email: 1 rows" in refused

    cli.assert_never_printed([key_file_secret(key_file)], [r["email"] for r in rows])


def test_encrypt_column_and_back(
    db_url: str, engine: sa.Engine, cli: Cli, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    plain = sa.Table(
        "cli_legacy",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", sa.String(400)),
    )
    plain.metadata.create_all(engine)
    notes = [f"note {i}: Zoë 東京 {uuid.uuid4().hex[:8]}" for i in range(12)]
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "note": n} for i, n in enumerate(notes)])
        conn.execute(plain.insert().values(id=100, note=None))

    usage = cli("encrypt-column", "cli_legacy.note", code=2).stderr
    assert "--key" in usage
    dry = cli("encrypt-column", "cli_legacy.note", "--key", "pii", "--dry-run").stdout
    assert "dry run: 12 rows of cli_legacy.note would be encrypted" in dry
    done = cli("encrypt-column", "cli_legacy.note", "--key", "pii", "--batch-size", "5").stdout
    assert "encrypt cli_legacy.note: finished" in done and "rows written: 12" in done

    stored = raw_values(engine, "cli_legacy", "note")
    assert all(v.startswith("kf2:pii:1:") for v in stored[:-1]) and stored[-1] is None
    encrypted = sa.Table(
        "cli_legacy",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("note", kf.EncryptedString(400, key="pii")),
    )
    with engine.connect() as conn:
        assert [r.note for r in conn.execute(sa.select(encrypted).order_by(encrypted.c.id))] == [
            *notes, None,
        ]  # fmt: skip
    # The job recorded the column: status knows it without the models.
    row = census_row(cli("status", env={"KMS_FIELD_MODELS": ""}).stdout, "cli_legacy.note")
    assert (row["v1 (active)"], row["NULL"], row["other"]) == ("12", "1", "0")

    done = cli("decrypt-column", "cli_legacy.note", "--key", "pii").stdout
    assert "decrypt cli_legacy.note: finished" in done and "rows written: 12" in done
    assert raw_values(engine, "cli_legacy", "note") == [*notes, None]
    status = cli("status", env={"KMS_FIELD_MODELS": ""}).stdout
    assert "no encrypted column is known yet" in status

    cli.assert_never_printed([key_file_secret(key_file)], notes)


# Blind-index keys ---------------------------------------------------------------------------


def test_index_key_rotate_reindex_retire(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,
    work: Path,
    people: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    cli.env["KMS_FIELD_MODELS"] = PEOPLE_SETTING
    created = cli("keys", "create", INDEX_KEY, "--index").stdout
    assert f"created index key '{INDEX_KEY}' version 1" in created
    again = cli("keys", "create", INDEX_KEY, "--index", "--exist-ok").stdout
    assert f"index key '{INDEX_KEY}' already exists" in again
    clash = cli("keys", "create", INDEX_KEY, "--exist-ok", code=1).stderr  # as a data key
    assert "existing index key" in clash
    listed = table_rows(cli("keys", "list").stdout, "name", "version", "kind", "state")
    assert [(r["name"], r["version"], r["kind"], r["state"]) for r in listed] == [
        (INDEX_KEY, "1", "index", "active"), ("pii", "1", "data", "active"),
    ]  # fmt: skip

    registry = configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    Person = people.Person
    people.Base.metadata.create_all(engine)
    first = {i: f"Person.{i}.{uuid.uuid4().hex[:6]}@Example.com" for i in range(1, 21)}
    with Session(engine) as session:
        session.add_all([Person(id=i, email=e) for i, e in first.items()])
        session.add(Person(id=21, email=None))
        session.commit()

    rotated = cli("keys", "rotate", INDEX_KEY).stdout
    assert f"index key '{INDEX_KEY}' version 2 is now active" in rotated
    assert "next: kms-field reindex cli_people.email_index" in rotated
    later = {i: f"Later.{i}.{uuid.uuid4().hex[:6]}@example.COM" for i in range(22, 26)}
    with Session(engine) as session:  # this process sees v2 at once (active_ttl=0)
        session.add_all([Person(id=i, email=e) for i, e in later.items()])
        session.commit()
    everyone = {**first, **later}

    def found(email: str) -> list[int]:
        with Session(engine) as session:
            return list(session.scalars(sa.select(Person.id).where(Person.email == email)))

    assert all(found(e.upper()) == [i] for i, e in everyone.items())  # v1 and v2 both match

    status = cli("status").stdout
    assert table_rows(status, "name", "kind")[0]["kind"] == "index"
    title = f"index key '{INDEX_KEY}': rows per version"
    row = census_row(status, "cli_people.email_index", title)
    assert (row["v1 (readable)"], row["v2 (active)"], row["NULL"], row["other"]) == (
        "20", "4", "1", "0",
    )  # fmt: skip
    assert (
        "cli_people.email_index: 20 rows on older versions: kms-field reindex "
        "cli_people.email_index" in status
    )
    row = census_row(status, "cli_people.email", "data key 'pii': rows per version")
    assert (row["v1 (active)"], row["NULL"]) == ("24", "1")
    [column] = [
        c for c in json.loads(cli("status", "--json").stdout)["columns"] if c["key"] == INDEX_KEY
    ]
    assert (column["column"], column["kind"], column["by_version"]) == (
        "cli_people.email_index", "index", {"1": 20, "2": 4},
    )  # fmt: skip

    refused = cli("keys", "retire", INDEX_KEY, "--version", "1", code=1).stderr
    assert "still used" in refused and "cli_people.email_index: 20 rows" in refused
    assert "kms-field reindex cli_people.email_index" in refused
    assert len(refused.strip().splitlines()) == 1
    wrong = cli("reencrypt", "cli_people.email_index", code=2).stderr
    assert "kms-field reindex cli_people.email_index" in wrong
    # Flags that disagree with the models would make lookups miss rows: refused.
    flags = ["--source", "email", "--key", INDEX_KEY]
    clash = cli("reindex", "cli_people.email_index", *flags, "--normalizer", "lower", code=2)
    assert "normalizer='email'" in clash.stderr and "lookups would miss rows" in clash.stderr

    dry = cli("reindex", "cli_people.email_index", "--dry-run").stdout
    assert (
        "dry run: 20 rows of cli_people.email_index would be reindexed under index key "
        f"'{INDEX_KEY}' version 2; nothing was written" in dry
    )
    done = cli("reindex", "cli_people.email_index", "--batch-size", "7").stdout
    assert re.search(r"reindex cli_people.email_index: 20/20 rows \(100%\)", done), done
    assert "reindex cli_people.email_index: finished" in done and "rows written: 20" in done
    assert count_prefix(engine, "cli_people", "email_index", f"kf2:{INDEX_KEY}:2:") == 24
    assert count_prefix(engine, "cli_people", "email_index", f"kf2:{INDEX_KEY}:1:") == 0
    status = json.loads(cli("status", "--json").stdout)
    assert status["unfinished_jobs"] == []
    [column] = [c for c in status["columns"] if c["key"] == INDEX_KEY]
    assert (column["by_version"], column["nulls"]) == ({"1": 0, "2": 24}, 1)

    secrets = [key_file_secret(key_file), unwrapped_key(registry, "pii", 1)]
    secrets += [unwrapped_index_key(registry, INDEX_KEY, v) for v in (1, 2)]
    retired = cli("keys", "retire", INDEX_KEY, "--version", "1").stdout
    assert f"retired index key '{INDEX_KEY}' version 1" in retired
    row = census_row(retired, "cli_people.email_index")
    assert (row["v1 (retired)"], row["v2 (active)"]) == ("0", "24")
    registry.forget()
    assert [k.version for k in registry.index_keys(INDEX_KEY)] == [2]  # v1 no longer matches
    assert all(found(e.upper()) == [i] for i, e in everyone.items())
    assert all(found(f" {e.lower()} ") == [i] for i, e in everyone.items())  # normalized
    assert found("nobody@example.com") == []

    cli.assert_never_printed(secrets, list(everyone.values()))


def test_encrypt_column_with_its_index_and_reindex_from_flags(
    db_url: str, engine: sa.Engine, cli: Cli, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No models: the blind index comes from flags; an unfinished reindex blocks rotation."""
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    cli.env["KMS_FIELD_MODELS"] = ""
    cli("keys", "create", INDEX_KEY, "--index")
    registry = configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    plain = sa.Table(
        "cli_contacts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(400)),
        sa.Column("email_index", sa.String(100)),
    )
    plain.metadata.create_all(engine)
    contacts = {i: f"Contact.{i}.{uuid.uuid4().hex[:6]}@Example.org" for i in range(1, 13)}
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "email": e} for i, e in contacts.items()])
        conn.execute(plain.insert().values(id=13, email=None))

    encrypt = ["encrypt-column", "cli_contacts.email", "--key", "pii"]
    usage = cli(*encrypt, "--index-key", INDEX_KEY, code=2).stderr
    assert "--index-column" in usage
    usage = cli(*encrypt, "--index-column", "email_index", code=2).stderr
    assert "no blind index is declared for cli_contacts.email_index" in usage
    assert "--index-key NAME --normalizer NAME" in usage
    usage = cli(*encrypt, "--index-column", "email_index", "--index-key", INDEX_KEY,
                "--normalizer", "email,shout", code=2).stderr  # fmt: skip
    assert "unknown normalizer shout" in usage
    index = ["--index-column", "email_index", "--index-key", INDEX_KEY, "--normalizer", "email"]
    done = cli(*encrypt, *index, "--batch-size", "5").stdout
    assert f"blind index email_index computed under index key '{INDEX_KEY}' version 1" in done
    assert "encrypt cli_contacts.email: finished" in done and "rows written: 12" in done
    assert count_prefix(engine, "cli_contacts", "email", "kf2:pii:1:") == 12
    assert count_prefix(engine, "cli_contacts", "email_index", f"kf2:{INDEX_KEY}:1:") == 12

    encrypted = sa.Table(
        "cli_contacts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", kf.EncryptedString(400, key="pii")),
        sa.Column("email_index", kf.BlindIndex("email", key=INDEX_KEY, normalizer="email")),
    )

    def found(email: str) -> list[int]:
        query = sa.select(encrypted.c.id).where(encrypted.c.email == email)
        with engine.connect() as conn:
            return list(conn.scalars(query))

    assert all(found(e.upper()) == [i] for i, e in contacts.items())
    # The job recorded both columns, under their keys: status knows them without models.
    status = cli("status").stdout
    row = census_row(status, "cli_contacts.email_index", f"index key '{INDEX_KEY}'")
    assert (row["v1 (active)"], row["NULL"]) == ("12", "1")
    row = census_row(status, "cli_contacts.email", "data key 'pii'")
    assert (row["v1 (active)"], row["NULL"]) == ("12", "1")

    # A row whose source cannot be decrypted stops the reindex half way: an unfinished job.
    with engine.begin() as conn:
        raw = sa.table("cli_contacts", sa.column("id"), sa.column("email"))
        conn.execute(raw.insert().values(id=100, email="kf2:pii:1:" + "A" * 60))
    cli("keys", "rotate", INDEX_KEY)
    flags = ["--source", "email", "--key", INDEX_KEY, "--normalizer", "email"]
    reindex = ["reindex", "cli_contacts.email_index", *flags]
    failed = cli(*reindex, "--batch-size", "5", code=1).stderr
    assert "primary key 100" in failed and "rerun" in failed
    jobs = table_rows(cli("status").stdout, "column", "operation", "target version", "rows done")
    shown = [(j["column"], j["operation"], j["key"], j["target version"], j["rows done"])
             for j in jobs]  # fmt: skip
    assert shown == [("cli_contacts.email_index", "reindex", INDEX_KEY, "2", "10")]
    refused = cli("keys", "rotate", INDEX_KEY, code=1).stderr
    assert "unfinished" in refused and "reindex of cli_contacts.email_index" in refused
    assert "kms-field reindex TABLE.COLUMN" in refused and "--force" in refused

    with engine.begin() as conn:
        conn.execute(raw.delete().where(raw.c.id == 100))
    done = cli(*reindex).stdout  # resumes after the last committed batch
    assert "reindex cli_contacts.email_index: finished" in done and "rows written: 2" in done
    assert count_prefix(engine, "cli_contacts", "email_index", f"kf2:{INDEX_KEY}:2:") == 12
    assert "version 3 is now active" in cli("keys", "rotate", INDEX_KEY).stdout
    assert all(found(e.lower()) == [i] for i, e in contacts.items())

    secrets = [key_file_secret(key_file), unwrapped_key(registry, "pii", 1)]
    secrets += [unwrapped_index_key(registry, INDEX_KEY, v) for v in (1, 2, 3)]
    cli.assert_never_printed(secrets, list(contacts.values()))


# AWS KMS ------------------------------------------------------------------------------------


def test_rewrap_from_a_local_key_to_aws_kms(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,
    work: Path,
    models: ModuleType,
    kms: KmsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    alias = f"alias/kf-cli-{uuid.uuid4().hex[:8]}"
    kms.create_alias(alias, kms.create_key("kms-field cli test"))
    cli.env.update(kms.env())
    setup_database(cli, db_url, key_file)
    local = configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    models.metadata.create_all(engine)
    rows = emails(6)
    with engine.begin() as conn:
        conn.execute(models.users.insert(), rows[:3])
    cli("keys", "rotate", "pii")
    with engine.begin() as conn:
        conn.execute(models.users.insert(), rows[3:])  # rows on v1 and on v2
    originals = read_emails(engine, models.users)
    stored_before = raw_values(engine, "cli_users", "email")
    secrets = [key_file_secret(key_file)] + [unwrapped_key(local, "pii", v) for v in (1, 2)]

    aws = {"KMS_FIELD_MASTER_KEY": f"aws-kms:{alias}"}
    missing = cli("keys", "rewrap", env=aws, code=2).stderr
    assert "KMS_FIELD_PREVIOUS_MASTER_KEYS" in missing
    aws["KMS_FIELD_PREVIOUS_MASTER_KEYS"] = f"local:{key_file}"
    out = cli("keys", "rewrap", env=aws).stdout
    moved = table_rows(out, "name", "version", "from master key", "to master key")
    local_id = kf.LocalMasterKey.from_file(key_file).key_id
    assert [(r["version"], r["from master key"]) for r in moved] == [
        ("1", local_id),
        ("2", local_id),
    ]
    assert all(r["to master key"].startswith("aws-kms:arn:aws:kms:") for r in moved)

    created = cli("keys", "create", "contact", env=aws).stdout
    assert "created data key 'contact' version 1: wrapped by aws-kms:arn:aws:kms:" in created
    listed = table_rows(cli("keys", "list", env=aws).stdout, "name", "master key id")
    assert len(listed) == 3 and all(r["master key id"].startswith("aws-kms:") for r in listed)

    # No data row changed, and the AWS key alone reads them all; the local key no longer does.
    assert raw_values(engine, "cli_users", "email") == stored_before
    configure_here(engine, kf.AwsKmsMasterKey(alias, client=kms.client()), monkeypatch)
    assert read_emails(engine, models.users) == originals
    with pytest.raises(kf.MasterKeyError, match="previous_master_keys"):
        kf.KeyRegistry(kf.LocalMasterKey.from_file(key_file), kf.SqlKeyStore(engine)).data_key(
            "pii", 1
        )
    row = census_row(cli("status", env=aws).stdout, "cli_users.email")
    assert (row["v1 (readable)"], row["v2 (active)"]) == ("3", "3")

    cli.assert_never_printed(secrets, [r["email"] for r in rows])


# Configuration ------------------------------------------------------------------------------


def test_missing_configuration_is_exit_2_naming_the_setting(cli: Cli, work: Path) -> None:
    for command in (["keys", "list"], ["status"], ["setup"], ["reencrypt", "t.c", "--key", "k"]):
        err = cli(*command, code=2).stderr
        assert "KMS_FIELD_DATABASE_URL" in err and "--database-url" in err, err
        assert len(err.strip().splitlines()) == 1

    cli.env["KMS_FIELD_DATABASE_URL"] = f"sqlite:///{work / 'app.db'}"
    err = cli("keys", "create", "pii", code=2).stderr
    assert "KMS_FIELD_MASTER_KEY" in err and "aws-kms:" in err
    assert not (work / "app.db").exists()  # every setting is checked before the database

    err = cli("keys", "list", code=2).stderr  # a mistyped path: no empty file left behind
    assert "does not exist" in err and "kms-field setup" in err
    assert not (work / "app.db").exists()

    err = cli("keys", "create", "pii", env={"KMS_FIELD_MASTER_KEY": "vault:x"}, code=2).stderr
    assert "KMS_FIELD_MASTER_KEY" in err and "local-env:" in err
    err = cli("keys", "create", "pii", env={"KMS_FIELD_MASTER_KEY": "local:nope.key"}, code=2)
    assert "nope.key" in err.stderr and "init-local" in err.stderr
    # A key pasted where a path belongs is refused without being echoed.
    pasted = base64.b64encode(os.urandom(32)).decode()
    for command in (["keys", "create", "pii"], ["config"]):
        proc = cli(*command, env={"KMS_FIELD_MASTER_KEY": f"local:{pasted}"},
                   code=2 if command[0] == "keys" else 0)  # fmt: skip
        assert pasted not in proc.stdout + proc.stderr
    err = cli("status", env={"KMS_FIELD_DATABASE_URL": "nodb://x"}, code=2).stderr
    assert "KMS_FIELD_DATABASE_URL" in err
    cli("setup", env={"KMS_FIELD_MODELS": "no_such_module:Base"})
    err = cli("status", env={"KMS_FIELD_MODELS": "no_such_module:Base"}, code=2).stderr
    assert "no_such_module" in err and "KMS_FIELD_MODELS" in err


def test_config_file_environment_and_flag_precedence(cli: Cli, work: Path) -> None:
    def settings(*args: str, env: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
        rows = table_rows(cli("config", *args, env=env).stdout, "setting", "value", "from")
        return {r["setting"]: (r["value"], r["from"]) for r in rows}

    assert settings()["database_url"] == ("-", "not set (KMS_FIELD_DATABASE_URL)")
    (work / "pyproject.toml").write_text(
        '[project]\nname = "app"\n\n[tool.kms-field]\ndatabase_url = "sqlite:///pyproject.db"\n'
        'models = "cli_models:metadata"\n',
        encoding="utf-8",
    )
    found = settings()
    assert found["database_url"] == (
        "sqlite:///pyproject.db",
        f"{work / 'pyproject.toml'} (database_url)",
    )
    assert found["models"][0] == "cli_models:metadata"

    (work / "kms-field.toml").write_text(
        'database_url = "postgresql+psycopg://app:s3cret@db.internal/app"\n'
        'master_key = "local:keys/dev.key"\nprevious_master_keys = ["local:/abs/old.key", '
        '"aws-kms:alias/old"]\n',
        encoding="utf-8",
    )
    found = settings()  # kms-field.toml wins over pyproject.toml, and hides the password
    source = str(work / "kms-field.toml")
    assert found["database_url"] == (
        "postgresql+psycopg://app:***@db.internal/app",
        f"{source} (database_url)",
    )
    assert found["master_key"] == (f"local:{work / 'keys/dev.key'}", f"{source} (master_key)")
    assert found["previous_master_keys"][0] == "local:/abs/old.key, aws-kms:alias/old"
    assert found["models"][1].startswith("not set")
    assert "s3cret" not in "\n".join(cli.outputs)

    env = {
        "KMS_FIELD_DATABASE_URL": "sqlite:///env.db",
        "KMS_FIELD_MASTER_KEY": "aws-kms:alias/env",
    }
    found = settings(env=env)
    assert found["database_url"] == ("sqlite:///env.db", "KMS_FIELD_DATABASE_URL")
    assert found["master_key"] == ("aws-kms:alias/env", "KMS_FIELD_MASTER_KEY")
    assert found["previous_master_keys"][1] == f"{source} (previous_master_keys)"
    found = settings("--database-url", "sqlite:///flag.db", env=env)  # after the command too
    assert found["database_url"] == ("sqlite:///flag.db", "--database-url")
    found = settings(env={**env, "KMS_FIELD_PREVIOUS_MASTER_KEYS": "local:a.key, local:b.key"})
    assert found["previous_master_keys"] == (
        "local:a.key, local:b.key",
        "KMS_FIELD_PREVIOUS_MASTER_KEYS",
    )

    other = work / "other.toml"
    other.write_text('database_url = "sqlite:///other.db"\n', encoding="utf-8")
    assert settings("--config", str(other))["database_url"][0] == "sqlite:///other.db"
    other.write_text('database_url = "sqlite:///other.db"\nmaster-key = "x"\ncolour = 1\n')
    err = cli("--config", str(other), "config", code=2).stderr
    assert "unknown setting 'colour'" in err
    err = cli("--config", str(work / "missing.toml"), "config", code=2).stderr
    assert "missing.toml" in err


@pytest.mark.databases("sqlite")
def test_settings_take_effect_in_order_file_env_flag(
    cli: Cli, work: Path, tmp_path: Path, database: str
) -> None:
    """Not only shown: each database gets the key created under the setting that won."""
    file_db, env_db = tmp_path / "file.db", tmp_path / "env.db"
    (work / "kms-field.toml").write_text(
        f'database_url = "sqlite:///{file_db}"\nmaster_key = "local:dev.key"\n', encoding="utf-8"
    )
    cli("init-local", "dev.key")
    cli("setup")
    assert "kms_field_keys: already there" in cli("create-tables").stdout  # alias, idempotent
    cli("keys", "create", "from-file")
    env = {"KMS_FIELD_DATABASE_URL": f"sqlite:///{env_db}"}
    cli("setup", env=env)
    cli("keys", "create", "from-env", env=env)

    def names(*args: str, env: dict[str, str] | None = None) -> list[str]:
        out = cli("keys", "list", *args, env=env).stdout
        return [r["name"] for r in table_rows(out, "name", "version")]

    assert names() == ["from-file"]
    assert names(env=env) == ["from-env"]
    assert names("--database-url", f"sqlite:///{file_db}", env=env) == ["from-file"]


def test_without_rich_the_cli_says_how_to_install_it(work: Path) -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from sqlalchemy_kms_field.cli import main\n"
        "raise SystemExit(main(['config']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=clean_environment(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'sqlalchemy-kms-field[cli]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    help_text = subprocess.run([sys.executable, "-c", code.replace("'config'", "'--help'")],
                               cwd=work, env=clean_environment(), capture_output=True, text=True,
                               timeout=60)  # fmt: skip
    assert help_text.returncode == 0
    for setting in (
        "KMS_FIELD_DATABASE_URL",
        "KMS_FIELD_MASTER_KEY",
        "local-env:",
        "KMS_FIELD_PREVIOUS_MASTER_KEYS",
        "KMS_FIELD_MODELS",
        "[tool.kms-field]",
    ):
        assert setting in help_text.stdout  # fmt: skip


@pytest.mark.databases("sqlite")
def test_progress_bar_on_a_terminal(
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
        conn.execute(models.users.insert(), emails(30))
    cli("keys", "rotate", "pii")

    leader, follower = pty.openpty()
    env = {**cli.env, "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen([*CLI, "reencrypt", "cli_users.email", "--batch-size", "3"],
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
    assert "30/30" in output and "rows/s" in output
    assert "(100%)" not in output  # no plain log lines on a terminal
    assert "reencrypt cli_users.email: finished" in output
