"""The library's messages in the command line's language: commands and flags, not Python.

The library's errors name what a Python caller changes (``create_data_key('pii')``,
``confirm=True (--yes-destroy)``, ``context= (CLI --context TABLE.COLUMN)``); the command line
prints the same messages with the command or the flag in their place. Python arguments with a
flag of their own are written ``argument (--flag)`` or ``argument (CLI --flag ...)`` in the
library, and the flag is kept.
"""

from __future__ import annotations

import re

from .config import PROG

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bcreate_data_key\('([^']+)'\)"), rf"`{PROG} keys create \1`"),
    (re.compile(r"\bcreate_index_key\('([^']+)'\)"), rf"`{PROG} keys create \1 --index`"),
    (re.compile(r"\brotate_data_key\('([^']+)'\)"), rf"`{PROG} keys rotate \1`"),
    (re.compile(r"\brotate_index_key\('([^']+)'\)"), rf"`{PROG} keys rotate \1`"),
    (
        re.compile(r" \(or create_index_key for a blind-index key\)"),
        " (with --index for a blind-index key)",
    ),
    (re.compile(r",? or rewrap_data_keys\(\) in Python"), ""),
    (
        re.compile(
            r"SqlKeyStore\(engine\)\.create_table\(\) or op\.create_key_store\(\) in a migration"
        ),
        f"`{PROG} setup`",
    ),
    (re.compile(r"LocalMasterKey\.generate_file\(path\) or "), ""),
    (re.compile(r" \(Python: [^)]*\)"), ""),  # the command is named already
    (
        re.compile(r"\bcontext=('[^']*'): write it as 'table\.column' \(one dot\).*"),
        r"--context \1: write it as TABLE.COLUMN (one dot)",
    ),
    # argument=value (--flag) / argument= (CLI --flag VALUE) -> --flag / --flag VALUE
    (re.compile(r"\b\w+=\S* \((?:CLI )?(--[^)]+)\)"), r"\1"),
    (re.compile(r"\b[a-z]+_[a-z_]+ \((?:CLI )?(--[^)]+)\)"), r"\1"),
]


def for_cli(message: str) -> str:
    """``message`` with the Python calls and arguments it names replaced by commands and flags."""
    for pattern, replacement in _RULES:
        message = pattern.sub(replacement, message)
    return message
