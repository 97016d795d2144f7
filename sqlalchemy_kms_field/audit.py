"""An audit hook: called for decryptions with the table, column, key and version (never the
value), for every decryption or a random sample of them.

    def record(event: kf.audit.AuditEvent) -> None:
        audit_log.info("decrypt %s.%s %s v%d", event.table, event.column, event.key, event.version)

    kf.audit.set_audit_hook(record, sample=0.01)   # one decryption in a hundred, at random

The hook runs in the thread (or event-loop task) that reads the row, inside SQLAlchemy's
result processing: keep it fast (hand events to a queue). An exception it raises fails the
read, so that an audit trail is never silently incomplete.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .envelope import DataKey
from .exc import ConfigurationError

__all__ = ["AuditEvent", "set_audit_hook"]


@dataclass(frozen=True)
class AuditEvent:
    """One decryption: where the value was and which key version decrypted it."""

    table: str
    column: str
    key: str
    version: int


AuditHook = Callable[[AuditEvent], None]


def set_audit_hook(hook: AuditHook | None, *, sample: float = 1.0) -> None:
    """Call ``hook`` for decryptions from now on (``None``: stop). ``sample``: the fraction of
    decryptions reported, chosen at random (1.0: every one)."""
    if not 0 < sample <= 1:
        raise ConfigurationError(f"sample must be more than 0 and at most 1 (got {sample!r})")
    if hook is None:
        metrics._set_audit(None)
        return
    chance = random.random  # sampling, not security: S311 does not apply

    def emit(key: DataKey, typ: Any) -> None:
        if sample < 1 and chance() >= sample:
            return
        table, column = metrics._place(typ)
        hook(AuditEvent(table, column, key.name, key.version))

    metrics._set_audit(emit)
