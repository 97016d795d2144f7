"""A data key per tenant at scale, against one shared data key on the same work (issue 13).

    PYTHONPATH=. python benchmarks/bench_tenants.py [--tenants 100000] [--rows-per-tenant 10]
        [--read-tenants 10000] [--url URL]

On PostgreSQL (default: a private database created on the server of KMS_FIELD_BENCH_URL, else
postgres@127.0.0.1:5432, and dropped at the end), with the master key in moto's KMS server over
HTTP (the test suite's, which counts calls per operation):

1. fills ``bench_notes`` with T tenants of R rows (``EncryptedText(key="pii",
   tenant="tenant_id")``), each tenant's key wrapped by the intermediate key ``pii`` v1
   (written in bulk with the library's own wrap and seal functions, then COPY);
2. a fresh process reads every row of N random tenants: the KMS calls it made, counted at the
   wire (target: one per intermediate-key version, here 1);
3. steady state, in this process with every key unwrapped: the time per value to read those
   N*R rows, against the same rows in ``bench_shared`` (one shared key, bound to the same
   tenant column: the same row-binding work) and ``bench_plain`` (one shared key, unbound), best
   of 3 after a warm-up; and Core inserts (executemany) of 20,000 rows the same three ways;
4. the first touch of a tenant (its key read from the table and unwrapped locally, no KMS):
   reading one row of each of 2,000 cold tenants against the same warm; creating the keys of
   1,000 new tenants (``ensure_tenant_key``);
5. the memory of the tenant-key cache at its bound: RSS before and after ``preload`` of
   ``max_keys`` = T tenants.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope, tenants
from sqlalchemy_kms_field.envelope import DataKey

ROOT = Path(__file__).resolve().parent.parent
metadata = sa.MetaData()
notes = sa.Table(
    "bench_notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False, index=True),
    sa.Column("body", kf.EncryptedString(400, key="pii", tenant="tenant_id")),
)
shared = sa.Table(
    "bench_shared",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False, index=True),
    sa.Column("body", kf.EncryptedString(400, key="pii", bind_to=("tenant_id",))),
)
plain = sa.Table(
    "bench_plain",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False, index=True),
    sa.Column("body", kf.EncryptedString(400, key="pii")),
)
TABLES = {"tenant keys": notes, "shared key, bound to tenant_id": shared, "shared key": plain}


def body(row_id: int) -> bytes:
    return f"note {row_id}: call back customer at +41 44 {row_id % 10_000_000:07d}".encode()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def configure(url: str, key_id: str, client: object = None, **bounds: int) -> sa.Engine:
    engine = sa.create_engine(url)
    master = kf.AwsKmsMasterKey(key_id, client=client) if client else kf.AwsKmsMasterKey(key_id)
    kf.configure(master_key=master, key_store=kf.SqlKeyStore(engine), active_ttl=600)
    kf.configure_tenants(max_keys=bounds.get("max_keys", 1_000_000))
    return engine


def fill(engine: sa.Engine, n_tenants: int, per_tenant: int, read: list[int]) -> float:
    started = time.perf_counter()
    keyring = tenants.get_keyring()
    intermediate = kf.get_registry().active_key("pii")
    table = keyring.table.name
    raw_conn = engine.raw_connection()
    try:
        cur = raw_conn.cursor()
        chosen = set(read)
        with cur.copy(  # type: ignore[attr-defined]
            f"COPY {table} (key_name, version, base, tenant, wrapped_key, state, created_at) "
            "FROM STDIN"
        ) as copy:
            keys: dict[int, DataKey] = {}
            for t in range(1, n_tenants + 1):
                name = tenants.tenant_key_name("pii", str(t))
                raw = os.urandom(32)
                wrapped = intermediate.encrypt_text(raw, tenants.wrap_context(table, name, 1))
                copy.write_row((name, 1, "pii", str(t), wrapped, "active", "2026-01-01"))
                keys[t] = DataKey(name, 1, raw)
        with cur.copy("COPY bench_notes (id, tenant_id, body) FROM STDIN") as copy:  # type: ignore[attr-defined]
            for t in range(1, n_tenants + 1):
                ctx = envelope.encode_context("bench_notes", "body", "str", [("tenant_id", str(t))])
                seal = keys[t].text_encrypter(ctx)
                for i in range(per_tenant):
                    row_id = t * per_tenant + i
                    copy.write_row((row_id, t, seal(body(row_id))))
        for target in (shared, plain):
            with cur.copy(f"COPY {target.name} (id, tenant_id, body) FROM STDIN") as copy:  # type: ignore[attr-defined]
                for t in read:
                    row = [("tenant_id", str(t))] if target is shared else []
                    ctx = envelope.encode_context(target.name, "body", "str", row)
                    seal = intermediate.text_encrypter(ctx)
                    for i in range(per_tenant):
                        row_id = t * per_tenant + i
                        copy.write_row((row_id, t, seal(body(row_id))))
        del chosen
        raw_conn.commit()
    finally:
        raw_conn.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    return time.perf_counter() - started


def read_tenants(engine: sa.Engine, table: sa.Table, ids: list[int], chunk: int = 1000) -> int:
    n = 0
    with engine.connect() as conn:
        for i in range(0, len(ids), chunk):
            q = sa.select(table.c.body).where(table.c.tenant_id.in_(ids[i : i + chunk]))
            for value in conn.execute(q).scalars():
                n += 1
                assert value.startswith("note ")
    return n


def best(fn: Callable[[], int], rounds: int = 3) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(rounds):
        gc.collect()
        started = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - started)
    return min(times), n


def child(url: str, key_id: str, ids_file: str) -> None:
    """A fresh process: configure, read every row of the tenants listed, report."""
    engine = configure(url, key_id)
    ids = json.loads(Path(ids_file).read_text())
    started = time.perf_counter()
    rows = read_tenants(engine, notes, ids)
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--rows-per-tenant", type=int, default=10)
    parser.add_argument("--read-tenants", type=int, default=10_000)
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "KMS_FIELD_BENCH_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    from tests.databases import create_private_database, drop_private_database
    from tests.kms_server import KmsServer, fake_aws_environment

    os.environ.update(fake_aws_environment())
    url = create_private_database(args.url)
    try:
        with KmsServer() as kms:
            run(args, url, kms)
    finally:
        drop_private_database(args.url, url)


def run(args: argparse.Namespace, url: str, kms: object) -> None:
    from tests.kms_server import KmsServer

    assert isinstance(kms, KmsServer)
    key_id = kms.create_key("bench tenants")
    engine = configure(url, key_id, kms.client())
    kf.SqlKeyStore(engine).create_table()
    kf.create_data_key("pii")
    kf.create_tenant_table()
    metadata.create_all(engine)
    rng = random.Random(13)
    read = sorted(rng.sample(range(1, args.tenants + 1), args.read_tenants))
    seconds = fill(engine, args.tenants, args.rows_per_tenant, read)
    print(f"filled {args.tenants:,} tenants x {args.rows_per_tenant} rows in {seconds:.1f} s")

    # 2. KMS calls of a fresh process reading N random tenants.
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(read, f)
    ids_file = Path(f.name)
    env = {**os.environ, **kms.env(), "PYTHONPATH": str(ROOT)}
    kms.reset_counts()
    out = subprocess.run(
        [sys.executable, __file__, "--child", url, key_id, str(ids_file)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    report = json.loads(out)
    counts = dict(kms.counts)
    print(
        f"fresh process, {args.read_tenants:,} random tenants, {report['rows']:,} rows in "
        f"{report['seconds']:.2f} s: KMS calls {counts} (intermediate-key versions: 1)"
    )
    ids_file.unlink()

    # 3. Steady state: every key unwrapped.
    results = {}
    for label, table in TABLES.items():
        read_tenants(engine, table, read)  # warm-up: keys unwrapped, caches filled
        t, n = best(lambda table=table: read_tenants(engine, table, read))  # type: ignore[misc]
        results[label] = t / n * 1e6
    base = results["shared key, bound to tenant_id"]
    for label, us in results.items():
        print(f"read  {label:<32} {us:6.2f} us/value  {us / base:.2f}x bound shared, "
              f"{us / results['shared key']:.2f}x shared")  # fmt: skip
    inserts = {}
    insert_tenants = read[:2000]
    for label, table in TABLES.items():

        def insert(table: sa.Table = table) -> int:
            rows = [{"id": 10**9 + t * 10 + i, "tenant_id": t, "body": "x" * 40}
                    for t in insert_tenants for i in range(10)]  # fmt: skip
            with engine.begin() as conn:
                conn.execute(table.insert(), rows)
                conn.execute(table.delete().where(table.c.id >= 10**9))
            return len(rows)

        insert()
        t, n = best(insert)
        inserts[label] = t / n * 1e6
    base = inserts["shared key, bound to tenant_id"]
    for label, us in inserts.items():
        print(f"insert {label:<31} {us:6.2f} us/value  {us / base:.2f}x bound shared, "
              f"{us / inserts['shared key']:.2f}x shared (insert + delete)")  # fmt: skip

    # 4. First touch: a cold tenant (key read from its table, unwrapped locally).
    cold = [t for t in range(1, args.tenants + 1) if t not in set(read)][:2000]
    one = sa.select(notes.c.body).where(notes.c.id == sa.bindparam("i"))

    def touch(ids: list[int]) -> float:
        started = time.perf_counter()
        with engine.connect() as conn:
            for t in ids:
                conn.execute(one, {"i": t * args.rows_per_tenant}).scalar_one()
        return time.perf_counter() - started

    tenants.get_keyring().forget()
    first = touch(cold)
    warm = min(touch(cold) for _ in range(3))
    print(f"first touch of a tenant: {(first - warm) / len(cold) * 1e6:.0f} us more than a warm "
          f"read ({first / len(cold) * 1e6:.0f} vs {warm / len(cold) * 1e6:.0f} us per one-row "
          "read)")  # fmt: skip
    fresh = list(range(args.tenants + 1, args.tenants + 1001))
    started = time.perf_counter()
    for t in fresh:
        kf.ensure_tenant_key("pii", t)
    print(f"a new tenant's key created on first use: "
          f"{(time.perf_counter() - started) / len(fresh) * 1e3:.2f} ms each")  # fmt: skip

    # 5. Memory of the cache at its bound.
    keyring = kf.configure_tenants(max_keys=args.tenants)
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    loaded = keyring.preload("pii")
    gc.collect()
    after = rss_mib()
    print(f"cache at its bound: {loaded:,} tenant keys, RSS +{after - before:.1f} MiB "
          f"({(after - before) * 2**20 / loaded:.0f} bytes per tenant), preloaded in "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    keyring2 = kf.configure_tenants(max_keys=10_000)
    del keyring
    gc.collect()
    keyring2.preload("pii", limit=10_000)
    print(f"with max_keys=10,000: {len(keyring2):,} entries held")
    engine.dispose()
    _ = statistics  # (kept for parity with the other benchmarks' imports)


if __name__ == "__main__":
    main()
