"""Re-encrypts one tenant's rows of ``notes`` to its active key version (killed by the tests).

    python tests/scripts/tenant_rotate_job.py URL TENANT BATCH_SIZE PAUSE

A local master key from KMS_FIELD_LOCAL_MASTER_KEY; active_ttl 0.5 s. Prints "done ROWS".
"""

from __future__ import annotations

import sys

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.tenant_rotation import reencrypt_tenant

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("body", kf.EncryptedText(key="pii", tenant="tenant_id")),
)


def main() -> None:
    url, tenant, batch, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    engine = sa.create_engine(url)
    kf.configure(
        master_key=kf.LocalMasterKey.from_env("KMS_FIELD_LOCAL_MASTER_KEY"),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=0.5,
    )
    job = reencrypt_tenant(notes, "body", tenant, batch_size=batch, pause=pause)
    print(f"done {job.rows}", flush=True)


if __name__ == "__main__":
    main()
