"""Encrypts the plaintext ``plain_notes.body`` under its tenants' keys (killed by the tests).

    python tests/scripts/tenant_encrypt_job.py URL BATCH_SIZE PAUSE

A local master key from KMS_FIELD_LOCAL_MASTER_KEY; active_ttl 0.5 s. Prints "done ROWS".
"""

from __future__ import annotations

import sys

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.tenant_rotation import encrypt_tenants
from tests.test_tenant_encrypt import notes


def main() -> None:
    url, batch, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    engine = sa.create_engine(url)
    kf.configure(
        master_key=kf.LocalMasterKey.from_env("KMS_FIELD_LOCAL_MASTER_KEY"),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=0.5,
    )
    jobs = encrypt_tenants(notes, "body", batch_size=batch, pause=pause)
    print(f"done {sum(job.rows for job in jobs)}", flush=True)


if __name__ == "__main__":
    main()
