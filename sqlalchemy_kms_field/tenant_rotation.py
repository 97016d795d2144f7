"""Rotating one tenant's key: a new version, then that tenant's rows (and only them) move to it.

``reencrypt_tenant(table, "body", tenant=42)`` pages through the rows ``WHERE tenant_id = 42``
whose value is not under the tenant key's active version (by the header, in SQL), decrypts and
encrypts each batch, and writes it in one transaction with compare-and-swap
(``UPDATE ... WHERE pk = :pk AND body = :old``): a row the application changed meanwhile is left
alone (and picked up again if it is still on an old version). The pending rows are the job's
progress, so a job killed at any moment loses nothing and a rerun resumes. It finishes only when
no row of the tenant is left on another version after ``max_age`` (at most ``active_ttl``) has
passed since the rotation: until then a process may still write under the old version.

A smaller sibling of ``reencrypt.py`` (which knows one data key per column); it fires no ORM
events either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from . import envelope
from .census import starts_with
from .exc import ConfigurationError, DecryptionError, ReencryptionError
from .key_store import ACTIVE_TTL_MARGIN, KeyState, utc_now
from .tenants import TenantKeyring, get_keyring, tenant_key_name

log = logging.getLogger(__name__)


@dataclass
class TenantJob:
    """What :func:`reencrypt_tenant` did."""

    table: str
    column: str
    tenant: str
    version: int  # the tenant key version every row is on now
    rows: int = 0  # rows rewritten
    sweeps: int = 0


def reencrypt_tenant(
    table: sa.Table,
    column: str,
    tenant: object,
    *,
    batch_size: int = 1000,
    settle_timeout: float | None = None,
    pause: float = 0.0,
    keyring: TenantKeyring | None = None,
    on_batch: Callable[[int], None] | None = None,
    from_plaintext: bool = False,
) -> TenantJob:
    """Move every value of ``tenant`` in ``table.column`` to the tenant key's active version.

    ``table`` is the application's Table (its column type says the key, the tenant column and
    the context). ``pause`` seconds between batches throttle it. ``from_plaintext``: also
    encrypt the tenant's plaintext values (see :func:`encrypt_tenants`); without it a plaintext
    value stops the job, naming its row.
    """
    col = table.c[column]
    typ: Any = col.type
    tenant_column = getattr(typ, "tenant", None)
    if tenant_column is None:
        raise ConfigurationError(
            f"{table.name}.{column} has no tenant= column: use reencrypt_column for it"
        )
    keyring = get_keyring() if keyring is None else keyring
    pk = list(table.primary_key.columns)
    if not pk:
        raise ConfigurationError(f"{table.name} has no primary key: rows cannot be addressed")
    # The table without its column types' processors and hooks: the job reads and writes the
    # stored text itself (and SQL on ciphertext is refused on the typed columns).
    plain = sa.table(
        table.name,
        *(sa.column(c.name, c.type) for c in table.c if c is not col and not _encrypted(c)),
        sa.column(col.name, sa.String()),
        schema=table.schema,
    )
    value = plain.c[col.name]
    ppk = [plain.c[c.name] for c in pk]
    texts = [sa.cast(plain.c[name], sa.String()) for name in typ.bind_to]
    mine = plain.c[tenant_column] == tenant
    with keyring.engine.connect() as conn:
        tenant_as_text = sa.cast(sa.literal(tenant, table.c[tenant_column].type), sa.String())
        text = str(conn.execute(sa.select(tenant_as_text)).scalar_one())
    target = keyring.active_key(typ.key, text)
    name = tenant_key_name(typ.key, text)
    job = TenantJob(table.name, column, text, target.version)
    update = (
        plain.update()
        .where(*(c == sa.bindparam(f"pk_{i}") for i, c in enumerate(ppk)))
        .where(value == sa.bindparam("old"))
        .values({col.name: sa.bindparam("new")})
    )
    pending = sa.and_(mine, value.is_not(None), ~starts_with(value, target.header))
    settle = keyring.max_age + ACTIVE_TTL_MARGIN
    deadline = time.monotonic() + (
        settle_timeout if settle_timeout is not None else 2 * settle + 30
    )
    rotated_at = _activated_at(keyring, name, target.version)
    while True:
        job.sweeps += 1
        last: tuple[Any, ...] | None = None
        while True:
            query = sa.select(*ppk, value, *texts).where(pending).order_by(*ppk).limit(batch_size)
            if last is not None:
                query = query.where(sa.tuple_(*ppk) > sa.tuple_(*last))
            with keyring.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                break
            params = [
                _rewrite(typ, keyring, table, row, len(pk), target, from_plaintext) for row in rows
            ]
            with keyring.engine.begin() as conn:
                written = conn.execute(update, params).rowcount
            job.rows += max(written, 0)
            last = tuple(rows[-1][: len(pk)])
            if on_batch is not None:
                on_batch(job.rows)
            if pause:
                time.sleep(pause)
        with keyring.engine.connect() as conn:
            now, left = conn.execute(
                sa.select(
                    utc_now(),
                    sa.select(sa.func.count()).select_from(plain).where(pending).scalar_subquery(),
                )
            ).one()
        # (Version 1 has no older version a process could still be writing under.)
        settled = target.version == 1 or now >= rotated_at + timedelta(seconds=settle)
        if settled and not left:
            log.info(
                "tenant %r: %s.%s is on version %d", job.tenant, table.name, column, job.version
            )
            return job
        if time.monotonic() > deadline:
            raise ReencryptionError(
                f"{table.name}.{column}: {left} rows of tenant {job.tenant!r} are still on an "
                f"older key version after {settle_timeout or 2 * settle + 30:g} s; is a process "
                "writing under an old version (its active_ttl longer than this one's)? Rerun",
                table=table.name,
                column=column,
            )
        time.sleep(
            0.2
            if left
            else min(1.0, max(0.05, (rotated_at + timedelta(seconds=settle) - now).total_seconds()))
        )


def reencrypt_tenants(
    table: sa.Table, column: str, tenants: Iterable[object], **options: Any
) -> list[TenantJob]:
    """Rotate each tenant's key, then move each tenant's rows: "all tenants in one job".

    Every key is rotated first, so that the wait for processes still writing under an old
    version (``max_age`` after each rotation) runs once for all, not once per tenant. A rerun
    resumes with the rows still pending (rotate only the tenants not rotated yet: a second
    rotation would start their rows over).
    """
    from .tenants import rotate_tenant_key

    typ: Any = table.c[column].type
    chosen = list(tenants)
    for tenant in chosen:
        rotate_tenant_key(typ.key, tenant)
    return [reencrypt_tenant(table, column, tenant, **options) for tenant in chosen]


def encrypt_tenants(table: sa.Table, column: str, **options: Any) -> list[TenantJob]:
    """Encrypt the plaintext values of a column declared with ``tenant=``, each under its row's
    tenant key (the way in for an existing table: ``encrypt_column`` knows one data key per
    column, and its values would be refused by the tenant column).

    Every tenant that has plaintext rows gets its key first (created if it has none), then each
    tenant's rows are encrypted by :func:`reencrypt_tenant` with ``from_plaintext=True``:
    batches with compare-and-swap, resumable after a kill (the pending rows are the progress).
    ``options`` go to :func:`reencrypt_tenant`.
    """
    from .tenant_census import is_tenant_value

    typ: Any = table.c[column].type
    tenant_column = getattr(typ, "tenant", None)
    if tenant_column is None:
        raise ConfigurationError(
            f"{table.name}.{column} has no tenant= column: use encrypt_column for it"
        )
    keyring = options.get("keyring")
    if keyring is None:
        keyring = options["keyring"] = get_keyring()
    bare = sa.table(
        table.name, sa.column(column, sa.String()), sa.column(tenant_column), schema=table.schema
    )
    value, owner = bare.c[column], bare.c[tenant_column]
    todo = sa.and_(value.is_not(None), sa.not_(is_tenant_value(value, typ.key)))
    with keyring.engine.connect() as conn:
        found = conn.execute(
            sa.select(owner, sa.cast(owner, sa.String())).where(todo).distinct()
        ).all()
    if any(tenant is None for tenant, _ in found):
        raise ConfigurationError(
            f"{table.name}.{column}: rows with a value and no {tenant_column} cannot be "
            f"encrypted under a tenant key; set their {tenant_column} first"
        )
    for _, text in found:  # every key first: the settle waits of the jobs then overlap
        keyring.active_key(typ.key, str(text))
    return [
        reencrypt_tenant(table, column, tenant, from_plaintext=True, **options)
        for tenant, _ in found
    ]


def _rewrite(
    typ: Any,
    keyring: TenantKeyring,
    table: sa.Table,
    row: Any,
    npk: int,
    target: envelope.DataKey,
    from_plaintext: bool = False,
) -> dict[str, Any]:
    values = tuple(row)
    old: str = values[npk]
    bound = list(zip(typ.bind_to, (t or "" for t in values[npk + 1 :]), strict=True))
    tenant_text = bound[0][1]
    found = envelope.parse(old)
    where = f"{table.name}.{typ._column.name if typ._column is not None else '?'}"
    ctx = typ.row_context(bound)
    params = {f"pk_{i}": values[i] for i in range(npk)}
    if found is None:
        data = _plaintext(typ, old) if from_plaintext else None
        if data is not None:
            params.update(old=old, new=target.encrypt_text(data, ctx, typ.pad))
            return params
        why = f"no valid {typ.codec} plaintext" if from_plaintext else "plaintext? encrypt_tenants"
        raise ReencryptionError(
            f"{where}: the row with primary key {values[:npk]!r} holds a value that is not "
            f"ours ({why}); nothing of this batch was written",
            table=table.name,
            column=where,
            primary_key=values[:npk],
        )
    try:
        key = keyring.key(typ.key, tenant_text, found[1], found[2])
        data = key.decrypt_text(old, ctx)
    except DecryptionError as exc:
        raise ReencryptionError(
            f"{where}: the row with primary key {values[:npk]!r} does not decrypt ({exc}); "
            "nothing of this batch was written",
            table=table.name,
            column=where,
            primary_key=values[:npk],
        ) from None
    params.update(old=old, new=target.encrypt_text(data, ctx, typ.pad))
    return params


def _plaintext(typ: Any, old: str) -> bytes | None:
    """A plaintext value as the column type serializes it, or None if it is not one (an
    altered ciphertext, or not of the column's codec); its errors quote it: dropped."""
    if envelope.looks_like_header(old):
        return None
    try:
        data: bytes = typ._serialize(typ._from_plaintext(old))
    except Exception:
        return None
    return data


def _encrypted(column: sa.Column[Any]) -> bool:
    from .types import _EncryptedType

    return isinstance(column.type, _EncryptedType)


def _activated_at(keyring: TenantKeyring, name: str, version: int) -> Any:
    t = keyring.table
    with keyring.engine.connect() as conn:
        return conn.execute(
            sa.select(t.c.created_at).where(
                t.c.key_name == name, t.c.version == version, t.c.state == KeyState.ACTIVE.value
            )
        ).scalar_one()
