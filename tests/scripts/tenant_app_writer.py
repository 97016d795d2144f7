"""An application process updating tenant 42's rows of ``notes`` until told to stop.

    python tests/scripts/tenant_app_writer.py URL ACTIVE_TTL ROWS READY STOP OUT

Its keys come from a local master key (KMS_FIELD_LOCAL_MASTER_KEY) and live ACTIVE_TTL seconds
in its cache, so after a rotation it keeps writing under the old tenant key version that long.
Touches READY after its first committed write, stops when STOP exists, and writes to OUT the
last value it committed to each row and how many writes it made.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from tests.scripts.tenant_rotate_job import notes


def main() -> None:
    url, ttl, rows = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    ready, stop, out = Path(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6])
    engine = sa.create_engine(url)
    kf.configure(
        master_key=kf.LocalMasterKey.from_env("KMS_FIELD_LOCAL_MASTER_KEY"),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=ttl,
    )
    last: dict[int, str] = {}
    rng, n = random.Random(11), 0
    while not stop.exists():
        n += 1
        row_id = rng.randrange(1, rows + 1)
        value = f"{row_id}-app-{n}"
        with engine.begin() as conn:
            conn.execute(
                notes.update()
                .where(notes.c.id == row_id, notes.c.tenant_id == 42)
                .values(body=value)
            )
        last[row_id] = value
        ready.touch()
        time.sleep(0.01)
    out.write_text(json.dumps({"last": last, "writes": n}))


if __name__ == "__main__":
    main()
