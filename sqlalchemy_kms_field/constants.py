"""Constants that the command line's grammar shows in ``--help``, importable without SQLAlchemy
(so that ``kms-field --help`` imports nothing heavy). Their modules re-export them."""

from __future__ import annotations

from typing import Final

# Codecs: how a Python value became bytes (envelope.py). Part of every value's context.
CODECS: Final = (
    "str", "bytes", "json", "bool", "int", "float", "decimal", "date", "datetime", "time",
    "interval", "uuid", "enum",
)  # fmt: skip

# Seconds a version stays retired before destroy may erase it (lifecycle.py).
DESTROY_GRACE_PERIOD: Final = 3 * 24 * 3600.0

# In ``schemas``: every schema the database user can see, but the database's own (scan.py).
ALL_SCHEMAS: Final = "*"
