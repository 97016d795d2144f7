"""A new user's first hour: the README's start-up snippet started twice, the library used before
its key table exists, and an installation without the [aws] extra.

Each starts a real interpreter, as a user's application would start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError

from tests.kms_server import KmsServer
from tests.test_alembic_setup import readme_block

README_URL = '"postgresql+psycopg://app@db/app"'

# Hides boto3 and botocore from the interpreter, as an installation without the [aws] extra.
WITHOUT_BOTO3 = textwrap.dedent("""
    import importlib.abc
    import sys


    class _NoAws(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("boto3", "botocore"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, _NoAws())
    """)


def python(
    code: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def start_up_snippet(db_url: str) -> str:
    code = readme_block("<!-- start-up -->")
    assert code.count(README_URL) == 1, "the README's start-up snippet changed its URL"
    return code.replace(README_URL, repr(db_url))


APPLICATION = """
from sqlalchemy.orm import Session

Base.metadata.create_all(engine)
with Session(engine) as session:
    n = session.query(User).count()
    session.add(User(id=n + 1, email=f"user{n + 1}@example.com"))
    session.commit()
    print(sorted(u.email for u in session.query(User)))
"""


def test_the_start_up_snippet_starts_twice(db_url: str, kms: KmsServer, tmp_path: Path) -> None:
    try:
        kms.create_alias("alias/app-pii", kms.create_key("README start-up snippet"))
    except ClientError as exc:  # made by an earlier test of this session: any key will do
        assert exc.response["Error"]["Code"] == "AlreadyExistsException"
    code = start_up_snippet(db_url) + APPLICATION
    first = python(code, tmp_path, kms.env())
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "['user1@example.com']"
    # The second start of the same application: the key exists, and is used again.
    second = python(code, tmp_path, kms.env())
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "['user1@example.com', 'user2@example.com']"
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version FROM kms_field_keys")).scalars()
            assert list(versions) == [1]
    finally:
        engine.dispose()


BEFORE_THE_TABLE = """
import sqlalchemy as sa
import sqlalchemy_kms_field as kf

engine = sa.create_engine({url!r})
kf.configure(master_key=kf.LocalMasterKey.from_bytes(bytes(32)), key_store=kf.SqlKeyStore(engine))
try:
    kf.create_data_key("pii"{exist_ok})
except kf.ConfigurationError as exc:
    print(exc)
"""


@pytest.mark.parametrize("exist_ok", [False, True])
def test_create_data_key_before_the_key_table_says_how_to_create_it(
    db_url: str, tmp_path: Path, exist_ok: bool
) -> None:
    code = BEFORE_THE_TABLE.format(url=db_url, exist_ok=", exist_ok=True" if exist_ok else "")
    run = python(code, tmp_path)
    assert run.returncode == 0, run.stderr  # the ConfigurationError, caught: no driver error
    assert "the key store table 'kms_field_keys' does not exist" in run.stdout, run.stdout
    assert "SqlKeyStore(engine).create_table()" in run.stdout
    assert "op.create_key_store()" in run.stdout


WITHOUT_AWS_API = """
import sqlalchemy as sa
import sqlalchemy_kms_field as kf

engine = sa.create_engine("sqlite://")
store = kf.SqlKeyStore(engine)
store.create_table()
arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
for key in ("alias/app-pii", arn):
    kf.configure(master_key=kf.AwsKmsMasterKey(key), key_store=store)
    try:
        kf.create_data_key("pii", exist_ok=True)
    except kf.ConfigurationError as exc:
        print(exc)
"""


def test_without_the_aws_extra_the_library_says_which_extra() -> None:
    run = python(WITHOUT_BOTO3 + WITHOUT_AWS_API, Path.cwd())
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    expected = (
        "AWS KMS master keys need boto3, which is not installed: "
        "pip install 'sqlalchemy-kms-field[aws]'"
    )
    assert lines == [expected, expected], run.stdout


WITHOUT_AWS_CLI = """
import sys
from sqlalchemy_kms_field.cli import main

sys.exit(main(["setup"]) or main(["keys", "create", "pii"]))
"""


def test_without_the_aws_extra_the_command_line_says_which_extra(tmp_path: Path) -> None:
    env = {
        "KMS_FIELD_DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
        "KMS_FIELD_MASTER_KEY": "aws-kms:alias/app-pii",
    }
    run = python(WITHOUT_BOTO3 + WITHOUT_AWS_CLI, tmp_path, env)
    assert run.returncode == 1, run.stderr
    assert run.stderr == (
        "kms-field: error: AWS KMS master keys need boto3, which is not installed: "
        "pip install 'sqlalchemy-kms-field[aws]'\n"
    )


def test_every_public_name_resolves_from_the_package() -> None:
    """The package loads its names on first use: a name in __all__ that no module defines
    would only fail in a user's application. Job control is part of the public surface."""
    import sqlalchemy_kms_field as kf

    unresolved = [name for name in kf.__all__ if getattr(kf, name, None) is None]
    assert unresolved == []
    assert issubclass(kf.JobConflictError, kf.ReencryptionError)
    assert issubclass(kf.JobCancelled, kf.KmsFieldError)
    assert kf.Pacing.__module__.startswith("sqlalchemy_kms_field.reencrypt")
