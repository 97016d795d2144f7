"""OpenTelemetry metrics: KMS calls, the key cache, encryptions and decryptions, decryption
failures and re-encryption jobs (the optional ``otel`` extra: ``opentelemetry-api``).

Nothing is measured until :func:`enable_metrics` is called: the hot paths test one module
flag (:data:`ON`), so an application without the extra pays nothing measurable. Per-value
counts are plain integers kept here, read by the OpenTelemetry SDK at collection time
(observable counters), so that a value costs one dictionary increment, not an SDK call.

The application owns the SDK (its ``MeterProvider``, exporters and readers); this module
only takes a meter from the API. Attributes carry key names, versions, operations, outcomes,
reasons, tables and columns: never a value, never key material.

Instruments (names follow the OpenTelemetry conventions, ``kms_field.*``):

- ``kms_field.kms.calls`` (counter; ``operation``, ``outcome``): AWS KMS calls, the outcome
  ``success`` or the KMS error code; ``kms_field.kms.duration`` (histogram, s): their latency.
- ``kms_field.key_cache.misses`` (counter; ``kind``): key versions unwrapped (each is a call
  to the master key); ``kms_field.key_cache.hits`` (observable; ``kind``): values encrypted or
  decrypted with a key already in memory.
- ``kms_field.encryptions`` / ``kms_field.decryptions`` (observable; ``key``, ``version``).
  Values of a column with a key per tenant (``tenant=``) are counted under the column's data
  key and the tenant key's version, with ``tenant_keys=True``: never per tenant (a million
  tenants would make a million series). Tenant keys read from their table and unwrapped count
  as ``kms_field.key_cache.misses`` of ``kind="tenant"``.
- ``kms_field.decryption.failures`` (counter; ``key``, ``reason``, ``table``, ``column``).
- ``kms_field.job.rows_done``, ``kms_field.job.rate`` (rows/s), ``kms_field.job.eta`` (s)
  (observable gauges; ``job``): for jobs given ``progress=job_progress("users.email")``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .exc import ConfigurationError, DecryptionError, KeyNotFoundError, KeyStateError

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from .envelope import DataKey

# Read on every value by the column types: True once metrics or an audit hook are enabled.
ON = False

_encrypted: defaultdict[str, int] = defaultdict(int)  # by key header ("kf2:pii:3:")
_decrypted: defaultdict[str, int] = defaultdict(int)
# Tenant keys, by (the column's data key, the tenant key's version): bounded by versions.
_tenant_encrypted: defaultdict[tuple[str, int], int] = defaultdict(int)
_tenant_decrypted: defaultdict[tuple[str, int], int] = defaultdict(int)
_instruments: dict[str, Any] = {}
_jobs: dict[str, tuple[int, float, float | None]] = {}  # job -> rows done, rate, eta
_audit: Callable[[DataKey, Any], None] | None = None  # set by audit.set_audit_hook


def enable_metrics(meter_provider: MeterProvider | None = None) -> None:
    """Record this library's metrics through OpenTelemetry from now on.

    ``meter_provider``: the application's (default: the global one the SDK was set up with).
    Needs the ``otel`` extra (``pip install sqlalchemy-kms-field[otel]``).
    """
    global ON
    try:
        from opentelemetry import metrics as otel
    except ImportError as exc:
        raise ConfigurationError(
            "enable_metrics() needs OpenTelemetry: pip install 'sqlalchemy-kms-field[otel]'"
        ) from exc
    from importlib.metadata import version

    meter = (meter_provider or otel.get_meter_provider()).get_meter(
        "sqlalchemy_kms_field", version("sqlalchemy-kms-field")
    )
    _instruments.clear()
    _instruments["kms_calls"] = meter.create_counter(
        "kms_field.kms.calls", unit="{call}", description="AWS KMS calls"
    )
    _instruments["kms_duration"] = meter.create_histogram(
        "kms_field.kms.duration", unit="s", description="Latency of AWS KMS calls"
    )
    _instruments["misses"] = meter.create_counter(
        "kms_field.key_cache.misses", unit="{key}", description="Key versions unwrapped"
    )
    _instruments["failures"] = meter.create_counter(
        "kms_field.decryption.failures", unit="{value}", description="Values that did not decrypt"
    )
    meter.create_observable_counter(
        "kms_field.key_cache.hits",
        [_observe_hits],
        unit="{value}",
        description="Values encrypted or decrypted with a key already in memory",
    )
    meter.create_observable_counter(
        "kms_field.encryptions", [_observer(_encrypted, _tenant_encrypted)], unit="{value}"
    )
    meter.create_observable_counter(
        "kms_field.decryptions", [_observer(_decrypted, _tenant_decrypted)], unit="{value}"
    )
    for name, index, unit in (("rows_done", 0, "{row}"), ("rate", 1, "{row}/s"), ("eta", 2, "s")):
        meter.create_observable_gauge(f"kms_field.job.{name}", [_job_observer(index)], unit=unit)
    ON = True


def disable_metrics() -> None:
    """Stop recording (the instruments stay registered with the provider) and reset counts."""
    global ON
    _instruments.clear()
    _encrypted.clear()
    _decrypted.clear()
    _tenant_encrypted.clear()
    _tenant_decrypted.clear()
    _jobs.clear()
    ON = _audit is not None


# Recording (called by the library; cheap, and only when ON) -----------------------------------


def encrypted(key: DataKey) -> None:
    _encrypted[key.header] += 1


def tenant_encrypted(base: str, version: int) -> None:
    """A value encrypted under version ``version`` of a tenant key of data key ``base``."""
    _tenant_encrypted[(base, version)] += 1


def decrypted(key: DataKey, typ: Any) -> None:
    """A value of column type ``typ`` decrypted under ``key`` (counted; audited if asked).
    A tenant column's values are counted under the column's key, not the tenant's."""
    if typ.tenant is None:
        _decrypted[key.header] += 1
    else:
        _tenant_decrypted[(typ.key, key.version)] += 1
    if _audit is not None:
        _audit(key, typ)


def kms_call(operation: str, outcome: str, seconds: float) -> None:
    if _instruments:
        attributes = {"operation": operation, "outcome": outcome}
        _instruments["kms_calls"].add(1, attributes)
        _instruments["kms_duration"].record(seconds, attributes)


def cache_miss(kind: str) -> None:
    if _instruments:
        _instruments["misses"].add(1, {"kind": kind})


def decryption_failed(typ: Any, key_name: str, exc: DecryptionError) -> None:
    if _instruments:
        table, column = _place(typ)
        _instruments["failures"].add(
            1, {"key": key_name, "reason": failure_reason(exc), "table": table, "column": column}
        )


def failure_reason(exc: DecryptionError) -> str:
    """Why a value did not decrypt, in a word: ``key_unavailable`` (unknown, retired or
    destroyed version, or the store unreadable), ``wrong_key`` (written under another key),
    ``malformed`` (not our format), ``codec`` (decrypted, but not a value of the column's
    type) or ``authentication`` (altered, moved, or the wrong context)."""
    if isinstance(exc.__cause__, (KeyNotFoundError, KeyStateError)):
        return "key_unavailable"
    text = str(exc)
    if "values cannot move between keys" in text or "cannot move between tenants" in text:
        return "wrong_key"
    if "erased" in text or "has no usable key version" in text:  # a tenant's key (tenants.py)
        return "key_unavailable"
    if "is not a valid" in text:
        return "codec"
    if "not sqlalchemy-kms-field ciphertext" in text or "does not parse" in text:
        return "malformed"
    return "authentication"


# Jobs ------------------------------------------------------------------------------------------


def job_progress(job: str) -> Callable[[int, int], None]:
    """A ``progress=`` callback for ``reencrypt_column`` & co. that publishes the job's rows
    done, rate (rows/s since the start) and ETA (s) as gauges with attribute ``job``."""
    started = time.monotonic()

    def progress(done: int, todo: int) -> None:
        elapsed = time.monotonic() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = max(todo - done, 0) / rate if rate > 0 else None
        _jobs[job] = (done, rate, eta)

    return progress


def job_figures(job: str) -> tuple[int, float, float | None] | None:
    """The last rows done, rate and ETA published for ``job`` in this process."""
    return _jobs.get(job)


def job_rate(
    rows_done: int, started_at: Any, updated_at: Any, remaining: int | None
) -> tuple[float | None, float | None]:
    """``(rows/s, seconds left)`` of a checkpointed job from its row in ``kms_field_jobs``
    (as ``kms-field status`` shows them); None where unknown."""
    try:
        elapsed = (updated_at - started_at).total_seconds()
    except (TypeError, AttributeError):
        return None, None
    if elapsed <= 0 or rows_done <= 0:
        return None, None
    rate = rows_done / elapsed
    return rate, (None if remaining is None else remaining / rate)


# Observers (run by the SDK at collection time) ---------------------------------------------


def _split(header: str) -> tuple[str, int]:
    _, name, version, _ = header.split(":")
    return name, int(version)


def _observer(
    counts: dict[str, int], tenant_counts: dict[tuple[str, int], int]
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        by_version: defaultdict[tuple[str, int], int] = defaultdict(int)
        for header, n in list(counts.items()):
            by_version[_split(header)] += n
        return [
            Observation(n, {"key": name, "version": version})
            for (name, version), n in sorted(by_version.items())
        ] + [
            Observation(n, {"key": name, "version": version, "tenant_keys": True})
            for (name, version), n in sorted(list(tenant_counts.items()))
        ]

    return observe


def _observe_hits(options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    hits = sum(_encrypted.values()) + sum(_decrypted.values())
    hits += sum(_tenant_encrypted.values()) + sum(_tenant_decrypted.values())
    return [Observation(hits, {"kind": "data"})]


def _job_observer(index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        found = [(job, figures[index]) for job, figures in list(_jobs.items())]
        return [Observation(v, {"job": job}) for job, v in found if v is not None]

    return observe


def _place(typ: Any) -> tuple[str, str]:
    try:
        table, column = typ.place()
    except Exception:
        return "", ""
    return str(table), str(column)


def _set_audit(hook: Callable[[DataKey, Any], None] | None) -> None:
    global _audit, ON
    _audit = hook
    ON = bool(_instruments) or hook is not None
