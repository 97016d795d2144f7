"""What destroying a wrapped key erases from the database's storage, and what it cannot reach.

Overwriting a row is not erasing it: PostgreSQL keeps the old row version in the table's file
until a VACUUM (and a plain VACUUM leaves its bytes in the page's free space), MySQL/MariaDB keep
it in the undo log, and every database keeps it in its logs, replicas and backups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


@dataclass(frozen=True)
class Erased:
    """What ``SqlKeyStore.destroy`` reached beyond the row itself."""

    dialect: str
    vacuumed: bool | None  # PostgreSQL: the key table was vacuumed; None on other databases
    problem: str | None = None  # why VACUUM did not run
    older_transactions: int = 0  # open when VACUUM ran: the old row version may survive them


def erasure_limits(dialect: str) -> tuple[str, str]:
    """What destroying a wrapped key reaches on ``dialect``, and what it does not."""
    reached = {
        "postgresql": "the row is a tombstone and VACUUM FULL rewrote the key table without the "
        "old row versions",
        "sqlite": "the wrapped key was overwritten in place with secure_delete on, so the "
        "database file no longer holds it",
        "mysql": "the wrapped key was overwritten in place in the key table's pages",
    }.get(dialect.replace("mariadb", "mysql"), "the row's wrapped key was overwritten")
    missed = {
        "postgresql": "WAL segments, their archives (point-in-time recovery), replicas and "
        "backups keep the old bytes",
        "sqlite": "backups, copies of the file and a deleted rollback journal's disk blocks "
        "keep the old bytes",
        "mysql": "the undo log (until purged), redo log, binary log, replicas and backups keep "
        "the old bytes",
    }.get(dialect.replace("mariadb", "mysql"), "logs, replicas and backups keep the old bytes")
    return reached, missed


def vacuum_full(engine: Engine, t: sa.Table, destroyed_at: datetime) -> Erased:
    """VACUUM FULL the key table (PostgreSQL): it is rewritten without its dead row versions.

    A plain VACUUM frees dead row versions but leaves their bytes in the pages' free space
    (the tests read the table's file and found the old wrapped key there); VACUUM FULL writes
    a new file holding only the live rows. It must still copy a row version that a transaction
    older than the destroy may see, and on PostgreSQL that includes any transaction of the
    whole server still running with an older id: so it first waits (at most
    ``WAIT_FOR_OLDER`` seconds) until none is left, and reports those it could not outwait.
    It locks the (small) table for a moment and waits at most 5 s for that lock. It cannot
    run inside a transaction (``destroyed_at``: the database's clock after the destroy's
    writes).
    """
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        table = conn.dialect.identifier_preparer.format_table(t)
        owner = conn.execute(
            sa.text("SELECT pg_has_role(relowner, 'MEMBER') FROM pg_class "
                    "WHERE oid = to_regclass(:t)"), {"t": table},
        ).scalar_one_or_none()  # fmt: skip
        if not owner:  # VACUUM would only warn and skip the table
            return Erased("postgresql", vacuumed=False, problem="only the table's owner "
                          f"(or a superuser) can VACUUM {t.fullname}")  # fmt: skip
        deadline = time.monotonic() + WAIT_FOR_OLDER
        while _older_transactions(conn, destroyed_at) and time.monotonic() < deadline:
            time.sleep(0.2)
        conn.exec_driver_sql("SET lock_timeout = '5s'")
        try:
            conn.exec_driver_sql(f"VACUUM FULL {table}")
        except sa.exc.DBAPIError as exc:  # the destroy is committed: report, do not raise
            return Erased("postgresql", vacuumed=False, problem=type(exc.orig).__name__)
        finally:
            conn.exec_driver_sql("RESET lock_timeout")  # the connection goes back to the pool
        older = _older_transactions(conn, destroyed_at)
    return Erased("postgresql", vacuumed=True, older_transactions=older)


WAIT_FOR_OLDER = 10.0  # seconds VACUUM FULL waits for transactions older than the destroy


def _older_transactions(conn: Connection, destroyed_at: datetime) -> int:
    """Transactions begun before the destroy that may keep its old row version alive: any
    with a transaction id (in every database: the removal horizon counts them), and any
    holding a snapshot in this database. (Without pg_read_all_stats, other users' sessions
    show no start time and are not counted.)"""
    count = conn.execute(
        sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND (xact_start AT TIME ZONE 'UTC') < :at AND (backend_xid IS NOT NULL "
                "OR (datname = current_database() AND backend_xmin IS NOT NULL))"),
        {"at": destroyed_at},
    ).scalar_one()  # fmt: skip
    return int(count)
