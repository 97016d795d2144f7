"""Run by test_registry_concurrency: rotate a data key N times, starting when told to.

Prints "ready", waits for a line on stdin (so that several workers start at the same moment),
then rotates and prints the versions it created as one JSON line. The local master key comes
from KMS_FIELD_LOCAL_MASTER_KEY.
"""

from __future__ import annotations

import json
import sys

import sqlalchemy as sa

import sqlalchemy_kms_field as kf


def main() -> None:
    url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = sa.create_engine(url)
    registry = kf.configure(
        master_key=kf.LocalMasterKey.from_env(), key_store=kf.SqlKeyStore(engine)
    )
    with engine.connect():  # connect before the start signal, not after
        pass
    print("ready", flush=True)
    sys.stdin.readline()
    versions = [registry.rotate_data_key(name).version for _ in range(count)]
    print(json.dumps(versions), flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
