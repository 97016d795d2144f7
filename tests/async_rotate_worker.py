"""Run by test_asyncio: another process rotates data key "pii" and re-encrypts a column.

Prints "rotated <version> <monotonic time>" once the new version is active, then "done <json of
the job result>" once every row is on it. The local master key comes from
KMS_FIELD_LOCAL_MASTER_KEY.
"""

from __future__ import annotations

import json
import sys
import time

import sqlalchemy as sa

import sqlalchemy_kms_field as kf


def main() -> None:
    url, table, column, active_ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    engine = sa.create_engine(url)
    registry = kf.configure(
        master_key=kf.LocalMasterKey.from_env(),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=active_ttl,
    )
    version = registry.rotate_data_key("pii").version
    print("rotated", version, time.monotonic(), flush=True)
    result = kf.reencrypt_column(engine, table, column, key="pii", batch_size=200)
    print("done", json.dumps({"finished": result.finished, "written": result.rows_written}))
    sys.stdout.flush()
    engine.dispose()


if __name__ == "__main__":
    main()
