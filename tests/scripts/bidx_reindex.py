"""Reindex bidx_users.email_index in a process of its own, so that a test can SIGKILL it.

Usage: python bidx_reindex.py DATABASE_URL [--batch-size N] [--rows-per-second R]
The local master key comes from KMS_FIELD_LOCAL_MASTER_KEY (base64). Prints the job result as
one JSON line when the job finishes.
"""

from __future__ import annotations

import argparse
import json
import os

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.reencrypt import reindex_column


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--rows-per-second", type=float, default=None)
    args = parser.parse_args()
    engine = sa.create_engine(args.url, hide_parameters=True)
    kf.configure(
        master_key=kf.LocalMasterKey.from_env(),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=float(os.environ.get("KMS_FIELD_ACTIVE_TTL", "60")),
    )
    users = sa.Table(
        "bidx_users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
        sa.Column("email_index", kf.BlindIndex("email", key="email-index", normalizer="email")),
    )
    result = reindex_column(
        engine,
        users.c.email_index,
        batch_size=args.batch_size,
        rows_per_second=args.rows_per_second,
    )
    print(json.dumps({"finished": result.finished, "rows_written": result.rows_written}))


if __name__ == "__main__":
    main()
