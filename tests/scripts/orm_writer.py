"""An application process: updates random rows of ``users`` through the ORM until told to stop.

    python tests/scripts/orm_writer.py URL KEY_FILE --rows N --writers W --index K
        --active-ttl SECONDS --ready PATH --stop PATH --out PATH [--interval S] [--until-version V]
        [--after PATH]

It owns the rows whose id % W == K (so "the last write" of a row is well defined across
writers) and writes ``f"{id}-{K}-{counter}"`` to them, one row per transaction. Its registry
caches the active data key version for ``--active-ttl`` seconds, so after a rotation it keeps
writing under the old version until that time has passed (counted from when it first reads
the active version: after the file --after names exists, if given). It touches READY after its first
committed write, stops when STOP exists (or, with --until-version, after its first write under
that version), and writes a JSON report to OUT: the last value it committed to each row, and
when it wrote under each data key version (wall-clock seconds, comparable across processes).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key_file")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--writers", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--active-ttl", type=float, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--stop", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--until-version", type=int, default=None)
    parser.add_argument("--after", type=Path, default=None)
    args = parser.parse_args()

    engine = sa.create_engine(args.url)
    registry = kf.configure(
        master_key=kf.LocalMasterKey.from_file(args.key_file),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=args.active_ttl,
    )
    deadline = time.monotonic() + 120
    while args.after is not None and not args.after.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    registry.preload(["pii"])  # the active version is cached from now on, for active_ttl

    # The version of each write, read from the ciphertext actually sent to the database.
    sent: list[int] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _seen(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            values = parameters.values() if isinstance(parameters, dict) else parameters
            for value in values:
                if isinstance(value, str) and (found := envelope.parse_header(value)):
                    sent.append(found[1])

    rng = random.Random(args.index)
    ids = [i for i in range(1, args.rows + 1) if i % args.writers == args.index]
    last: dict[int, str] = {}
    writes: Counter[int] = Counter()
    first_write: dict[int, float] = {}
    last_write: dict[int, float] = {}
    errors: list[str] = []
    counter = 0
    while not args.stop.exists():
        row_id = rng.choice(ids)
        counter += 1
        value = f"{row_id}-{args.index}-{counter}"
        sent.clear()
        try:
            with Session(engine) as session, session.begin():
                session.get_one(User, row_id).email = value
        except sa.exc.DBAPIError as exc:  # lock timeout, deadlock: did the commit happen?
            errors.append(f"{type(exc.orig).__name__}: {exc.orig}")
            with Session(engine) as session:
                if session.get_one(User, row_id).email != value:
                    continue
        now = time.time()
        last[row_id] = value
        version = sent[-1] if sent else 0
        writes[version] += 1
        first_write.setdefault(version, now)
        last_write[version] = now
        if counter == 1:
            args.ready.touch()
        if args.until_version is not None and version == args.until_version:
            break
        if args.interval:
            time.sleep(args.interval)
    engine.dispose()
    report = {
        "last": {str(k): v for k, v in last.items()},
        "writes": {str(k): n for k, n in writes.items()},
        "first_write": {str(k): t for k, t in first_write.items()},
        "last_write": {str(k): t for k, t in last_write.items()},
        "errors": errors,
    }
    args.out.write_text(json.dumps(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
