"""What the asyncio tests share: async URLs of the test databases, a model, a loop-stall probe."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_kms_field as kf

ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "mysql": "mysql+asyncmy",  # MariaDB
}


def async_url(sync_url: str) -> str:
    """The same database through its asyncio driver (aiosqlite, asyncpg, aiomysql)."""
    url = sa.make_url(sync_url)
    return url.set(drivername=ASYNC_DRIVERS[url.get_backend_name()]).render_as_string(
        hide_password=False
    )


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "async_people"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key="email-index", normalizer="email")
    )


class Memo(Base):
    """An encrypted column without a blind index (whose ORM writes hash outside a greenlet)."""

    __tablename__ = "async_memos"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))


PEOPLE: sa.Table = Person.__table__  # type: ignore[assignment]


class StallProbe:
    """A task that sleeps ``tick`` seconds in a loop and records how late it wakes: the
    longest lateness is the longest time the event loop was blocked (plus scheduling noise)."""

    def __init__(self, tick: float = 0.001) -> None:
        self.tick = tick
        self.stalls: list[tuple[float, float]] = []  # (monotonic time, lateness in s)
        self._task: asyncio.Task[Any] | None = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            self.stalls.append((now, now - before - self.tick))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def longest(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max((s for t, s in self.stalls if start <= t <= end), default=0.0)
