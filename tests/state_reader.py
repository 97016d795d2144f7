"""Run by test_key_states: an application process that reads one row again and again.

Configured from argv and KMS_FIELD_LOCAL_MASTER_KEY like a deployed application. Prints
"ready" once the row has been read, then one line per read until stdin closes:
``<wall clock time> ok`` or ``<wall clock time> <ErrorClass>``.
"""

from __future__ import annotations

import sys
import threading
import time

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.exc import KmsFieldError


def main() -> None:
    url, ttl = sys.argv[1], float(sys.argv[2])
    engine = sa.create_engine(url)
    kf.configure(
        master_key=kf.LocalMasterKey.from_env(), key_store=kf.SqlKeyStore(engine), active_ttl=ttl
    )
    table = sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    ready = False
    while not stop.is_set():
        try:
            with engine.connect() as conn:
                conn.execute(sa.select(table.c.email).where(table.c.id == 1)).scalar_one()
            outcome = "ok"
        except (KmsFieldError, sa.exc.StatementError) as exc:
            orig = exc.orig if isinstance(exc, sa.exc.StatementError) else exc
            outcome = type(orig).__name__
        if not ready:
            print("ready", flush=True)
            ready = True
        print(f"{time.time():.4f} {outcome}", flush=True)
        time.sleep(0.02)
    engine.dispose()


if __name__ == "__main__":
    main()
