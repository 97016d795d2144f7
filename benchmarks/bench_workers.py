"""Re-encryption with 1, 2 and 4 workers against a plain batched rewrite with 1, 2 and 4
connections, on PostgreSQL or MariaDB: rows per second and CPU per row (client and server).

    python benchmarks/bench_workers.py --url postgresql+psycopg://postgres@127.0.0.1/kf_bench
    python benchmarks/bench_workers.py --url mysql+pymysql://root@127.0.0.1/kf_bench --rows 200000

The script creates and drops only its own tables (``bench_workers*``, keys in
``bench_workers_keys``); the job itself uses the library's ``kms_field_*`` tables (created if
missing) and the script deletes its own rows there. Point it at a database of your own.

For each W in ``--workers`` (default 1, 2, 4), from the same physical state each time (table
refilled from a copy, analyzed):

(a) baseline: W processes, each rewriting its own slice of the primary key with a keyset loop
    in batches of ``--batch-size``: read a page, swap the header ``kf2:bench:1:`` for
    ``kf2:bench:2:`` (no cryptography), one compare-and-swap UPDATE per batch (PostgreSQL:
    ``UPDATE ... FROM unnest(...)`` with binary arrays; MariaDB: executemany), a checkpoint
    row of its own, commit. Raw driver, no SQLAlchemy.
(b) library: the job is started here (``run_job(workers=0)``: ranges planned), then W fresh
    processes join it (``reencrypt_column(join=True)``), each a worker claiming ranges; the time
    runs until the last one returns (the finishing census included).

Printed per W: seconds, rows/s, the ratio library/baseline at the same W, the speed-up over
W = 1, CPU per row of the client processes (each one's own during its job, start-up left out)
and of the database server
(every ``postgres`` or ``mariadbd`` process on this machine, from /proc: background writers
included), and each worker's peak memory growth (``VmHWM`` reset after its set-up).

``--rounds N`` repeats every W N times (the table gives each round's figures and the medians).
``--before DIR`` adds a contender to every round: the same workers run by an older copy of the
package (``DIR`` holds its ``sqlalchemy_kms_field`` folder, e.g. a ``git worktree`` of an older
commit, imported through ``PYTHONPATH``), from the same state, right after this package's.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rotation import make_emails, peak_rss, peak_rss_reset

KEY = "bench"
TABLE = "bench_workers"
SNAPSHOT = "bench_workers_v1"
CHECKPOINTS = "bench_workers_checkpoints"
KEYS_TABLE = "bench_workers_keys"
MASTER_VARIABLE = "KMS_FIELD_BENCH_MASTER_KEY"
ACTIVE_TTL = 0.5


def configure(engine: sa.Engine, master: bytes) -> kf.KeyRegistry:
    store = kf.SqlKeyStore(engine, table_name=KEYS_TABLE)
    return kf.configure(
        master_key=kf.LocalMasterKey(master), key_store=store, active_ttl=ACTIVE_TTL
    )


def admin(engine: sa.Engine, *statements: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def drop(engine: sa.Engine) -> None:
    admin(
        engine, *(f"DROP TABLE IF EXISTS {t}" for t in (TABLE, SNAPSHOT, CHECKPOINTS, KEYS_TABLE))
    )
    inspector = sa.inspect(engine)
    with engine.begin() as conn:
        for name in (
            "kms_field_jobs",
            "kms_field_columns",
            "kms_field_job_ranges",
            "kms_field_job_workers",
            "kms_field_job_control",
        ):
            if inspector.has_table(name):
                conn.execute(sa.text(f"DELETE FROM {name} WHERE table_name = :t"), {"t": TABLE})


def fill(engine: sa.Engine, rows: int, data_key: kf.DataKey) -> None:
    context = envelope.encode_context(TABLE, "email", "str")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, email VARCHAR(400))")
        conn.exec_driver_sql(
            f"CREATE TABLE {CHECKPOINTS} (worker INTEGER PRIMARY KEY, last_key INTEGER, "
            "rows_done BIGINT NOT NULL)"
        )
    emails = make_emails(rows)
    chunk = 20_000
    t = sa.table(TABLE, sa.column("id"), sa.column("email"))
    for start in range(0, rows, chunk):
        values = data_key.encrypt_many([e.encode() for e in emails[start : start + chunk]], context)
        with engine.begin() as conn:
            conn.execute(
                t.insert(),
                [{"id": start + i + 1, "email": v} for i, v in enumerate(values)],
            )
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {SNAPSHOT} AS SELECT * FROM {TABLE}")


def restore(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM {TABLE}")
        conn.exec_driver_sql(f"INSERT INTO {TABLE} SELECT * FROM {SNAPSHOT} ORDER BY id")
        conn.exec_driver_sql(f"DELETE FROM {CHECKPOINTS}")
    if engine.dialect.name == "postgresql":
        admin(engine, f"VACUUM ANALYZE {TABLE}")
        try:
            admin(engine, "CHECKPOINT")
        except sa.exc.DBAPIError:
            pass
    else:
        admin(engine, f"ANALYZE TABLE {TABLE}")


def server_cpu() -> float:
    """CPU seconds of every database server process on this machine (0 if none is visible)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() not in ("postgres", "mariadbd", "mysqld"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime + stime, and cutime + cstime: the postmaster collects the CPU of the backends
        # that ended (the workers' connections close before the second reading).
        total += sum(int(x) for x in fields[11:15]) / tick
    return total


# Children -----------------------------------------------------------------------------------


def baseline_child(url: str, lo: int, hi: int, worker: int, batch_size: int) -> None:
    """Rewrite ids lo..hi with the plain keyset loop; print rows written."""
    engine = sa.create_engine(url)
    old_head, new_head = envelope.header(KEY, 1), envelope.header(KEY, 2)
    skip = len(old_head)
    raw = engine.raw_connection()
    conn: Any = raw.driver_connection
    pg = engine.dialect.name == "postgresql"
    written, last = 0, lo - 1
    started, cpu = time.time(), time.process_time()
    cur = conn.cursor()
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO {CHECKPOINTS} VALUES (:w, NULL, 0)"), {"w": worker})
    select = f"SELECT id, email FROM {TABLE} WHERE id > %s AND id <= %s ORDER BY id LIMIT %s"
    checkpoint = (
        f"UPDATE {CHECKPOINTS} SET last_key = %s, rows_done = rows_done + %s WHERE worker = %s"
    )
    update_pg = (
        f"UPDATE {TABLE} AS t SET email = v.new "
        "FROM unnest(%b::integer[], %b::text[], %b::text[]) AS v(id, old, new) "
        "WHERE t.id = v.id AND t.email = v.old AND t.id BETWEEN %s AND %s"
    )
    update_my = f"UPDATE {TABLE} SET email = %s WHERE id = %s AND email = %s"
    while True:
        if pg:
            cur.execute(select, (last, hi, batch_size), prepare=True)
        else:
            cur.execute(select, (last, hi, batch_size))
        rows = cur.fetchall()
        if not rows:
            conn.rollback()
            break
        ids = [r[0] for r in rows]
        olds = [r[1] for r in rows]
        news = [new_head + o[skip:] for o in olds]
        if pg:
            cur.execute(update_pg, (ids, olds, news, ids[0], ids[-1]), prepare=True)
            written += cur.rowcount
            cur.execute(checkpoint, (ids[-1], len(rows), worker), prepare=True)
        else:
            written += cur.executemany(update_my, list(zip(news, ids, olds, strict=True)))
            cur.execute(checkpoint, (ids[-1], len(rows), worker))
        conn.commit()
        last = ids[-1]
    raw.close()
    ended, cpu = time.time(), time.process_time() - cpu
    print(json.dumps({"written": written, "started": started, "ended": ended, "cpu": cpu}))


def library_child(url: str, run_id: str, batch_size: int) -> None:
    engine = sa.create_engine(url)
    registry = configure(engine, base64.b64decode(os.environ[MASTER_VARIABLE]))
    registry.preload([KEY])
    before = peak_rss_reset()
    started, cpu = time.time(), time.process_time()
    result = kf.reencrypt_column(
        engine, TABLE, "email", key=KEY, batch_size=batch_size, join=True, run_id=run_id,
        codec="str",
    )  # fmt: skip
    print(
        json.dumps(
            {
                "written": result.rows_written,
                "conflicted": result.rows_conflicted,
                "finished": result.finished,
                "growth_kib": peak_rss() - before,
                "started": started,
                "ended": time.time(),
                "cpu": time.process_time() - cpu,
            }
        )
    )


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def collect(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a child failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def check_all_moved(engine: sa.Engine, rows: int) -> None:
    head = envelope.header(KEY, 2)
    with engine.connect() as conn:
        done = conn.execute(
            sa.text(f"SELECT count(*) FROM {TABLE} WHERE substr(email, 1, {len(head)}) = :h"),
            {"h": head},
        ).scalar_one()
    if done != rows:
        raise SystemExit(f"only {done} of {rows} rows on {head}")


# Main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KMS_FIELD_BENCH_URL"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before", action="append", default=[], metavar="DIR")
    parser.add_argument("--baseline-child", nargs=4, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--library-child", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("--url (or KMS_FIELD_BENCH_URL) names the database to use")
    for folder in args.before:
        if not os.path.isdir(os.path.join(folder, "sqlalchemy_kms_field")):
            parser.error(f"--before {folder}: that folder holds no sqlalchemy_kms_field package")
    if args.baseline_child:
        baseline_child(args.url, *args.baseline_child[:3], args.baseline_child[3])
        return 0
    if args.library_child:
        library_child(args.url, args.library_child, args.batch_size)
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    engine = sa.create_engine(args.url)
    drop(engine)
    master = secrets.token_bytes(32)
    registry = configure(engine, master)
    registry.key_store.create_table()
    registry.create_data_key(KEY)
    log(f"filling {args.rows:,} rows on {engine.dialect.name} ...")
    fill(engine, args.rows, registry.active_key(KEY))
    registry.rotate_data_key(KEY)
    time.sleep(ACTIVE_TTL + 2.5)  # the job does not finish before every process could know
    env = dict(os.environ, **{MASTER_VARIABLE: base64.b64encode(master).decode("ascii")})
    batch = ["--url", args.url, "--batch-size", str(args.batch_size)]
    kinds = ["baseline", "library", *args.before]
    # results[w][kind]: one figures dict per round
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for w in [int(x) for x in args.workers.split(",")]:
        results[w] = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                results[w][kind].append(measure(args, engine, registry, env, batch, w, kind))
                log(f"W={w} {kind}: {results[w][kind][-1]['rows_s']:,.0f} rows/s")

    print(f"{engine.dialect.name}, {args.rows:,} rows, batch {args.batch_size}")
    print(
        "| W | contender | rows/s | against the plain rewrite | speed-up over W=1 "
        "| CPU/row client + server | worker peak growth |"
    )
    print("|---|---|---|---|---|---|---|")
    first = min(results)
    for w, by_kind in results.items():
        for kind in kinds:
            label = "plain rewrite" if kind == "baseline" else (
                "library" if kind == "library" else f"before {os.path.basename(kind.rstrip('/'))}"
            )  # fmt: skip
            # Each round against the baseline of its round and this contender's W=1 figure of
            # its round; the medians against the medians.
            lines = zip(
                _rounds(by_kind[kind]),
                _rounds(by_kind["baseline"]),
                _rounds(results[first][kind]),
                strict=True,
            )
            for (suffix, f), (_, base), (_, one) in lines:
                print(
                    f"| {w} | {label}{suffix} | {f['rows_s']:,.0f} "
                    f"| {f['rows_s'] / base['rows_s']:.2f}x "
                    f"| {f['rows_s'] / one['rows_s']:.2f}x "
                    f"| {f['client_us']:.1f} + {f['server_us']:.1f} µs "
                    f"| {f['growth_kib'] / 1024:.1f} MiB |"
                )
    drop(engine)
    return 0


def _rounds(runs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The lines of a table for these rounds: each round, then the medians (one round: itself)."""
    if len(runs) == 1:
        return [("", runs[0])]
    return [*((f" round {i}", r) for i, r in enumerate(runs, 1)), (" (median)", _median(runs))]


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (the CPU of client and server taken separately)."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def measure(
    args: argparse.Namespace,
    engine: sa.Engine,
    registry: kf.KeyRegistry,
    env: dict[str, str],
    batch: list[str],
    w: int,
    kind: str,
) -> dict[str, Any]:
    """One run of ``kind`` (the baseline, this package, or the one in a --before folder) with
    ``w`` processes, from the same physical state."""
    restore(engine)
    cpu_server = server_cpu()
    planned = 0.0
    if kind == "baseline":
        step = -(-args.rows // w)
        procs = [
            spawn([*batch, "--baseline-child", str(k * step + 1), str((k + 1) * step),
                   str(k), str(args.batch_size)], env)
            for k in range(w)
        ]  # fmt: skip
    else:
        began = time.perf_counter()
        started = kf.reencrypt_column(
            engine, TABLE, "email", key=KEY, batch_size=args.batch_size, workers=0,
            codec="str", registry=registry,
        )  # fmt: skip
        planned = time.perf_counter() - began
        child_env = env
        if kind != "library":  # an older copy of the package, first on the path
            child_env = dict(
                env, PYTHONPATH=os.pathsep.join(filter(None, [kind, env.get("PYTHONPATH")]))
            )
        run = ["--library-child", str(started.run_id)]
        procs = [spawn([*batch, *run], child_env) for _ in range(w)]
    reports = collect(procs)
    # From the first worker's start to the last one's end, interpreter start-up left
    # out (for the library, the run started above, its ranges planned, is included).
    seconds = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    seconds += planned
    # Client CPU: each worker's own, during its job (all its threads), start-up left out.
    client, server = sum(r["cpu"] for r in reports), server_cpu() - cpu_server
    check_all_moved(engine, args.rows)
    return {
        "seconds": seconds,
        "rows_s": args.rows / seconds,
        "client_us": client / args.rows * 1e6,
        "server_us": server / args.rows * 1e6,
        "growth_kib": max((r.get("growth_kib", 0) for r in reports), default=0),
    }


if __name__ == "__main__":
    sys.exit(main())
