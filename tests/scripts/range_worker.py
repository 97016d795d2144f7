"""One worker of a re-encryption job, in a process of its own; reports as JSON on stdout.

    python tests/scripts/range_worker.py URL KEY_FILE [--join] [--batch-size N]
        [--range-rows N] [--lease S] [--active-ttl S] [--rate R] [--pause-at-start]

With --join it joins the job another worker started (retrying until that job exists).
Exit status 0 when the job finished (by this worker or another), 1 when the library raised.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.reencrypt import JobConflictError, reencrypt_column


def failed(exc: BaseException) -> int:
    json.dump({"ok": False, "error": type(exc).__name__, "message": str(exc)}, sys.stdout)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key_file")
    parser.add_argument("--join", action="store_true")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--range-rows", type=int, default=5000)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--active-ttl", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--table", default="users")
    args = parser.parse_args()

    engine = sa.create_engine(args.url)
    kf.configure(
        master_key=kf.LocalMasterKey.from_file(args.key_file),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=args.active_ttl,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            result = reencrypt_column(
                engine,
                args.table,
                "email",
                key="pii",
                batch_size=args.batch_size,
                range_rows=args.range_rows,
                lease_seconds=args.lease,
                rows_per_second=args.rate,
                join=args.join,
            )
            break
        except JobConflictError as exc:
            if "to join" not in str(exc) or time.monotonic() > deadline:
                json.dump(
                    {"ok": False, "error": type(exc).__name__, "message": str(exc)}, sys.stdout
                )
                return 1
            time.sleep(0.05)  # the first worker has not started the job yet
        except kf.KmsFieldError as exc:
            return failed(exc)
    engine.dispose()
    json.dump(
        {
            "ok": True,
            "finished": result.finished,
            "rows_written": result.rows_written,
            "rows_conflicted": result.rows_conflicted,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
