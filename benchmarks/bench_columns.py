"""Throughput of ``EncryptedString`` against a plain column and sqlalchemy-utils, on SQLite.

Run it from the project root, in an environment with the package and ``sqlalchemy-utils``
installed (``pip install -e '.[dev]'``)::

    python benchmarks/bench_columns.py                  # 100,000 rows, best of 3 (~1-3 minutes)
    python benchmarks/bench_columns.py --rows 10000     # a quicker, noisier run
    python benchmarks/bench_columns.py --json           # machine-readable results on stdout

Progress goes to stderr, the table (or the JSON) to stdout. Run it on an otherwise idle machine:
it warns when the process got less than 90% of the CPU during the timed sections.

What it measures, in one process, on a temporary SQLite file database (the data key ``pii`` is
created with a ``LocalMasterKey`` and a ``SqlKeyStore`` in the same database, through
``sqlalchemy_kms_field.configure``), for N realistic e-mail addresses and three columns:

* ``String(320)``, the baseline;
* ``EncryptedString(320, key="pii")`` from this package (it writes format kf2);
* sqlalchemy-utils' ``StringEncryptedType(String, key, AesGcmEngine)``;
* legacy: the same ``EncryptedString`` column reading values in the old format kf1 (header-only
  associated data, no padding), planted directly with ``cryptography`` under the same data key:
  selects only, since the package writes kf2.

For each column, four operations, each timed with ``time.perf_counter`` after a
``gc.collect()`` (the garbage collector stays on while timing, as in an application); the best
of ``--repeat`` rounds is kept, and the rounds interleave the columns so that drift of the
machine hits all of them alike:

* ORM insert: ``session.add_all(objects)`` then ``session.commit()``, ids from the database
  (objects built beforehand, untimed). By far the slowest part, and the target with the most
  margin, so only the first ``--orm-insert-repeat`` (2) rounds time it;
* ORM select: ``session.scalars(select(Model)).all()`` in a fresh session;
* Core insert: ``conn.execute(table.insert(), list_of_dicts)`` in ``engine.begin()``;
* Core select: ``conn.execute(select(table)).all()``.

And the per-value floors, the bare AEAD calls the package cannot avoid, with ``cryptography``'s
``AESGCMSIV`` directly and no SQLAlchemy, in the exact stored formats:

* kf2 (what the package writes): encrypt is ``str.encode``, the padding marker appended
  (``pad=0``), a fresh 12-byte ``os.urandom`` nonce, ``encrypt`` with the header followed by the
  column's context as associated data (one constant, built before the loop), base64url without
  padding and the header in front; decrypt is the reverse (base64url decode, ``decrypt``, the
  marker cut off, ``bytes.decode``; this decode is lenient, the package's is strict);
* kf1 (the old format): the same without the context and without the marker.

Both keep their N results in a list, as a caller would. These loops take well under a second,
so they run after each column's operations, three times a round (a lower floor only makes the
Core checks stricter). kf2 against kf1 shows what the format itself costs.

Printed per variant: total seconds, microseconds per value, the ratio to the plain column and
the microseconds each value adds over the plain column; then the targets, PASS or FAIL:

* through the ORM, insert and select with ``EncryptedString`` take at most 1.5x the plain time;
* through Core, the time ``EncryptedString`` adds per value is at most 1.25x the bare kf2
  operation's (encrypt for insert, decrypt for select), and at least 3x less than what
  sqlalchemy-utils adds.

The legacy read (kf1 values through Core) is printed against the bare kf1 decrypt, for
information.
"""

from __future__ import annotations

import argparse
import base64
import gc
import itertools
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cryptography
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf

try:
    from sqlalchemy_utils import StringEncryptedType
    from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("this benchmark compares with sqlalchemy-utils: pip install sqlalchemy-utils")

KEY_NAME = "pii"
UTILS_KEY = "benchmark secret key for sqlalchemy-utils"
LENGTH = 320
NONCE_SIZE = 12

# Targets from the project issue.
ORM_MAX_RATIO = 1.5  # ORM insert/select with EncryptedString within 1.5x of the plain column
CORE_MAX_OVER_AEAD = 1.25  # Core: added cost per value at most 1.25x the bare kf2 operation's
CORE_MIN_VS_UTILS = 3.0  # Core: added cost at least 3x less than what sqlalchemy-utils adds

# Below this share of CPU time over wall time in the timed sections, warn that the machine is busy.
BUSY_CPU_SHARE = 0.9


class Base(DeclarativeBase):
    pass


class PlainUser(Base):
    __tablename__ = "bench_plain"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(LENGTH))


class KmsUser(Base):
    __tablename__ = "bench_kms"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(kf.EncryptedString(LENGTH, key=KEY_NAME))


class LegacyUser(Base):
    """The same column type, holding kf1 values written before format kf2."""

    __tablename__ = "bench_kms_kf1"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(kf.EncryptedString(LENGTH, key=KEY_NAME))


class UtilsUser(Base):
    __tablename__ = "bench_utils"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(StringEncryptedType(sa.String, UTILS_KEY, AesGcmEngine))


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    model: type[Base]
    writes: bool = True  # False: rows are planted untimed, only the selects are measured

    @property
    def table(self) -> sa.Table:
        table = self.model.__table__
        assert isinstance(table, sa.Table)
        return table


VARIANTS = (
    Variant("plain", f"String({LENGTH})", PlainUser),
    Variant("kms", f"EncryptedString({LENGTH}, key={KEY_NAME!r})", KmsUser),
    Variant("utils", "sqlalchemy-utils StringEncryptedType(AesGcmEngine)", UtilsUser),
    Variant("kf1", "EncryptedString reading legacy kf1 values", LegacyUser, writes=False),
)
LEGACY = VARIANTS[-1]
OPERATIONS = (("orm", "insert"), ("orm", "select"), ("core", "insert"), ("core", "select"))


@dataclass
class Result:
    api: str  # "orm", "core" or "bare"
    operation: str  # "insert"/"select", or "encrypt"/"decrypt" for the bare AEAD
    variant: str
    label: str
    seconds: float
    us_per_value: float
    ratio_to_plain: float | None = None
    us_added_per_value: float | None = None


@dataclass
class Check:
    name: str
    value: float
    limit: float
    comparison: str  # "<=" or ">="
    detail: str
    target: bool = True  # False: shown for information (INFO), not a target of the issue

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.comparison == "<=" else self.value >= self.limit


# Data ---------------------------------------------------------------------------------------

_FIRST = (
    "james mary john patricia robert jennifer michael linda william elizabeth david barbara "
    "richard susan joseph jessica thomas sarah charles karen christopher lisa daniel nancy "
    "matthew betty anthony margaret mark sandra donald ashley steven kimberly paul emily andrew "
    "donna joshua michelle kenneth carol kevin amanda brian melissa george deborah timothy "
    "stephanie ronald rebecca jason sharon edward laura jeffrey cynthia ryan kathleen jacob amy "
    "gary angela nicholas shirley eric anna jonathan brenda stephen pamela larry emma justin "
    "nicole scott helen brandon samantha benjamin katherine samuel christine gregory debra "
    "alexander rachel frank carolyn patrick janet raymond catherine jack maria dennis heather "
    "jerry diane tyler ruth aaron julie jose olivia adam joyce nathan virginia henry victoria "
    "zachary kelly douglas lauren peter christina kyle joan noah evelyn ethan judith jeremy "
    "megan walter andrea christian cheryl keith hannah roger jacqueline terry martha austin "
    "gloria sean teresa gerald ann carl sara harold madison dylan frances arthur kathryn "
    "lawrence janice jordan jean jesse abigail bryan alice billy judy bruce sophia gabriel "
    "grace joe denise logan amber alan doris juan marilyn albert danielle willie beverly "
    "elijah isabella wayne theresa randy diana vincent natalie mason brittany roy charlotte "
    "ralph marie bobby kayla russell alexis bradley lori philip"
).split()
_LAST = (
    "smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez "
    "gonzalez wilson anderson thomas taylor moore jackson martin lee perez thompson white "
    "harris sanchez clark ramirez lewis robinson walker young allen king wright scott torres "
    "nguyen hill flores green adams nelson baker hall rivera campbell mitchell carter roberts "
    "gomez phillips evans turner diaz parker cruz edwards collins reyes stewart morris morales "
    "murphy cook rogers gutierrez ortiz morgan cooper peterson bailey reed kelly howard ramos "
    "kim cox ward richardson watson brooks chavez wood james bennett gray mendoza ruiz hughes "
    "price alvarez castillo sanders patel myers long ross foster jimenez powell jenkins perry "
    "russell sullivan bell coleman butler henderson barnes gonzales fisher vasquez simmons "
    "romero jordan patterson alexander hamilton graham reynolds griffin wallace moreno west "
    "cole hayes bryant herrera gibson ellis tran medina aguilar stevens murray ford castro "
    "marshall owens harrison fernandez mcdonald woods washington kennedy wells vargas henry "
    "chen freeman webb tucker guzman burns crawford olson simpson porter hunter gordon mendez "
    "silva shaw snyder mason dixon munoz hunt hicks holmes palmer wagner black robertson boyd "
    "rose stone salazar fox warren mills meyer rice schmidt garza daniels ferguson nichols"
).split()
_DOMAINS = (
    ("gmail.com", 30),
    ("yahoo.com", 8),
    ("outlook.com", 6),
    ("hotmail.com", 6),
    ("icloud.com", 4),
    ("aol.com", 1),
    ("proton.me", 1),
    ("gmx.de", 1),
    ("web.de", 1),
    ("yahoo.co.uk", 1),
    ("orange.fr", 1),
    ("mail.ru", 1),
    ("comcast.net", 1),
    ("example-corp.com", 2),
    ("northwind-traders.co.uk", 1),
    ("contoso.onmicrosoft.com", 1),
    ("engineering.acme-industries.io", 1),
    ("students.university-of-somewhere.edu", 1),
)


def make_emails(n: int, seed: int = 20240601) -> list[str]:
    """``n`` plausible, mostly distinct e-mail addresses (about 25 characters on average)."""
    rng = random.Random(seed)
    domains = [d for d, _ in _DOMAINS]
    cum_weights = list(itertools.accumulate(w for _, w in _DOMAINS))
    patterns: tuple[Callable[[str, str], str], ...] = (
        lambda f, last: f"{f}.{last}",
        lambda f, last: f"{f}{last}",
        lambda f, last: f"{f[0]}{last}",
        lambda f, last: f"{f}_{last}",
        lambda f, last: f"{f}.{last[0]}",
        lambda f, last: f"{last}.{f}",
        lambda f, last: f,
    )
    out = []
    for _ in range(n):
        local = rng.choice(patterns)(rng.choice(_FIRST), rng.choice(_LAST))
        r = rng.random()
        if r < 0.45:
            local += str(rng.randint(1, 9999))
        elif r < 0.6:
            local += str(rng.randint(1950, 2010))
        if rng.random() < 0.03:
            local += "+" + rng.choice(("news", "shop", "work", "spam"))
        out.append(f"{local}@{rng.choices(domains, cum_weights=cum_weights)[0]}")
    return out


# Timed operations ---------------------------------------------------------------------------
# Each returns the elapsed seconds of the measured part only and checks its result afterwards.


@dataclass
class Clocks:
    """Sums over every timed section: wall time, and the CPU time this process got in it."""

    wall: float = 0.0
    cpu: float = 0.0


CLOCKS = Clocks()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    CLOCKS.cpu += time.process_time() - cpu
    CLOCKS.wall += elapsed
    return elapsed, value


def clear(engine: sa.Engine, variant: Variant) -> None:
    with engine.begin() as conn:
        conn.execute(variant.table.delete())


def orm_insert(engine: sa.Engine, variant: Variant, emails: Sequence[str]) -> float:
    clear(engine, variant)
    objects = [variant.model(email=e) for e in emails]
    with Session(engine) as session:

        def run() -> None:
            session.add_all(objects)
            session.commit()

        seconds, _ = _timed(run)
    return seconds


def orm_select(engine: sa.Engine, variant: Variant, emails: Sequence[str], check: bool) -> float:
    with Session(engine) as session:
        seconds, rows = _timed(lambda: session.scalars(sa.select(variant.model)).all())
        if check:
            _verify(variant, [row.email for row in rows], emails)
    return seconds


def core_insert(
    engine: sa.Engine, variant: Variant, emails: Sequence[str], timed: bool = True
) -> float:
    clear(engine, variant)
    params = [{"email": e} for e in emails]

    def run() -> None:
        with engine.begin() as conn:
            conn.execute(variant.table.insert(), params)

    if not timed:
        run()
        return 0.0
    seconds, _ = _timed(run)
    return seconds


def core_select(engine: sa.Engine, variant: Variant, emails: Sequence[str], check: bool) -> float:
    with engine.connect() as conn:
        seconds, rows = _timed(lambda: conn.execute(sa.select(variant.table)).all())
    if check:
        _verify(variant, [row.email for row in rows], emails)
    return seconds


def _verify(variant: Variant, got: list[str], emails: Sequence[str]) -> None:
    if sorted(got) != sorted(emails):
        raise SystemExit(f"{variant.label}: the selected values differ from the inserted ones")


@dataclass(frozen=True)
class Floor:
    """What one bare loop binds a value to: the stored format's header, AAD and padding."""

    name: str  # "kf2" or "kf1"
    header: str
    aad: bytes
    marker: bytes  # appended to the plaintext: b"\x80" (kf2, pad=0) or b"" (kf1)


def floors(data_key: kf.DataKey, context: bytes) -> tuple[Floor, Floor]:
    """The kf2 floor (header + context, padding marker) and the kf1 floor (header only)."""
    kf2 = Floor("kf2", data_key.header, data_key.header_bytes + context, b"\x80")
    legacy = data_key.legacy_header
    return kf2, Floor("kf1", legacy, legacy.encode("ascii"), b"")


def bare_encrypt(aead: AESGCMSIV, floor: Floor, emails: Sequence[str]) -> tuple[float, list[str]]:
    """The floor of one text value's encryption: the exact stored format, nothing else."""
    header, aad, marker = floor.header, floor.aad, floor.marker
    urandom = os.urandom
    encrypt = aead.encrypt
    b64encode = base64.urlsafe_b64encode

    def run() -> list[str]:
        out = []
        for value in emails:
            nonce = urandom(NONCE_SIZE)
            body = nonce + encrypt(nonce, value.encode("utf-8") + marker, aad)
            out.append(header + b64encode(body).rstrip(b"=").decode("ascii"))
        return out

    return _timed(run)


def bare_decrypt(aead: AESGCMSIV, floor: Floor, stored: Sequence[str]) -> tuple[float, list[str]]:
    """The floor of one text value's decryption: base64url decode, AEAD decrypt, UTF-8 decode."""
    aad = floor.aad
    skip = len(floor.header)
    cut = -len(floor.marker) or None  # the marker (pad=0 has no zeros after it)
    decrypt = aead.decrypt
    b64decode = base64.urlsafe_b64decode

    def run() -> list[str]:
        out = []
        for value in stored:
            body = value[skip:]
            raw = b64decode(body + "=" * (-len(body) % 4))
            out.append(decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], aad)[:cut].decode("utf-8"))
        return out

    return _timed(run)


def plant_legacy(engine: sa.Engine, data_key: kf.DataKey, emails: Sequence[str]) -> None:
    """Rows of kf1 values under the package's own data key, written as the old format did.

    The package writes kf2 only, so the values are sealed with the key's AEAD directly (the
    benchmark's one look inside ``DataKey``) and inserted through a plain ``String`` column.
    """
    clear(engine, LEGACY)
    _, kf1 = floors(data_key, b"")
    _, stored = bare_encrypt(data_key._aead, kf1, emails)
    raw = sa.table(LEGACY.table.name, sa.column("email", sa.String()))
    with engine.begin() as conn:
        conn.execute(raw.insert(), [{"email": s} for s in stored])


# Set-up -------------------------------------------------------------------------------------


def set_up(directory: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{directory / 'bench.db'}")
    key_store = kf.SqlKeyStore(engine)
    key_store.create_table()
    kf.configure(master_key=kf.LocalMasterKey(os.urandom(32)), key_store=key_store)
    kf.create_data_key(KEY_NAME)
    Base.metadata.create_all(engine)
    # Sanity: the encrypted table really holds ciphertext, in format kf2.
    table = next(v.table for v in VARIANTS if v.model is KmsUser)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"email": "probe@example.com"}])
        stored = conn.execute(sa.select(sa.text("email")).select_from(table)).scalar_one()
        conn.execute(table.delete())
    assert stored.startswith(f"kf2:{KEY_NAME}:1:"), stored
    return engine


def column_context(variant: Variant) -> bytes:
    """The context bytes the package binds this variant's values to."""
    column_type = variant.table.c.email.type
    assert isinstance(column_type, kf.EncryptedString)
    return column_type.context_bytes()


def check_bare_format(emails: Sequence[str]) -> None:
    """The bare loops write what the package reads, so they are fair floors."""
    key = os.urandom(32)
    data_key = kf.DataKey(KEY_NAME, 1, key)
    context = column_context(VARIANTS[1])
    for floor in floors(data_key, context):
        _, stored = bare_encrypt(AESGCMSIV(key), floor, emails[:100])
        assert all(s.startswith(f"{floor.name}:") for s in stored)
        got = [data_key.decrypt_text(s, context).decode("utf-8") for s in stored]
        assert got == list(emails[:100]), floor.name


# Running and reporting ----------------------------------------------------------------------


def run(
    rows: int, repeat: int, orm_insert_repeat: int, log: Callable[[str], None]
) -> tuple[list[Result], list[Check]]:
    emails = make_emails(rows)
    best: dict[tuple[str, str, str], float] = {}

    def keep(api: str, op: str, variant: str, seconds: float) -> None:
        best[api, op, variant] = min(seconds, best.get((api, op, variant), float("inf")))
        log(f"  {api:4} {op:7} {variant:5} {seconds:8.3f} s")

    with tempfile.TemporaryDirectory(prefix="kms-field-bench-") as tmp:
        engine = set_up(Path(tmp))
        data_key = kf.get_registry().active_key(KEY_NAME)
        check_bare_format(emails)
        bare_floors = floors(data_key, column_context(VARIANTS[1]))
        aead = AESGCMSIV(os.urandom(32))
        try:
            for round_ in range(1, repeat + 1):
                log(f"round {round_}/{repeat}")
                check = round_ == 1  # compare what comes back with what went in, once
                for v in VARIANTS:
                    if not v.writes:
                        plant_legacy(engine, data_key, emails)
                    elif round_ <= orm_insert_repeat:
                        keep("orm", "insert", v.name, orm_insert(engine, v, emails))
                    else:  # the rows for the ORM select, untimed
                        core_insert(engine, v, emails, timed=False)
                    keep("orm", "select", v.name, orm_select(engine, v, emails, check))
                    if v.writes:
                        keep("core", "insert", v.name, core_insert(engine, v, emails))
                    else:
                        plant_legacy(engine, data_key, emails)
                    keep("core", "select", v.name, core_select(engine, v, emails, check))
                    clear(engine, v)
                    # The floors are cheap: measure them after each column, so that their best
                    # is of 4 x --repeat runs (a lower floor only makes the Core checks stricter).
                    for floor in bare_floors:
                        seconds, stored = bare_encrypt(aead, floor, emails)
                        keep("bare", "encrypt", floor.name, seconds)
                        seconds, plain = bare_decrypt(aead, floor, stored)
                        keep("bare", "decrypt", floor.name, seconds)
                        if check:
                            assert plain == emails
                        del stored, plain
        finally:
            engine.dispose()

    return _results(best, rows)


def _results(
    best: dict[tuple[str, str, str], float], rows: int
) -> tuple[list[Result], list[Check]]:
    us = 1e6 / rows
    results = []
    for api, op in OPERATIONS:
        plain = best[api, op, "plain"]
        for variant in VARIANTS:
            if (api, op, variant.name) not in best:
                continue  # the legacy variant is only read
            seconds = best[api, op, variant.name]
            results.append(
                Result(
                    api,
                    op,
                    variant.name,
                    variant.label,
                    seconds,
                    seconds * us,
                    seconds / plain,
                    (seconds - plain) * us,
                )
            )
    for op in ("encrypt", "decrypt"):
        for fmt, what in (("kf2", "header+context AAD, pad marker"), ("kf1", "header AAD")):
            seconds = best["bare", op, fmt]
            label = f"bare {fmt} {op} ({what})"
            results.append(Result("bare", op, fmt, label, seconds, seconds * us))

    by_key = {(r.api, r.operation, r.variant): r for r in results}
    checks = []
    for op in ("insert", "select"):
        r = by_key["orm", op, "kms"]
        checks.append(
            Check(
                f"ORM {op}: EncryptedString time / plain time",
                _value(r.ratio_to_plain),
                ORM_MAX_RATIO,
                "<=",
                f"{r.ratio_to_plain:.2f}x plain",
            )
        )
    for op, bare_op in (("insert", "encrypt"), ("select", "decrypt")):
        added = _value(by_key["core", op, "kms"].us_added_per_value)
        utils = _value(by_key["core", op, "utils"].us_added_per_value)
        bare = by_key["bare", bare_op, "kf2"].us_per_value
        checks.append(
            Check(
                f"Core {op}: EncryptedString added cost / bare kf2 {bare_op}",
                added / bare,
                CORE_MAX_OVER_AEAD,
                "<=",
                f"adds {added:.2f} us/value, bare kf2 {bare_op} {bare:.2f} us: {added / bare:.2f}x",
            )
        )
        factor = utils / added if added > 0 else float("inf")
        checks.append(
            Check(
                f"Core {op}: sqlalchemy-utils added cost / EncryptedString added cost",
                factor,
                CORE_MIN_VS_UTILS,
                ">=",
                f"sqlalchemy-utils adds {utils:.2f} us/value, EncryptedString {added:.2f}: "
                f"{factor:.2f}x less",
            )
        )
    added = _value(by_key["core", "select", "kf1"].us_added_per_value)
    bare = by_key["bare", "decrypt", "kf1"].us_per_value
    checks.append(
        Check(
            "Core select of legacy kf1 values: added cost / bare kf1 decrypt",
            added / bare,
            CORE_MAX_OVER_AEAD,
            "<=",
            f"adds {added:.2f} us/value, bare kf1 decrypt {bare:.2f} us: {added / bare:.2f}x",
            target=False,
        )
    )
    return results, checks


def _value(x: float | None) -> float:
    assert x is not None
    return x


def print_table(results: list[Result], checks: list[Check], meta: dict[str, Any]) -> None:
    print(
        f"{meta['rows']:,} rows, best of {meta['repeat']} (ORM insert: best of "
        f"{meta['orm_insert_repeat']}); Python {meta['python']}, "
        f"SQLAlchemy {meta['sqlalchemy']}, cryptography {meta['cryptography']}, "
        f"SQLite {meta['sqlite']}"
    )
    head = f"{'operation':<12} {'variant':<52} {'total s':>8} {'us/value':>9} {'x plain':>8}"
    print()
    print(head + f" {'+us/value':>10}")
    print("-" * (len(head) + 11))
    last = None
    for r in results:
        what = f"{r.api.upper() if r.api == 'orm' else r.api.capitalize()} {r.operation}"
        if r.api == "bare":
            what = f"AEAD {r.operation}"
        shown = what if what != last else ""
        last = what
        ratio = "" if r.ratio_to_plain is None else f"{r.ratio_to_plain:.2f}"
        added = "" if r.us_added_per_value is None else f"{r.us_added_per_value:+.2f}"
        print(
            f"{shown:<12} {r.label:<52} {r.seconds:8.3f} {r.us_per_value:9.2f} "
            f"{ratio:>8} {added:>10}"
        )
    bare = {(r.operation, r.variant): r.us_per_value for r in results if r.api == "bare"}
    print()
    print(
        "kf2 over kf1, bare: "
        + ", ".join(
            f"{op} {bare[op, 'kf2'] - bare[op, 'kf1']:+.2f} us/value "
            f"({bare[op, 'kf2'] / bare[op, 'kf1']:.2f}x)"
            for op in ("encrypt", "decrypt")
        )
    )
    print()
    print("Targets:")
    for c in checks:
        verdict = ("PASS" if c.passed else "FAIL") if c.target else "INFO"
        print(f"  {verdict}  {c.name} {c.comparison} {c.limit:g}  ({c.detail})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000, help="values per run (100000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best is kept (3)")
    parser.add_argument(
        "--orm-insert-repeat",
        type=int,
        default=2,
        help="rounds that time the ORM insert, the slowest part (2; at most --repeat)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON results instead")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeat < 1 or args.orm_insert_repeat < 1:
        parser.error("--rows, --repeat and --orm-insert-repeat must be at least 1")
    orm_insert_repeat = min(args.orm_insert_repeat, args.repeat)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    results, checks = run(args.rows, args.repeat, orm_insert_repeat, log)
    meta: dict[str, Any] = {
        "rows": args.rows,
        "repeat": args.repeat,
        "orm_insert_repeat": orm_insert_repeat,
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "cryptography": cryptography.__version__,
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_share": round(CLOCKS.cpu / CLOCKS.wall, 3) if CLOCKS.wall else None,
    }
    if args.json:
        document = {
            **meta,
            "results": [asdict(r) for r in results],
            "checks": [{**asdict(c), "passed": c.passed} for c in checks],
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(results, checks, meta)
        print(f"\n(wall time {meta['wall_seconds']} s)")
    share = meta["cpu_share"]
    if share is not None and share < BUSY_CPU_SHARE:
        log(
            f"warning: this process ran only {share:.0%} of the measured time (the machine is "
            "busy), so these numbers are noisy; run again on an idle machine"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
