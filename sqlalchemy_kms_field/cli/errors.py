"""The two ways a command stops on purpose, each with its exit status."""

from __future__ import annotations


class UsageError(Exception):
    """A missing or invalid setting or argument: exit status 2."""


class Refused(Exception):
    """The command cannot do what was asked, and says why: exit status 1."""
