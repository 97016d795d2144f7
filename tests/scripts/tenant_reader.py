"""A second application process reading every tenant's rows while one tenant is erased.

    python tests/scripts/tenant_reader.py URL STOP_FILE

Reads every row of ``notes`` row by row, over and over (a local master key from
KMS_FIELD_LOCAL_MASTER_KEY, active_ttl 0.5 s), until STOP_FILE exists; creates
STOP_FILE.ready after its first pass. Prints one JSON line per pass: {"start"/"t": wall clock
at its start and end, "ok": {tenant: rows read}, "errors": {tenant: first error text}}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import sqlalchemy as sa

import sqlalchemy_kms_field as kf

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("body", kf.EncryptedText(key="pii", tenant="tenant_id")),
)


def main() -> None:
    url, stop = sys.argv[1], Path(sys.argv[2])
    engine = sa.create_engine(url)
    kf.configure(
        master_key=kf.LocalMasterKey.from_env("KMS_FIELD_LOCAL_MASTER_KEY"),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=0.5,
    )
    with engine.connect() as conn:
        ids = [(r.id, r.tenant_id) for r in conn.execute(sa.select(notes.c.id, notes.c.tenant_id))]
    while not stop.exists():
        started = time.time()
        ok: dict[int, int] = {}
        errors: dict[int, str] = {}
        with engine.connect() as conn:
            for row_id, tenant in ids:
                try:
                    conn.execute(sa.select(notes.c.body).where(notes.c.id == row_id)).scalar_one()
                    ok[tenant] = ok.get(tenant, 0) + 1
                except kf.KmsFieldError as exc:
                    errors.setdefault(tenant, f"{type(exc).__name__}: {exc}")
        print(
            json.dumps({"start": started, "t": time.time(), "ok": ok, "errors": errors}), flush=True
        )
        stop.with_suffix(".ready").touch()  # after its first pass: the keys are cached
        time.sleep(0.05)


if __name__ == "__main__":
    main()
