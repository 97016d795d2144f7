"""``kms-field status`` on columns with a key per tenant (issue 13 follow-up, point 1): their
values are counted per tenant-key version, summed over tenants, with the number of tenants
(SQL on the headers, nothing decrypted), in the table (as wide as the census tables at most)
and in ``--json``; they are no longer "other", and no "rows on older versions" is claimed for
them under the column's own key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import tenants
from tests.test_cli import (  # noqa: F401 - fixtures
    Cli,
    cli,
    configure_here,
    load_module,
    setup_database,
    table_rows,
    work,
)

TENANT_MODELS = """\
import sqlalchemy as sa

import sqlalchemy_kms_field as kf

metadata = sa.MetaData()
notes = sa.Table(
    "cli_tenant_notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.String(40), nullable=False),
    sa.Column("body", kf.EncryptedText(key="pii", tenant="tenant_id")),
)
"""


def test_status_counts_tenant_values_per_tenant_key_version(
    db_url: str,
    engine: sa.Engine,
    cli: Cli,  # noqa: F811
    work: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = work / "dev.key"
    setup_database(cli, db_url, key_file)
    (work / "cli_tenant_notes.py").write_text(TENANT_MODELS, encoding="utf-8")
    cli.env["KMS_FIELD_MODELS"] = "cli_tenant_notes:metadata"
    notes = load_module(work / "cli_tenant_notes.py").notes
    monkeypatch.setattr(tenants, "_keyring", None)
    monkeypatch.setattr(tenants, "_settings", {})
    configure_here(engine, kf.LocalMasterKey.from_file(key_file), monkeypatch)
    notes.metadata.create_all(engine)

    def write(first: int, n: int, tenant: str) -> None:
        with engine.begin() as conn:
            conn.execute(
                notes.insert(),
                [
                    {"id": i, "tenant_id": tenant, "body": f"note {i}"}
                    for i in range(first, first + n)
                ],
            )

    write(1, 10, "41")
    write(11, 5, "42")
    write(16, 3, "Acme Corp")  # a hashed tenant key name
    kf.rotate_tenant_key("pii", "42")
    write(21, 4, "42")
    plain = sa.table("cli_tenant_notes", sa.column("id"), sa.column("tenant_id"), sa.column("body"))
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": 30, "tenant_id": "43", "body": "not encrypted"}])
        conn.execute(plain.insert(), [{"id": 31, "tenant_id": "43", "body": None}])

    [column] = json.loads(cli("status", "--json").stdout)["columns"]
    assert column["column"] == "cli_tenant_notes.body"
    assert column["tenant_keys"] == {"by_version": {"1": 18, "2": 4}, "tenants": 3, "rows": 22}
    assert (column["other"], column["nulls"], column["total"]) == (1, 1, 24)  # the plaintext
    text = cli("status").stdout
    [row] = table_rows(text, "column", "tenants", "rows")
    assert (row["column"], row["v1"], row["v2"], row["tenants"], row["rows"]) == (
        "cli_tenant_notes.body", "18", "4", "3", "22",
    )  # fmt: skip
    assert "rows on older versions" not in text

    # Many versions of one tenant: at most four version columns, the older ones summed.
    for i in range(5):
        kf.rotate_tenant_key("pii", "42")
        write(100 + i, 1, "42")
    text = cli("status").stdout
    [row] = table_rows(text, "column", "tenants", "rows")
    assert list(row) == ["column", "older: v1-v4", "v5", "v6", "v7", "tenants", "rows"]
    assert (row["older: v1-v4"], row["v7"], row["tenants"], row["rows"]) == ("24", "1", "3", "27")
    [column] = json.loads(cli("status", "--json").stdout)["columns"]
    assert column["tenant_keys"]["by_version"] == {
        "1": 18, "2": 4, "3": 1, "4": 1, "5": 1, "6": 1, "7": 1,
    }  # fmt: skip
