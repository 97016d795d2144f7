"""Run one re-encryption job in a process of its own and report how it ended, as JSON on stdout.

    python tests/scripts/reencrypt_job.py URL MASTER_KEY TABLE COLUMN KEY [--batch-size N]
        [--active-ttl SECONDS] [--previous-master-key MASTER_KEY ...]

MASTER_KEY is ``local:PATH`` or ``aws-kms:KEY-ID`` (as in migrations/env.py); an AWS KMS key is
reached the standard way (``AWS_ENDPOINT_URL_KMS`` and friends from the environment). A fresh
process has no data key in memory, so every version it needs is unwrapped by the master key.
Exit status 0 when the job finished, 1 when the library raised (the error is described on stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.reencrypt import reencrypt_column


def master_key(spec: str) -> kf.MasterKey:
    kind, _, value = spec.partition(":")
    if kind == "local":
        return kf.LocalMasterKey.from_file(value)
    if kind == "aws-kms":
        return kf.AwsKmsMasterKey(value, max_attempts=2)
    raise SystemExit(f"unknown master key {spec!r}: use local:PATH or aws-kms:KEY-ID")


def describe(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "code": getattr(exc, "code", None),
        "table": getattr(exc, "table", None),
        "column": getattr(exc, "column", None),
        "primary_key": getattr(exc, "primary_key", None),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("url", "master_key", "table", "column", "key"):
        parser.add_argument(name)
    parser.add_argument("--batch-size", type=int, default=2000)
    # The active_ttl the job assumes of the application's processes (none run in the tests).
    parser.add_argument("--active-ttl", type=float, default=0.0)
    parser.add_argument("--previous-master-key", action="append", default=[])
    args = parser.parse_args()

    engine = sa.create_engine(args.url)
    kf.configure(
        master_key=master_key(args.master_key),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=args.active_ttl,
        previous_master_keys=[master_key(spec) for spec in args.previous_master_key],
    )
    try:
        result = reencrypt_column(
            engine, args.table, args.column, key=args.key, batch_size=args.batch_size
        )
    except kf.KmsFieldError as exc:
        causes = []
        cause = exc.__cause__
        while cause is not None:
            causes.append(describe(cause))
            cause = cause.__cause__
        json.dump({"ok": False, "error": describe(exc), "causes": causes}, sys.stdout)
        return 1
    finally:
        engine.dispose()
    json.dump(
        {
            "ok": True,
            "finished": result.finished,
            "rows_written": result.rows_written,
            "rows_conflicted": result.rows_conflicted,
            "sweeps": result.sweeps,
            "target_version": result.target_version,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
