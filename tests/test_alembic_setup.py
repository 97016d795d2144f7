"""The README's Alembic set-up, run as a new user runs it: `alembic init`, the README's env.py
as written, `alembic revision --autogenerate` and `alembic upgrade head` as subprocesses.

Also: an env.py that never configured the library gets an error naming env.py; autogenerate of
String -> EncryptedString carries its encrypt_column step; `op.create_key_store()` upgrades a key
table of an earlier release; progress and waits show in Alembic's own log output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.key_store import LIFECYCLE_COLUMNS
from tests.helpers import MASTER_KEY_B64, MASTER_KEY_BYTES

README = Path(__file__).resolve().parent.parent / "README.md"
ALEMBIC = Path(sys.executable).with_name("alembic")
ROWS = 5


def readme_block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    assert marker in text, f"{README} lost its {marker} marker"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(marker, 1)[1], re.DOTALL)
    assert match, f"no ```python block right after {marker}"
    return match.group(1) + "\n"


def models(email_type: str) -> str:
    return textwrap.dedent(f"""
        import sqlalchemy as sa
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

        import sqlalchemy_kms_field as kf


        class Base(DeclarativeBase):
            pass


        class User(Base):
            __tablename__ = "users"
            id: Mapped[int] = mapped_column(primary_key=True)
            email: Mapped[str] = mapped_column({email_type})
        """)


FIRST = '''
"""key store, data key, plaintext users

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_key_store()
    op.create_data_key("pii")
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(320), nullable=False),
    )
    op.bulk_insert(users, [{{"id": i, "email": f"user{{i}}@example.com"}} for i in range({rows})])


def downgrade():
    op.drop_table("users")
'''


def alembic(
    project: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ALEMBIC), *args],
        cwd=project,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def settings(db_url: str) -> dict[str, str]:
    """The user's environment: the settings kms-field reads (README, Command line)."""
    return {
        "KMS_FIELD_DATABASE_URL": db_url,
        "KMS_FIELD_MASTER_KEY": "local-env:APP_MASTER_KEY",
        "APP_MASTER_KEY": MASTER_KEY_B64,
        "KMS_FIELD_ACTIVE_TTL": "0",
    }


def new_project(tmp_path: Path, env_py: str) -> Path:
    """`alembic init migrations`, an application package, and ``env_py`` as env.py."""
    project = tmp_path / "project"
    project.mkdir()
    result = alembic(project, "init", "migrations")
    assert result.returncode == 0, result.stderr
    (project / "myapp").mkdir()
    (project / "myapp" / "__init__.py").write_text("", encoding="utf-8")
    (project / "myapp" / "models.py").write_text(models("sa.String(320)"), encoding="utf-8")
    (project / "migrations" / "env.py").write_text(env_py, encoding="utf-8")
    return project


def write_revision(project: Path, name: str, text: str) -> None:
    (project / "migrations" / "versions" / name).write_text(text, encoding="utf-8")


def test_readme_env_py_runs_autogenerate_and_upgrade_in_a_fresh_project(
    db_url: str, tmp_path: Path
) -> None:
    project = new_project(tmp_path, readme_block("<!-- alembic-env -->"))
    env = settings(db_url)
    write_revision(project, "0001_start.py", FIRST.format(rows=ROWS))
    first = alembic(project, "upgrade", "head", env=env)
    assert first.returncode == 0, first.stderr

    # The model's column becomes encrypted; autogenerate writes the migration.
    (project / "myapp" / "models.py").write_text(
        models('kf.EncryptedString(320, key="pii")'), encoding="utf-8"
    )
    generated = alembic(project, "revision", "--autogenerate", "-m", "encrypt email", env=env)
    assert generated.returncode == 0, generated.stderr
    [path] = (project / "migrations" / "versions").glob("*_encrypt_email.py")
    text = path.read_text(encoding="utf-8")
    upgrade, downgrade = text.split("def downgrade", 1)
    assert "op.encrypt_column('users', 'email', key='pii')" in upgrade, text
    assert upgrade.index("alter_column") < upgrade.index("op.encrypt_column"), text
    assert "accept_plaintext=True" in upgrade  # the comment about the window
    assert "op.decrypt_column('users', 'email', key='pii')" in downgrade, text
    assert downgrade.index("op.decrypt_column") < downgrade.index("alter_column"), text
    assert MASTER_KEY_B64 not in text

    second = alembic(project, "upgrade", "head", env=env)
    assert second.returncode == 0, second.stderr
    # Progress through Alembic's own logger, shown by the alembic.ini that `alembic init` wrote.
    assert re.search(
        rf"INFO +\[alembic\.kms_field\] encrypt users\.email: {ROWS} of {ROWS} rows", second.stderr
    ), second.stderr

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT email FROM users ORDER BY id")).scalars().all()
        assert len(stored) == ROWS and all(v.startswith("kf2:pii:1:") for v in stored), stored
        registry = kf.KeyRegistry(kf.LocalMasterKey(MASTER_KEY_BYTES), kf.SqlKeyStore(engine))
        users = sa.Table(
            "users",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("email", kf.EncryptedString(320, key="pii")),
        )
        from sqlalchemy_kms_field import registry as kf_registry

        saved = kf_registry._registry
        kf_registry._registry = registry
        try:
            with engine.connect() as conn:
                emails = conn.execute(sa.select(users.c.email).order_by(users.c.id)).scalars()
                assert list(emails) == [f"user{i}@example.com" for i in range(ROWS)]
        finally:
            kf_registry._registry = saved
    finally:
        engine.dispose()

    # And back: downgrade decrypts before narrowing the column.
    down = alembic(project, "downgrade", "0001", env=env)
    assert down.returncode == 0, down.stderr
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            plain = conn.execute(sa.text("SELECT email FROM users ORDER BY id")).scalars().all()
        assert plain == [f"user{i}@example.com" for i in range(ROWS)]
    finally:
        engine.dispose()


UNCONFIGURED_ENV = """
from alembic import context
from sqlalchemy import engine_from_config, pool

import sqlalchemy_kms_field.alembic_ops  # registers op.create_data_key & co., configures nothing

connectable = engine_from_config(
    context.config.get_section(context.config.config_ini_section, {}),
    prefix="sqlalchemy.",
    poolclass=pool.NullPool,
)
with connectable.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
"""

KEY_ONLY = '''
"""a data key

Revision ID: 0001
Revises:
"""
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.create_key_store()
    op.create_data_key("pii")
'''


@pytest.mark.databases("sqlite")
def test_an_env_py_that_never_configured_the_library_is_named(db_url: str, tmp_path: Path) -> None:
    project = new_project(tmp_path, UNCONFIGURED_ENV)
    ini = project / "alembic.ini"
    text = re.sub(r"(?m)^sqlalchemy\.url = .*$", f"sqlalchemy.url = {db_url}", ini.read_text())
    ini.write_text(text, encoding="utf-8")
    write_revision(project, "0001_key.py", KEY_ONLY)
    result = alembic(project, "upgrade", "head")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "op.create_data_key() needs sqlalchemy_kms_field configured in env.py" in last, last
    assert "alembic_env.run_migrations(context" in last, last


@pytest.mark.databases("sqlite")
def test_the_readme_env_py_without_a_master_key_names_the_setting(
    db_url: str, tmp_path: Path
) -> None:
    project = new_project(tmp_path, readme_block("<!-- alembic-env -->"))
    write_revision(project, "0001_key.py", KEY_ONLY)
    env = settings(db_url)
    del env["KMS_FIELD_MASTER_KEY"]
    result = alembic(project, "upgrade", "head", env={**env, "KMS_FIELD_MASTER_KEY": ""})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "KMS_FIELD_MASTER_KEY is not set" in last and "env.py" in last, last
    # The key store was created (no master key needed for that) and nothing else happened.
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM kms_field_keys")).scalar() == 0
    finally:
        engine.dispose()


@pytest.mark.databases("sqlite")
def test_a_postgres_scheme_url_names_the_one_to_use(db_url: str, tmp_path: Path) -> None:
    project = new_project(tmp_path, readme_block("<!-- alembic-env -->"))
    unset = {**settings(db_url), "KMS_FIELD_DATABASE_URL": ""}  # alembic.ini: driver://...
    result = alembic(project, "upgrade", "head", env=unset)
    assert result.returncode != 0
    assert "set KMS_FIELD_DATABASE_URL" in result.stderr.strip().splitlines()[-1], result.stderr

    env = {**settings(db_url), "KMS_FIELD_DATABASE_URL": "postgres://app@db.internal/app"}
    result = alembic(project, "upgrade", "head", env=env)
    assert result.returncode != 0
    assert "postgresql+psycopg://" in result.stderr.strip().splitlines()[-1], result.stderr


def test_create_key_store_upgrades_a_key_table_of_an_earlier_release(
    db_url: str, tmp_path: Path
) -> None:
    engine = sa.create_engine(db_url)
    try:
        store = kf.SqlKeyStore(engine)
        store.create_table()
        registry = kf.KeyRegistry(kf.LocalMasterKey(MASTER_KEY_BYTES), store)
        registry.create_data_key("pii")
        with engine.begin() as conn:  # the table as an earlier release made it
            for name in LIFECYCLE_COLUMNS:
                conn.execute(sa.text(f"ALTER TABLE kms_field_keys DROP COLUMN {name}"))
        assert not set(LIFECYCLE_COLUMNS) & {
            c["name"] for c in sa.inspect(engine).get_columns("kms_field_keys")
        }
    finally:
        engine.dispose()

    project = new_project(tmp_path, readme_block("<!-- alembic-env -->"))
    write_revision(project, "0001_key.py", KEY_ONLY)
    result = alembic(project, "upgrade", "head", env=settings(db_url))
    assert result.returncode == 0, result.stderr

    engine = sa.create_engine(db_url)
    try:
        columns = {c["name"] for c in sa.inspect(engine).get_columns("kms_field_keys")}
        assert set(LIFECYCLE_COLUMNS) <= columns
        with engine.connect() as conn:
            activated = conn.execute(sa.text("SELECT activated_at FROM kms_field_keys")).scalar()
        assert activated is not None  # the active version's grace periods start now
    finally:
        engine.dispose()


ROTATE = '''
"""encrypt, then rotate and re-encrypt

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

import sqlalchemy_kms_field as kf

revision = "0002"
down_revision = "0001"


def upgrade():
    with op.batch_alter_table("users") as batch:
        batch.alter_column(
            "email", type_=kf.EncryptedString(320, key="pii"), existing_type=sa.String(320)
        )
    op.encrypt_column("users", "email", key="pii")
    op.rotate_data_key("pii")
    op.reencrypt_column("users", "email", key="pii")
'''


@pytest.mark.databases("sqlite")
def test_an_alembic_rotation_says_what_it_waits_for(db_url: str, tmp_path: Path) -> None:
    project = new_project(tmp_path, readme_block("<!-- alembic-env -->"))
    write_revision(project, "0001_start.py", FIRST.format(rows=ROWS))
    write_revision(project, "0002_rotate.py", ROTATE)
    result = alembic(
        project, "upgrade", "head", env={**settings(db_url), "KMS_FIELD_ACTIVE_TTL": "1"}
    )
    assert result.returncode == 0, result.stderr
    waits = [line for line in result.stderr.splitlines() if "waiting" in line]
    assert len(waits) == 1, result.stderr
    assert "[alembic.kms_field]" in waits[0] and "active_ttl 1 s" in waits[0], waits[0]
    assert "'pii' version 2" in waits[0], waits[0]
    assert f"reencrypt users.email: {ROWS} of {ROWS} rows" in result.stderr, result.stderr
