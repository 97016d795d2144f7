"""What destroying a wrapped key erases from the database's storage, and what it cannot reach.

Overwriting a row is not erasing it: PostgreSQL keeps the old row version in the table's file
until a VACUUM (and a plain VACUUM leaves its bytes in the page's free space), MySQL/MariaDB keep
it in the undo log, and every database keeps it in its logs, replicas and backups.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine


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
    (the tests read the table's file and found the old wrapped key there); VACUUM FULL
    writes a new file holding only the live rows. It locks the (small) table for a moment,
    so it waits at most 5 s for the lock. It cannot run inside a transaction, and keeps a
    row version that a transaction begun before the destroy may still see: those
    transactions are counted and reported.
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
        conn.exec_driver_sql("SET lock_timeout = '5s'")
        try:
            conn.exec_driver_sql(f"VACUUM FULL {table}")
        except sa.exc.DBAPIError as exc:  # the destroy is committed: report, do not raise
            return Erased("postgresql", vacuumed=False, problem=type(exc.orig).__name__)
        finally:
            conn.exec_driver_sql("RESET lock_timeout")  # the connection goes back to the pool
        older = conn.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND datname = current_database() AND backend_xmin IS NOT NULL "
                    "AND (xact_start AT TIME ZONE 'UTC') < :at"),
            {"at": destroyed_at},
        ).scalar_one()  # fmt: skip
    return Erased("postgresql", vacuumed=True, older_transactions=int(older))
