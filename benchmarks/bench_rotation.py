"""Re-encryption throughput of ``reencrypt_column`` against the database's own write speed.

PostgreSQL only. Run it from the project root, in an environment with the package installed
(``pip install -e '.[postgresql]'``), against a database of your own::

    createdb -h 127.0.0.1 -U postgres kf_bench
    python benchmarks/bench_rotation.py --url postgresql+psycopg://postgres@127.0.0.1/kf_bench
    python benchmarks/bench_rotation.py --rows 100000 --skip-memory     # a quick, noisier run

The URL comes from ``--url``, else ``KMS_FIELD_BENCH_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test``. The script creates and drops only its own
tables, all named ``bench_*`` (the data key table is ``bench_kms_field_keys``); the library's
job itself records its checkpoint in ``kms_field_jobs`` and ``kms_field_columns`` (created if
missing, never dropped), and the script deletes only its own rows from those. The test suite's
clean-up drops every table of the ``test`` database: point the benchmark at a database of your
own while tests may run.

What it does, in one run:

1. Fills ``bench_rotation (id integer PRIMARY KEY, email EncryptedString(320, key='bench'))``
   with N e-mail addresses encrypted under data key ``bench`` version 1 (ciphertext made in
   Python with the package's own ``DataKey``, loaded with ``COPY``), keeps a copy of that state in
   ``bench_rotation_v1``, then rotates the key (version 2 becomes active) and waits out
   ``active_ttl`` (3 s here): a job does not finish before every process has had time to learn
   the new version, a fixed wait that is not throughput.
2. Measures, ``--repeat`` times, alternating the order, each run from the same physical state
   (the table truncated, refilled from the copy, ``VACUUM ANALYZE``'d, then a ``CHECKPOINT``):

   (a) baseline, the database's own write speed for the same work: a keyset loop over the
       primary key in batches of ``--batch-size`` (``SELECT id, email ... WHERE id > :last ORDER
       BY id LIMIT :n``); the new value is a cheap transformation of the old one (header
       ``kf2:bench:1:`` swapped for ``kf2:bench:2:``, so rows keep their size); per batch one
       compare-and-swap ``UPDATE ... FROM unnest(ids, olds, news) AS v WHERE t.id = v.id AND
       t.email = v.old AND t.id BETWEEN :first AND :last`` (arrays in binary format; the range
       keeps PostgreSQL from merge-joining from the start of the index each batch, as the
       library does too), a checkpoint row update, and a commit. Raw psycopg, prepared
       statements; no SQLAlchemy, no cryptography.
   (b) library: ``reencrypt_column(engine, "bench_rotation", "email", key="bench",
       batch_size=...)``, the whole call (its census counts before and after the sweep
       included), in a fresh process, as ``kms-field reencrypt`` would run it.

   Both are checked afterwards: every row on the new header, and for the library a sample of
   values decrypting to the original addresses. Printed: seconds and rows/s per run and their
   medians, the ratio library/baseline (target >= 0.7x), and CPU per row of this process
   (client) and, when PostgreSQL runs on this machine, of its backends (server, from /proc):
   with other work on the cores, wall time swings more than CPU per row.
3. Peak memory of the library's job at N/10 and N rows (100,000 and 1,000,000 by default), each
   in a fresh process: its peak RSS during the job (``VmHWM``, reset just before the job;
   ``ru_maxrss`` where /proc is missing) and the growth over the process ready to start the job
   (configured, keys unwrapped, connected), target within 1.2x between the two sizes; the N-row
   figure is the median of the rounds of (b). ``--skip-memory`` leaves out the N/10 run.

``--before DIR`` adds a contender to every round: the same job run by an older copy of the
package (``DIR`` holds its ``sqlalchemy_kms_field`` folder, e.g. a ``git worktree`` of an older
commit, imported through ``PYTHONPATH``), from the same state, in the same alternating order, so
that the engines are compared in the same conditions (give it more than once for several).
``--range-rows N`` hands ``range_rows=N`` to the library's job (b) (one range for the whole
table with N above the row count), to tell the cost of ranges from the rest.

The default run (1,000,000 rows, 3 rounds) takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope
from sqlalchemy_kms_field.reencrypt import reencrypt_column

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
URL_VARIABLE = "KMS_FIELD_BENCH_URL"
MASTER_KEY_VARIABLE = "KMS_FIELD_BENCH_MASTER_KEY"  # handed to the job's subprocesses

KEY = "bench"
TABLE = "bench_rotation"
SNAPSHOT = "bench_rotation_v1"
MEMORY_TABLE = "bench_rotation_mem"
BASELINE_JOBS = "bench_rotation_jobs"
KEYS_TABLE = "bench_kms_field_keys"
LENGTH = 320

# A re-encryption does not finish before active_ttl (+2 s) has passed since the rotation (other
# processes may still write under the old version until then). That wait is a fixed cost, not
# throughput: the benchmark uses a short active_ttl and waits it out once after rotating.
ACTIVE_TTL = 3.0

TARGET_RATIO = 0.7
TARGET_MEMORY = 1.2


# Data ---------------------------------------------------------------------------------------

_FIRST = (
    "james mary john patricia robert jennifer michael linda william elizabeth david barbara "
    "richard susan joseph jessica thomas sarah charles karen christopher lisa daniel nancy "
    "matthew betty anthony margaret mark sandra donald ashley steven kimberly paul emily andrew "
    "donna joshua michelle kenneth carol kevin amanda brian melissa george deborah timothy"
).split()
_LAST = (
    "smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez "
    "gonzalez wilson anderson thomas taylor moore jackson martin lee perez thompson white "
    "harris sanchez clark ramirez lewis robinson walker young allen king wright scott torres"
).split()
_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "example-corp.com", "proton.me", "gmx.de")


def make_emails(n: int, seed: int = 20240601) -> list[str]:
    """``n`` plausible e-mail addresses of about 25 characters."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        local = f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}"
        if rng.random() < 0.5:
            local += str(rng.randint(1, 9999))
        out.append(f"{local}@{rng.choice(_DOMAINS)}")
    return out


# Set-up -------------------------------------------------------------------------------------


def make_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url)
    if engine.dialect.name != "postgresql":
        sys.exit(f"this benchmark runs on PostgreSQL only, not {engine.dialect.name}")
    return engine


def configure(engine: sa.Engine, master: bytes) -> kf.KeyRegistry:
    store = kf.SqlKeyStore(engine, table_name=KEYS_TABLE)
    return kf.configure(
        master_key=kf.LocalMasterKey(master), key_store=store, active_ttl=ACTIVE_TTL
    )


def admin(engine: sa.Engine, *statements: str) -> None:
    """Run statements outside a transaction (VACUUM, CHECKPOINT)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def drop_tables(engine: sa.Engine) -> None:
    tables = (TABLE, SNAPSHOT, MEMORY_TABLE, BASELINE_JOBS, KEYS_TABLE)
    admin(engine, *(f"DROP TABLE IF EXISTS {t}" for t in tables))
    inspector = sa.inspect(engine)
    with engine.begin() as conn:
        for name in ("kms_field_jobs", "kms_field_columns"):
            if inspector.has_table(name):
                conn.exec_driver_sql(f"DELETE FROM {name} WHERE table_name LIKE 'bench\\_%%'")


def create_table(engine: sa.Engine, name: str) -> sa.Table:
    t = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(LENGTH, key=KEY)),
    )
    t.create(engine)
    return t


def fill(engine: sa.Engine, emails: Sequence[str], data_key: kf.DataKey) -> None:
    """Encrypt in Python with the package's own key, load with COPY, keep a copy of the state."""
    encrypt = data_key.encrypt_text
    context = envelope.encode_context(TABLE, "email", "str")  # as EncryptedString binds them
    create_table(engine, TABLE)
    raw = engine.raw_connection()
    try:
        with raw.driver_connection.cursor() as cur:  # type: ignore[union-attr]
            with cur.copy(f"COPY {TABLE} (id, email) FROM STDIN") as copy:
                chunk = 50_000
                for start in range(0, len(emails), chunk):
                    lines = [
                        f"{i}\t{encrypt(e.encode('utf-8'), context)}\n"
                        for i, e in enumerate(emails[start : start + chunk], start + 1)
                    ]
                    copy.write("".join(lines))
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {SNAPSHOT} AS SELECT * FROM {TABLE}")
        conn.exec_driver_sql(
            f"CREATE TABLE {BASELINE_JOBS} (job text PRIMARY KEY, last_key text, "
            "rows_done bigint NOT NULL, updated_at timestamp NOT NULL)"
        )
        conn.exec_driver_sql(f"INSERT INTO {BASELINE_JOBS} VALUES ('baseline', NULL, 0, now())")


def restore(engine: sa.Engine, table: str = TABLE, rows: int | None = None) -> None:
    """Put ``table`` back in the version-1 state, physically fresh (no dead rows, analyzed)."""
    where = "" if rows is None else f" WHERE id <= {int(rows)}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {table}")
        conn.exec_driver_sql(f"INSERT INTO {table} SELECT * FROM {SNAPSHOT}{where} ORDER BY id")
        conn.exec_driver_sql(f"UPDATE {BASELINE_JOBS} SET last_key = NULL, rows_done = 0")
    admin(engine, f"VACUUM ANALYZE {table}", f"VACUUM ANALYZE {BASELINE_JOBS}")
    try:
        admin(engine, "CHECKPOINT")  # both runs start with the same WAL/full-page-write state
    except sa.exc.DBAPIError:
        pass  # not a superuser: fine, just noisier


# (a) The baseline ---------------------------------------------------------------------------


def baseline(engine: sa.Engine, batch_size: int) -> int:
    """The same keyset rewrite with no SQLAlchemy and no cryptography; returns rows written."""
    old_head, new_head = envelope.header(KEY, 1), envelope.header(KEY, 2)
    skip = len(old_head)
    select = f"SELECT id, email FROM {TABLE} WHERE id > %s ORDER BY id LIMIT %s"
    # %b: the arrays travel in binary format. psycopg dumps a list of str in text format in
    # Python, with a regular expression per element, which costs more than the UPDATE itself.
    update = (
        f"UPDATE {TABLE} AS t SET email = v.new "
        "FROM unnest(%b::integer[], %b::text[], %b::text[]) AS v(id, old, new) "
        "WHERE t.id = v.id AND t.email = v.old AND t.id BETWEEN %s AND %s"
    )
    checkpoint = (
        f"UPDATE {BASELINE_JOBS} SET last_key = %s, rows_done = rows_done + %s, "
        "updated_at = now() WHERE job = 'baseline'"
    )
    raw = engine.raw_connection()
    written = 0
    try:
        conn = raw.driver_connection
        assert conn is not None
        last = 0
        with conn.cursor() as cur:
            while True:
                cur.execute(select, (last, batch_size), prepare=True)
                rows = cur.fetchall()
                if not rows:
                    conn.rollback()
                    break
                ids = [r[0] for r in rows]
                olds = [r[1] for r in rows]
                news = [new_head + o[skip:] for o in olds]
                cur.execute(update, (ids, olds, news, ids[0], ids[-1]), prepare=True)
                written += cur.rowcount
                last = ids[-1]
                cur.execute(checkpoint, (json.dumps([last]), len(rows)), prepare=True)
                conn.commit()
    finally:
        raw.close()
    return written


def check(engine: sa.Engine, rows: int, emails: Sequence[str] | None) -> None:
    """Every row is on version 2; a sample of the library's values decrypts to the original."""
    head = envelope.header(KEY, 2)
    with engine.connect() as conn:
        done = conn.exec_driver_sql(
            f"SELECT count(*) FROM {TABLE} WHERE substr(email, 1, {len(head)}) = %(h)s",
            {"h": head},
        ).scalar_one()
        if done != rows:
            raise SystemExit(f"only {done} of {rows} rows are on {head!r}")
        if emails is not None:
            t = sa.Table(
                TABLE,
                sa.MetaData(),
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("email", kf.EncryptedString(LENGTH, key=KEY)),
            )
            step = max(1, rows // 1000)
            sample = conn.execute(sa.select(t).where(t.c.id % step == 0)).all()
            for row in sample:
                if row.email != emails[row.id - 1]:
                    raise SystemExit(f"row {row.id} decrypts to {row.email!r}")


class CpuMeter:
    """CPU seconds of this process and, when the server runs on this machine, of the server
    backends behind this engine's connections (read from /proc; 0 when not visible).

    With other work competing for the cores, wall time swings; CPU per row does much less.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.at_connect: dict[int, float] = {}
        sa.event.listen(engine, "connect", self._connect)

    def _connect(self, dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        pid = int(cursor.fetchone()[0])
        cursor.close()
        dbapi_connection.rollback()
        cpu = _backend_cpu(pid)
        if cpu is not None:
            self.at_connect[pid] = cpu

    def snapshot(self) -> tuple[float, dict[int, float | None]]:
        return time.process_time(), {pid: _backend_cpu(pid) for pid in self.at_connect}

    def since(self, snapshot: tuple[float, dict[int, float | None]]) -> tuple[float, float]:
        client = time.process_time() - snapshot[0]
        server = 0.0
        for pid, at_connect in self.at_connect.items():
            now = _backend_cpu(pid)
            before = snapshot[1].get(pid, at_connect)
            if now is not None and before is not None:
                server += now - before
        return client, server


def _backend_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a local PostgreSQL backend, or None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "postgres":
                return None
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    gc.collect()
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


# The library's job, in a fresh process ----------------------------------------------------


def library_child(url: str, table: str, batch_size: int, range_rows: int | None = None) -> None:
    """Run the job in this fresh process; print its time, CPU and peak RSS (JSON)."""
    engine = make_engine(url)
    meter = CpuMeter(engine)
    registry = configure(engine, base64.b64decode(os.environ[MASTER_KEY_VARIABLE]))
    registry.preload([KEY])  # both key versions unwrapped, the driver imported and connected
    gc.collect()
    before = peak_rss_reset()
    snapshot = meter.snapshot()
    start = time.perf_counter()
    options: dict[str, Any] = {} if range_rows is None else {"range_rows": range_rows}
    result = reencrypt_column(engine, table, "email", key=KEY, batch_size=batch_size, **options)
    seconds = time.perf_counter() - start
    client, server = meter.since(snapshot)
    after = peak_rss()
    report = {
        "rows_written": result.rows_written,
        "rows_conflicted": result.rows_conflicted,
        "skipped": len(result.skipped),
        "finished": result.finished,
        "seconds": seconds,
        "client_cpu": client,
        "server_cpu": server,
        "maxrss_before_kib": before,
        "maxrss_after_kib": after,
    }
    print(json.dumps(report))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_reset() -> int:
    """Start measuring the peak RSS from now; returns the RSS now (KiB).

    Not ``ru_maxrss`` alone: on Linux a process inherits its parent's ``ru_maxrss`` through
    fork and exec, so a child of this script would start at the parent's size (~180 MiB with
    a million addresses in memory) and hide the job's own peak. ``/proc/self/clear_refs``
    resets this process's own high-water mark (``VmHWM``).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        now = _status_kib("VmRSS")
        if now is not None:
            return now
    except OSError:
        pass
    return peak_rss()


def peak_rss() -> int:
    """Peak RSS (KiB) since :func:`peak_rss_reset` (since the start where it cannot reset)."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def library(
    url: str,
    master: bytes,
    table: str,
    rows: int,
    batch_size: int,
    *,
    before: str | None = None,
    range_rows: int | None = None,
) -> dict[str, Any]:
    """The job in a fresh process: this package's, or with ``before`` the older one in DIR."""
    env = dict(os.environ, **{MASTER_KEY_VARIABLE: base64.b64encode(master).decode("ascii")})
    extra = []
    if before is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [before, env.get("PYTHONPATH")]))
    elif range_rows is not None:
        extra = ["--range-rows", str(range_rows)]
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--url", url, "--batch-size",
         str(batch_size), "--library-child", table, *extra],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"the library's job failed:\n{out.stderr}")
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if (report["rows_written"], report["rows_conflicted"], report["skipped"]) != (rows, 0, 0):
        raise SystemExit(f"unexpected job result on {rows} rows: {report}")
    if not report["finished"]:
        raise SystemExit(f"the job did not finish: {report}")
    report["growth_kib"] = report["maxrss_after_kib"] - report["maxrss_before_kib"]
    return report


# Running and reporting ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (a) and (b)")
    parser.add_argument("--url", default=os.environ.get(URL_VARIABLE, DEFAULT_URL))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the bench_* tables")
    parser.add_argument(
        "--before",
        metavar="DIR",
        action="append",
        default=[],
        help="also run the job of an older package in DIR, to compare (repeatable)",
    )
    parser.add_argument("--range-rows", type=int, help="range_rows= of the library's job (b)")
    parser.add_argument("--library-child", metavar="TABLE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.library_child:
        library_child(args.url, args.library_child, args.batch_size, args.range_rows)
        return 0
    for folder in args.before:
        if not os.path.isdir(os.path.join(folder, "sqlalchemy_kms_field")):
            parser.error(f"--before {folder}: that folder holds no sqlalchemy_kms_field package")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    engine = make_engine(args.url)
    meter = CpuMeter(engine)
    url_shown = engine.url.render_as_string(hide_password=True)
    load_before = os.getloadavg()[0]
    master = os.urandom(32)
    drop_tables(engine)
    # A contender from an older package is named by its folder.
    names = ("baseline", "library", *args.before)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    growth: list[tuple[int, dict[str, Any]]] = []
    try:
        registry = configure(engine, master)
        registry.key_store.create_table()
        v1 = registry.create_data_key(KEY)
        log(f"filling {args.rows:,} rows ...")
        emails = make_emails(args.rows)
        started = time.perf_counter()
        fill(engine, emails, v1)
        log(f"  filled in {time.perf_counter() - started:.1f} s")
        v2 = registry.rotate_data_key(KEY)
        assert v2.version == 2
        log(f"waiting {ACTIVE_TTL + 2:.0f} s (active_ttl + 2 s) so that no job waits for it")
        time.sleep(ACTIVE_TTL + 2)

        for round_ in range(1, args.repeat + 1):
            # Alternate the order so that drift of the machine hits both alike.
            order = names if round_ % 2 else names[::-1]
            for name in order:
                restore(engine)
                if name == "baseline":
                    snapshot = meter.snapshot()
                    took, written = timed(lambda: baseline(engine, args.batch_size))
                    cpu[name].append(meter.since(snapshot))
                    if written != args.rows:
                        raise SystemExit(f"the baseline wrote {written} of {args.rows} rows")
                    check(engine, args.rows, None)
                else:
                    report = library(
                        args.url, master, TABLE, args.rows, args.batch_size,
                        before=name if name in args.before else None,
                        range_rows=args.range_rows,
                    )  # fmt: skip
                    took = report["seconds"]
                    cpu[name].append((report["client_cpu"], report["server_cpu"]))
                    if name == "library":
                        growth.append((args.rows, report))
                    check(engine, args.rows, emails)
                seconds[name].append(took)
                client, server = cpu[name][-1]
                log(
                    f"  round {round_} {name:8} {took:7.2f} s {args.rows / took:9,.0f} rows/s"
                    f"  cpu: client {client:5.1f} s, server {server:5.1f} s"
                )

        small: dict[str, Any] | None = None
        if not args.skip_memory:
            n = max(1000, args.rows // 10)
            log(f"memory: the library's job on {n:,} rows in a fresh process ...")
            admin(engine, f"DROP TABLE IF EXISTS {MEMORY_TABLE}")
            create_table(engine, MEMORY_TABLE)
            restore(engine, MEMORY_TABLE, n)
            small = library(
                args.url, master, MEMORY_TABLE, n, args.batch_size, range_rows=args.range_rows
            )
    finally:
        if not args.keep:
            drop_tables(engine)
        engine.dispose()

    out = report_lines(args, url_shown, seconds, cpu, growth, small)
    out.insert(1, f"  load average (1 min) {load_before:.1f} at the start, "
                  f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs")  # fmt: skip
    print("\n".join(out))
    return 0


def report_lines(
    args: argparse.Namespace,
    url: str,
    seconds: dict[str, list[float]],
    cpu: dict[str, list[tuple[float, float]]],
    growth: list[tuple[int, dict[str, Any]]],
    small: dict[str, Any] | None,
) -> list[str]:
    rows, median = args.rows, statistics.median
    out = [
        f"bench_rotation: {rows:,} rows, batch size {args.batch_size}, {args.repeat} rounds, {url}",
        f"  {'':16} {'median s':>9} {'rows/s':>9}   cpu us/row: client server   runs (s)",
    ]
    labels = {"baseline": "(a) baseline", "library": "(b) library"}
    for name in seconds:
        label = labels.get(name, f"before {os.path.basename(name.rstrip('/'))}")
        m = median(seconds[name])
        client = median(c for c, _ in cpu[name]) / rows * 1e6
        server = median(s for _, s in cpu[name]) / rows * 1e6
        runs = " ".join(f"{s:.2f}" for s in seconds[name])
        out.append(
            f"  {label:16} {m:9.2f} {rows / m:9,.0f}   {client:17.1f} {server:6.1f}   {runs}"
        )
    ratio = median(seconds["baseline"]) / median(seconds["library"])
    per_round = median(b / x for b, x in zip(seconds["baseline"], seconds["library"], strict=True))
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    out.append(
        f"  library/baseline rows/s: {ratio:.2f}x (median of per-round ratios "
        f"{per_round:.2f}x)   target >= {TARGET_RATIO}x   {verdict}"
    )
    for name in args.before:
        pairs = zip(seconds[name], seconds["library"], strict=True)
        base, old, new = (median(seconds[k]) for k in ("baseline", name, "library"))
        out.append(
            f"  {name}: before/baseline rows/s {base / old:.2f}x; library/before rows/s "
            f"{old / new:.2f}x (median of per-round ratios {median(b / x for b, x in pairs):.2f}x)"
        )
    if small is not None:
        ordered = sorted((r for _, r in growth), key=lambda r: r["growth_kib"])
        large = ordered[len(ordered) // 2] if ordered else None  # the median round
        out.append("  peak memory of the library's job, each in a fresh process (VmHWM):")
        sizes = [(max(1000, rows // 10), small)] + ([(rows, large)] if large else [])
        for n, r in sizes:
            out.append(
                f"    {n:>10,} rows: peak RSS {r['maxrss_after_kib'] / 1024:6.1f} MiB, "
                f"+{r['growth_kib'] / 1024:5.1f} MiB over the process ready to start"
            )
        if large:
            grow = max(large["growth_kib"], 1) / max(small["growth_kib"], 1)
            peak = large["maxrss_after_kib"] / small["maxrss_after_kib"]
            verdict = "PASS" if grow <= TARGET_MEMORY else "FAIL"
            out.append(
                f"    {rows:,} vs {sizes[0][0]:,} rows: growth {grow:.2f}x, peak {peak:.2f}x"
                f"   target <= {TARGET_MEMORY}x   {verdict}"
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
