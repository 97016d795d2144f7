"""The commands' functions, imported only when their command runs: building the parser (and
``kms-field --help``) then imports neither SQLAlchemy nor rich."""

from __future__ import annotations

import argparse
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import App


def _lazy(module: str, name: str) -> Any:
    def handler(app: App, args: argparse.Namespace) -> int:
        function = getattr(import_module(f"{__package__}.{module}"), name)
        status: int = function(app, args)
        return status

    handler.__name__ = handler.__qualname__ = name
    return handler


cmd_config = _lazy("bootstrap", "cmd_config")
cmd_init_local = _lazy("bootstrap", "cmd_init_local")
cmd_setup = _lazy("bootstrap", "cmd_setup")
cmd_job = _lazy("jobs", "cmd_job")
cmd_reindex = _lazy("jobs", "cmd_reindex")
cmd_keys_create = _lazy("keys", "cmd_keys_create")
cmd_keys_destroy = _lazy("keys", "cmd_keys_destroy")
cmd_keys_list = _lazy("keys", "cmd_keys_list")
cmd_keys_retire = _lazy("keys", "cmd_keys_retire")
cmd_keys_rewrap = _lazy("keys", "cmd_keys_rewrap")
cmd_keys_rotate = _lazy("keys", "cmd_keys_rotate")
cmd_keys_shred = _lazy("keys", "cmd_keys_shred")
cmd_status = _lazy("status", "cmd_status")
