"""Autogenerate renders a BlindIndex with a custom normalizer so that the migration runs.

Before, a function ``digits_only`` rendered as ``normalizer='digits_only'``, which ``alembic
upgrade`` refused (unknown normalizer), and a function that happened to be named ``lower``
rendered as the built-in ``'lower'``, silently another normalizer. Now a function renders as
``NormalizerRef('module:function')``: the DDL does not need it, and an index computed through
the reference is the function's own.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.blind_index import NormalizerRef
from tests.helpers import MASTER_KEY_BYTES, reset_global_registry
from tests.test_alembic_render import ENV_ADDITIONS, _alembic

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_kms_field as kf


def digits_only(value: str) -> str:
    return "".join(c for c in value if c.isdigit())


def lower(value: str) -> str:
    '''Not the built-in "lower": it also drops every space.'''
    return value.lower().replace(" ", "")


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "people"

    id: Mapped[int] = mapped_column(primary_key=True)
    phone: Mapped[str | None] = mapped_column(kf.EncryptedString(40, key="pii"))
    phone_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("phone", key="phone-index", normalizer=digits_only), unique=True
    )
    nick: Mapped[str | None] = mapped_column(kf.EncryptedString(40, key="pii"))
    nick_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("nick", key="nick-index", normalizer=lower, bits=128)
    )
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`alembic init`, the models above, `alembic revision --autogenerate`."""
    project = tmp_path_factory.mktemp("bidx_alembic")
    assert _alembic(project, "init", "migrations").returncode == 0
    key_engine = sa.create_engine(f"sqlite:///{project / 'keys.sqlite'}")
    registry = kf.KeyRegistry(kf.LocalMasterKey(MASTER_KEY_BYTES), kf.SqlKeyStore(key_engine))
    registry.key_store.create_table()
    registry.create_data_key("pii")
    registry.create_index_key("phone-index")
    registry.create_index_key("nick-index")
    key_engine.dispose()
    (project / "models.py").write_text(MODELS, encoding="utf-8")
    ini = project / "alembic.ini"
    text = re.sub(
        r"(?m)^sqlalchemy\.url = .*$",
        f"sqlalchemy.url = sqlite:///{project / 'app.sqlite'}",
        ini.read_text(encoding="utf-8"),
    )
    ini.write_text(text, encoding="utf-8")
    env = project / "migrations" / "env.py"
    text = env.read_text(encoding="utf-8").replace("target_metadata = None", ENV_ADDITIONS)
    text = re.sub(
        r"target_metadata=target_metadata\b",
        "target_metadata=target_metadata, render_item=kf_alembic.render_item, "
        "include_object=kf_alembic.include_object",
        text,
    )
    env.write_text(text, encoding="utf-8")
    result = _alembic(project, "revision", "--autogenerate", "-m", "people")
    assert result.returncode == 0, result.stderr
    return project


def revision(project: Path) -> str:
    (found,) = (project / "migrations" / "versions").glob("*_people.py")
    return found.read_text(encoding="utf-8")


RENDERED = {
    "phone_index": "sqlalchemy_kms_field.BlindIndex('phone', key='phone-index', normalizer="
    "sqlalchemy_kms_field.blind_index.NormalizerRef('models:digits_only'))",
    "nick_index": "sqlalchemy_kms_field.BlindIndex('nick', key='nick-index', normalizer="
    "sqlalchemy_kms_field.blind_index.NormalizerRef('models:lower'), bits=128)",
}


def test_a_custom_normalizer_renders_as_a_reference_and_upgrade_runs(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = revision(project)
    for column, rendered in RENDERED.items():
        assert f"sa.Column('{column}', {rendered}" in text, text
    assert "normalizer='lower'" not in text and "normalizer='digits_only'" not in text
    result = _alembic(project, "upgrade", "head")
    assert result.returncode == 0, result.stderr

    # The migrated table works with the application's models, and the rendered types compute
    # the same index values as the functions they name.
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    import models  # type: ignore[import-not-found]

    reset_global_registry(monkeypatch)
    key_engine = sa.create_engine(f"sqlite:///{project / 'keys.sqlite'}")
    app = sa.create_engine(f"sqlite:///{project / 'app.sqlite'}")
    try:
        kf.configure(
            master_key=kf.LocalMasterKey(MASTER_KEY_BYTES), key_store=kf.SqlKeyStore(key_engine)
        )
        people = models.Person.__table__
        with app.begin() as conn:
            conn.execute(people.insert().values(id=1, phone="+1 (555) 0100", nick="Big Ann"))
        with app.connect() as conn:
            found = conn.scalars(sa.select(people.c.id).where(people.c.phone == "15550100"))
            assert list(found) == [1]
            stored = conn.execute(sa.select(people.c.phone_index, people.c.nick_index)).one()
        namespace: dict[str, Any] = {"sa": sa, "sqlalchemy_kms_field": kf}
        for column, rendered in RENDERED.items():
            rebuilt = eval(rendered, namespace)  # noqa: S307 - our own rendering
            value = "+1 (555) 0100" if column == "phone_index" else "Big Ann"
            assert rebuilt.compute(value, table="people") == getattr(stored, column)
        # The function named "lower" is not the built-in: the built-in would keep the space.
        builtin = kf.BlindIndex("nick", key="nick-index", normalizer="lower", bits=128)
        assert builtin.compute("Big Ann", table="people") != stored.nick_index
    finally:
        app.dispose()
        key_engine.dispose()


def test_functions_that_cannot_be_named_are_refused() -> None:
    def local(value: str) -> str:
        return value

    for function in (lambda v: v, local):
        with pytest.raises(kf.ConfigurationError, match="module level"):
            kf.BlindIndex("email", key="email-index", normalizer=function)
    upper = kf.BlindIndex("email", key="email-index", normalizer=str.upper)
    assert "NormalizerRef('builtins:str.upper')" in repr(upper)
    assert NormalizerRef("builtins:str.upper")("a") == "A"
    missing = NormalizerRef("no_such_module:normalize")
    index = kf.BlindIndex("email", key="email-index", normalizer=missing)  # DDL needs no import
    assert repr(index).endswith("NormalizerRef('no_such_module:normalize'))")
    with pytest.raises(kf.ConfigurationError, match="no_such_module:normalize"):
        missing("a@b.c")
    for bad in ("digits_only", "a b:c", ""):
        with pytest.raises(kf.ConfigurationError, match="module:function"):
            NormalizerRef(bad)
