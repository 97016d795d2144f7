"""A process writing the first rows of one new tenant at the same moment as others.

    python tests/scripts/tenant_writer.py URL INDEX ROWS START_AT

Configured like an application (a local master key from KMS_FIELD_LOCAL_MASTER_KEY), it waits
until the wall clock reaches START_AT, then inserts ROWS rows of tenant "acme" (ids INDEX*1000+i),
each in its own transaction, and prints one JSON line: the rows written and the tenant keys it
created itself.
"""

from __future__ import annotations

import json
import sys
import time

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import tenants

metadata = sa.MetaData()
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.String(40), nullable=False),
    sa.Column("email", kf.EncryptedString(320, key="pii", tenant="tenant_id")),
)


def main() -> None:
    url, index, rows, start_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    engine = sa.create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    kf.configure(
        master_key=kf.LocalMasterKey.from_env("KMS_FIELD_LOCAL_MASTER_KEY"),
        key_store=kf.SqlKeyStore(engine),
    )
    with engine.connect():
        pass  # connected before the start, so that every process races for the key at once
    time.sleep(max(0.0, start_at - time.time()))
    for i in range(rows):
        with engine.begin() as conn:
            conn.execute(
                accounts.insert(),
                {"id": index * 1000 + i, "tenant_id": "acme", "email": f"{index}-{i}@acme.test"},
            )
    print(json.dumps({"rows": rows, "created": tenants.get_keyring().stats.created}))


if __name__ == "__main__":
    main()
