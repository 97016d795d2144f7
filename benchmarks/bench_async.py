"""An asyncio ORM workload on asyncpg: ``EncryptedString`` against ``String``, with metrics off,
on (through the OpenTelemetry SDK) and with OpenTelemetry absent; and the event loop's longest
stall while the key states are refreshed and a rotation is picked up.

Run it from the project root with PostgreSQL on 127.0.0.1:5432 (``pip install -e '.[dev]'``)::

    python benchmarks/bench_async.py                 # 100,000 rows, best of 3
    python benchmarks/bench_async.py --rows 20000    # quicker, noisier
    python benchmarks/bench_async.py --json

It creates a database of its own on the server (dropped at the end). For each mode, in one
process, it times (``time.perf_counter``, best of ``--repeat`` rounds, the plain and encrypted
tables interleaved):

* ORM insert: ``session.add_all(objects)`` then ``await session.commit()`` (objects built
  beforehand, untimed; explicit ids);
* ORM select: ``(await session.scalars(select(Model))).all()`` in a fresh ``AsyncSession``.

Modes: ``off`` (metrics not enabled) and ``on`` (``enable_metrics`` with the SDK's
``MeterProvider`` and an ``InMemoryMetricReader``, collected after each operation), interleaved
in every round of one process; and ``absent``, in a child process where ``import
opentelemetry`` fails (its code path is off's: one flag test per value). Printed: seconds per
operation, the encrypted/plain ratio (target: within 1.2x), and the encrypted time with metrics
on against off (target: under 5% more); ``absent`` against ``off`` shows the extra's absence
costs nothing. The client process's CPU time (``time.process_time``) is printed too: unlike
the wall clock, another process's load on the machine barely moves it.

The stall: a task sleeps 1 ms in a loop and records how late it wakes, while the background
refresh runs every ``active_ttl / 2`` (``active_ttl`` = 0.2 s) and another process rotates the
key 5 times; once with no other task (what the refresh itself blocks), once with 8 tasks
serving requests (insert, read back: their own ORM work between two awaits shows up too).
Printed: the longest lateness during a background refresh, overall, and the 99th percentile;
and the most CPU time the loop's thread spent between two wake-ups of the probe during a
refresh (``time.thread_time``): the stall the code causes, without the time the OS gave the
CPU to other processes (which dominates the wall-clock figure on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import gc
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy_kms_field as kf  # noqa: E402
import sqlalchemy_kms_field.asyncio as kfa  # noqa: E402

SERVER = os.environ.get(
    "KMS_FIELD_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
)
MASTER = kf.LocalMasterKey(bytes(range(32)))


class Base(DeclarativeBase):
    pass


class Plain(Base):
    __tablename__ = "bench_plain"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(320))


class Secret(Base):
    __tablename__ = "bench_secret"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))


def say(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def create_database() -> tuple[str, str]:
    name = f"kf_bench_async_{os.getpid()}_{secrets.token_hex(3)}"
    engine = sa.create_engine(SERVER, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    sync = sa.make_url(SERVER).set(database=name)
    return (
        sync.render_as_string(hide_password=False),
        sync.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False),
    )


def drop_database(sync_url: str) -> None:
    name = sa.make_url(sync_url).database
    engine = sa.create_engine(SERVER, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    engine.dispose()


async def prepare(aengine: AsyncEngine, active_ttl: float = 60.0) -> None:
    store = kf.SqlKeyStore(aengine)
    await kfa.run_sync(store.create_table)
    async with aengine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    kf.configure(master_key=MASTER, key_store=store, active_ttl=active_ttl)
    await kfa.create_data_key("pii", exist_ok=True)
    await kfa.preload()


async def time_workload(
    aengine: AsyncEngine, rows: int, repeat: int, modes: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Best time per mode and operation; each round runs every mode and both tables, so that
    the machine's drift hits them alike."""
    emails = [f"user{i}.{secrets.token_hex(4)}@example.org" for i in range(rows)]
    best: dict[str, dict[str, float]] = {mode: {} for mode in modes}
    for _ in range(repeat):
        for mode in modes:
            collect: Any = lambda: None  # noqa: E731
            if mode == "on":
                from opentelemetry.sdk.metrics import MeterProvider
                from opentelemetry.sdk.metrics.export import InMemoryMetricReader

                reader = InMemoryMetricReader()
                kf.enable_metrics(MeterProvider(metric_readers=[reader]))
                collect = reader.get_metrics_data
            for model in (Plain, Secret):
                for op, took in (await time_model(aengine, model, emails, collect)).items():
                    key = f"{model.__name__.lower()}_{op}"
                    best[mode][key] = min(best[mode].get(key, took), took)
            if mode == "on":
                kf.disable_metrics()
    return best


async def time_model(
    aengine: AsyncEngine, model: Any, emails: list[str], collect: Any
) -> dict[str, float]:
    async with aengine.begin() as conn:
        await conn.execute(sa.delete(model))
    objects = [model(id=i, email=e) for i, e in enumerate(emails)]
    gc.collect()
    async with AsyncSession(aengine) as session:
        started, cpu = time.perf_counter(), time.process_time()
        session.add_all(objects)
        await session.commit()
        inserted = time.perf_counter() - started
        inserted_cpu = time.process_time() - cpu
    collect()
    del objects
    gc.collect()
    async with AsyncSession(aengine) as session:
        started, cpu = time.perf_counter(), time.process_time()
        got = (await session.scalars(sa.select(model))).all()
        selected = time.perf_counter() - started
        selected_cpu = time.process_time() - cpu
    collect()
    assert len(got) == len(emails)
    return {
        "insert": inserted,
        "select": selected,
        "insert_cpu": inserted_cpu,
        "select_cpu": selected_cpu,
    }


async def workload(
    async_url: str, rows: int, repeat: int, modes: Sequence[str]
) -> dict[str, dict[str, float]]:
    aengine = create_async_engine(async_url)
    try:
        await prepare(aengine)
        return await time_workload(aengine, rows, repeat, modes)
    finally:
        await kfa.close()
        await aengine.dispose()


async def stall(sync_url: str, async_url: str, seconds: float, clients: int) -> dict[str, float]:
    aengine = create_async_engine(async_url, pool_size=10)
    await prepare(aengine, active_ttl=0.2)
    registry = kf.get_registry()
    assert isinstance(registry, kfa.AsyncKeyRegistry)
    windows: list[tuple[float, float]] = []
    refresh = registry.refresh_async

    async def timed() -> None:
        started = time.monotonic()
        try:
            await refresh()
        finally:
            windows.append((started, time.monotonic() + 0.001))

    registry.refresh_async = timed  # type: ignore[method-assign]
    lateness: list[tuple[float, float, float]] = []  # (when, wall lateness, loop CPU)
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            before, cpu = time.monotonic(), time.thread_time()
            await asyncio.sleep(0.001)
            now = time.monotonic()
            lateness.append((now, now - before - 0.001, time.thread_time() - cpu))

    counter = iter(range(10**7))

    async def client() -> None:
        while not stop.is_set():
            i = next(counter)
            async with AsyncSession(aengine) as session:
                session.add(Secret(id=10**6 + i, email=f"u{i}@example.org"))
                await session.commit()
                assert (await session.get(Secret, 10**6 + i)) is not None
            await asyncio.sleep(0.002)

    # Another process rotates (a thread here would take the GIL from the loop).
    rotate = (
        "import sys, time, sqlalchemy as sa, sqlalchemy_kms_field as kf\n"
        "engine = sa.create_engine(sys.argv[1])\n"
        "registry = kf.KeyRegistry(kf.LocalMasterKey(bytes(range(32))), kf.SqlKeyStore(engine))\n"
        "for _ in range(5):\n"
        "    time.sleep(float(sys.argv[2]))\n"
        "    registry.rotate_data_key('pii')\n"
    )
    loads_before, first = registry.loop_loads, registry.active_key("pii").version
    tasks = [asyncio.create_task(probe())]
    tasks += [asyncio.create_task(client()) for _ in range(clients)]
    rotator = await asyncio.create_subprocess_exec(
        sys.executable, "-c", rotate, sync_url, str(seconds / 6), cwd=ROOT
    )
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    assert await rotator.wait() == 0
    await asyncio.sleep(0.2)  # the last rotation's refresh
    active = registry.active_key("pii").version
    await kfa.close()
    await aengine.dispose()

    def longest(a: float, b: float, i: int = 1) -> float:
        return max((x[i] for x in lateness if a <= x[0] <= b), default=0.0)

    late = sorted(x[1] for x in lateness)
    return {
        "refreshes": len(windows),
        "rotations_picked_up": active - first,
        "loop_loads": registry.loop_loads - loads_before,
        "longest_stall_in_refresh_ms": 1000 * max(longest(a, b) for a, b in windows),
        "longest_loop_cpu_in_refresh_ms": 1000 * max(longest(a, b, 2) for a, b in windows),
        "longest_stall_ms": 1000 * late[-1],
        "p99_stall_ms": 1000 * late[int(len(late) * 0.99)],
    }


def processor_costs(rows: int, repeat: int) -> dict[str, float]:
    """Microseconds per value of the column's bind and result processors alone (no database,
    no SQLAlchemy around them), metrics off and on: what metrics add per value, free of the
    database's noise."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
    from sqlalchemy.pool import StaticPool

    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    store = kf.SqlKeyStore(engine)
    store.create_table()
    kf.configure(master_key=MASTER, key_store=store)
    kf.create_data_key("pii")
    dialect = asyncpg_dialect()
    typ = Secret.__table__.c.email.type
    bind, result = typ.bind_processor(dialect), typ.result_processor(dialect, None)
    values = [f"user{i}.{secrets.token_hex(4)}@example.org" for i in range(rows)]
    stored = [bind(v) for v in values]
    best: dict[str, float] = {"floor": min(bare_decrypt(typ, stored) for _ in range(repeat))}
    for _ in range(repeat):
        for mode in ("off", "on"):
            if mode == "on":
                kf.enable_metrics(MeterProvider(metric_readers=[InMemoryMetricReader()]))
            for op, fn, data in (("bind", bind, values), ("result", result, stored)):
                gc.collect()
                started = time.perf_counter()
                for v in data:
                    fn(v)
                took = 1e6 * (time.perf_counter() - started) / rows
                best[f"{op}_{mode}"] = min(best.get(f"{op}_{mode}", took), took)
            kf.disable_metrics()
    engine.dispose()
    return best


def bare_decrypt(typ: Any, stored: list[str]) -> float:
    """Microseconds per value of the floor: base64url decode by the cheapest route
    (``binascii``, no checks), the bare AES-256-GCM-SIV decrypt (``cryptography`` directly),
    the padding marker cut and UTF-8 decode; what any decryption of these stored values
    costs, whatever calls it."""
    key = kf.get_registry().active_key("pii")
    decrypt, aad = key._aead.decrypt, key.header_bytes + typ.context_bytes()
    skip, a2b, to_standard = len(key.header), binascii.a2b_base64, bytes.maketrans(b"-_", b"+/")
    gc.collect()
    started = time.perf_counter()
    for value in stored:
        raw = a2b(value[skip:].encode("ascii").translate(to_standard) + b"==")
        decrypt(raw[:12], raw[12:], aad)[:-1].decode("utf-8")
    return 1e6 * (time.perf_counter() - started) / len(stored)


def hook_costs() -> dict[str, float]:
    """Nanoseconds per value of what the metrics add to a processor, timed alone (timeit,
    best of 5): the flag test every value pays (metrics off, or OpenTelemetry absent) and the
    count a value pays with metrics on."""
    import timeit

    from sqlalchemy_kms_field import metrics

    key = kf.DataKey("pii", 1, bytes(32))
    n, names = 1_000_000, {"m": metrics, "k": key, "t": Secret.__table__.c.email.type}

    def best(statement: str) -> float:
        return 1e9 * min(timeit.repeat(statement, globals=names, number=n, repeat=5)) / n

    return {
        "flag_ns": best("m.ON"),
        "encrypt_count_ns": best("m.encrypted(k)"),
        "decrypt_count_ns": best("m.decrypted(k, t)"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stall-seconds", type=float, default=6.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # async URL: run mode 'absent' here
    args = parser.parse_args(argv)

    if args.child:
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
        found = asyncio.run(workload(args.child, args.rows, args.repeat, ["off"]))
        print(json.dumps(found["off"]))
        return 0

    sync_url, async_url = create_database()
    results: dict[str, Any] = {"rows": args.rows}
    try:
        say(f"metrics off and on, interleaved: {args.rows:,} rows, best of {args.repeat}")
        results.update(asyncio.run(workload(async_url, args.rows, args.repeat, ["off", "on"])))
        say("OpenTelemetry absent (a child process)")
        child = subprocess.run(
            [sys.executable, __file__, "--child", async_url, "--rows", str(args.rows),
             "--repeat", str(args.repeat)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results["absent"] = json.loads(child.stdout.strip().splitlines()[-1])
        say("processors alone, metrics off and on")
        results["processors"] = processor_costs(args.rows, args.repeat + 2)
        results["hooks"] = hook_costs()
        for clients in (0, 8):
            say(f"loop stall during key refreshes, {clients} clients")
            results[f"stall_{clients}"] = asyncio.run(
                stall(sync_url, async_url, args.stall_seconds, clients)
            )
    finally:
        drop_database(sync_url)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"async ORM on asyncpg, {args.rows:,} rows, best of {args.repeat} (seconds)")
    print(f"{'mode':<8}{'op':<8}{'String':>9}{'Encrypted':>11}{'ratio':>8}   client CPU ratio")
    for mode in ("off", "on", "absent"):
        r = results[mode]
        for op in ("insert", "select"):
            plain, enc = r[f"plain_{op}"], r[f"secret_{op}"]
            cpu = r[f"secret_{op}_cpu"] / r[f"plain_{op}_cpu"]
            print(f"{mode:<8}{op:<8}{plain:>9.3f}{enc:>11.3f}{enc / plain:>7.2f}x   {cpu:.2f}x")
    print("encrypted, metrics on vs off / absent vs off (relative to each run's String):")
    for op in ("insert", "select"):
        rel = {
            m: results[m][f"secret_{op}"] / results[m][f"plain_{op}"]
            for m in results
            if m in ("off", "on", "absent")
        }
        on, absent = rel["on"] / rel["off"] - 1, rel["absent"] / rel["off"] - 1
        cpu = {m: results[m][f"secret_{op}_cpu"] for m in ("off", "on", "absent")}
        print(
            f"  {op}: on {on:+.1%}, absent {absent:+.1%}; client CPU of the encrypted run: "
            f"on {cpu['on'] / cpu['off'] - 1:+.1%}, absent {cpu['absent'] / cpu['off'] - 1:+.1%}"
        )
    p = results["processors"]
    for op in ("bind", "result"):
        print(
            f"  processor alone, {op}: {p[f'{op}_off']:.3f} us/value off, {p[f'{op}_on']:.3f} on "
            f"({p[f'{op}_on'] - p[f'{op}_off']:+.3f} us)"
        )
    per_row = 1e6 * results["off"]["plain_select"] / args.rows
    print(
        f"  floor: the bare decrypt alone costs {p['floor']:.3f} us/value, the String select "
        f"{per_row:.2f} us/row: no encrypted select can beat "
        f"{(per_row + p['floor']) / per_row:.2f}x; the result processor costs "
        f"{p['result_off'] / p['floor']:.2f}x the floor"
    )
    h = results["hooks"]
    print(
        f"  per value: flag test {h['flag_ns']:.0f} ns (off or absent); with metrics on, "
        f"{h['encrypt_count_ns']:.0f} ns per encryption, {h['decrypt_count_ns']:.0f} ns per "
        "decryption"
    )
    for clients in (0, 8):
        s = results[f"stall_{clients}"]
        print(
            f"loop stall, {clients} clients: {s['longest_stall_in_refresh_ms']:.2f} ms longest "
            f"during {s['refreshes']} key refreshes ({s['rotations_picked_up']} rotations picked "
            f"up, {s['loop_loads']} key loads in processors), of which the loop's own CPU "
            f"{s['longest_loop_cpu_in_refresh_ms']:.2f} ms; overall longest "
            f"{s['longest_stall_ms']:.2f} ms, p99 {s['p99_stall_ms']:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
