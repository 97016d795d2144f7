"""Pacing by the database's health: workers slow down and stop when the database says so.

Before each batch is written, a worker asks its :class:`Gate` (at most every ``check_every``
seconds) for the replication lag, and holds while it is above ``max_lag``; after each batch,
a write that took longer than ``max_batch_seconds`` makes it rest in proportion. The lag is
measured by ``lag`` (any callable returning seconds, or None when unknown), else on the
database itself:

* PostgreSQL: on a primary, the largest ``replay_lag`` in ``pg_stat_replication``; on a
  replica, the age of ``pg_last_xact_replay_timestamp()``.
* MariaDB / MySQL: ``Seconds_Behind_Master`` of ``SHOW ALL SLAVES STATUS`` on each engine of
  ``replicas`` (a MariaDB primary does not know its replicas' lag).

``rows_per_second`` (``run_job``) still caps the rate on top of this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..exc import ConfigurationError

log = logging.getLogger(__name__)

LagProbe = Callable[[], "float | None"]


@dataclass(frozen=True)
class Pacing:
    """When workers hold back. Every bound is optional; none given: no pacing."""

    max_lag: float | None = None  # seconds of replication lag before workers hold
    lag: LagProbe | None = None  # measures the lag; default: the database's own (above)
    replicas: Sequence[Engine] = field(default_factory=tuple)  # also measured (MariaDB)
    max_batch_seconds: float | None = None  # a batch write slower than this: rest
    check_every: float = 1.0  # seconds between two lag measurements
    max_hold: float | None = None  # give up (raise) after holding this long; None: never

    def __post_init__(self) -> None:
        for name in ("max_lag", "max_batch_seconds", "max_hold"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigurationError(f"Pacing({name}={value!r}): use seconds above 0")
        if self.lag is not None and self.max_lag is None:
            raise ConfigurationError("Pacing(lag=...) needs max_lag= (the bound it is held to)")

    def gate(self, engine: Engine) -> Gate:
        """The gate one worker asks before each batch (each worker has its own)."""
        return Gate(self, engine)


class Gate:
    """One worker's view of :class:`Pacing`: ``hold()`` before a batch, ``after(...)`` after."""

    def __init__(self, pacing: Pacing, engine: Engine) -> None:
        self.pacing, self.engine = pacing, engine
        self._checked = 0.0
        self.state = ""  # why it holds, for status ("" when it does not)
        self.held = 0.0  # seconds held so far, in all

    def lag(self) -> float | None:
        if self.pacing.lag is not None:
            return self.pacing.lag()
        measured = [database_lag(e) for e in (self.engine, *self.pacing.replicas)]
        known = [x for x in measured if x is not None]
        return max(known) if known else None

    def hold(self, alive: Callable[[], None] = lambda: None) -> None:
        """Sleep while the lag is above ``max_lag`` (``alive`` is called between checks, and
        may raise: a pause or cancel then wins over the wait)."""
        p = self.pacing
        if p.max_lag is None:
            return
        now = time.monotonic()
        if now - self._checked < p.check_every:
            return
        self._checked = now
        started = now
        while True:
            lag = self.lag()
            if lag is None or lag <= p.max_lag:
                self.state = ""
                return
            if not self.state:
                log.info("replication lag %.1f s above %.1f s: holding", lag, p.max_lag)
            self.state = f"holding: replication lag {lag:.1f}s > {p.max_lag:g}s"
            waited = time.monotonic() - started
            if p.max_hold is not None and waited >= p.max_hold:
                raise TimeoutError(
                    f"replication lag stayed above {p.max_lag:g} s for {waited:.0f} s"
                )
            time.sleep(p.check_every)
            self.held += p.check_every
            self._checked = time.monotonic()
            alive()

    def after(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` took ``seconds`` to write: rest if that was above the bound."""
        bound = self.pacing.max_batch_seconds
        if bound is None or seconds <= bound:
            return
        rest = min(2 * (seconds - bound), 30.0)
        self.state = f"resting: a batch took {seconds:.2f}s > {bound:g}s"
        time.sleep(rest)
        self.held += rest
        self.state = ""


def database_lag(engine: Engine) -> float | None:
    """Replication lag in seconds as ``engine``'s database reports it; None if it cannot tell."""
    name = engine.dialect.name
    try:
        with engine.connect() as conn:
            if name == "postgresql":
                value = conn.execute(
                    sa.text(
                        "SELECT CASE WHEN pg_is_in_recovery() THEN "
                        "EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) "
                        "ELSE (SELECT EXTRACT(EPOCH FROM max(replay_lag)) "
                        "FROM pg_stat_replication) END"
                    )
                ).scalar()
                return float(value) if value is not None else 0.0
            if name in ("mysql", "mariadb"):
                command = "SHOW ALL SLAVES STATUS" if name == "mariadb" else "SHOW REPLICA STATUS"
                rows = conn.execute(sa.text(command)).mappings().all()
                lags = [
                    r.get("Seconds_Behind_Master", r.get("Seconds_Behind_Source")) for r in rows
                ]
                if any(v is None for v in lags) and lags:
                    return None  # a replica whose SQL thread stopped: unknown
                return float(max((v for v in lags if v is not None), default=0))
    except sa.exc.DBAPIError as exc:  # no privilege to look: say so once, go on unpaced
        log.warning("cannot read replication lag on %s: %s", name, type(exc.orig).__name__)
        return None
    return None
