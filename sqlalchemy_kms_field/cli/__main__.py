"""``python -m sqlalchemy_kms_field.cli``: the same as the ``kms-field`` command."""

from __future__ import annotations

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
