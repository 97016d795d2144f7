"""How long `kms-field --help` takes, against the interpreter's own start-up in the same run.

    python benchmarks/bench_cli_help.py [--runs 15] [--before DIR]

Each measurement starts a fresh interpreter (as the shell does) and takes the median of
``--runs`` starts, interleaved so that a busy moment hits every variant alike:

- floor: ``python -c pass``, the interpreter alone;
- ``kms-field --help`` (``python -m sqlalchemy_kms_field.cli --help``);
- ``kms-field keys destroy --help``;
- everything a command needs (SQLAlchemy, the column types, the command modules, rich): what
  ``--help`` imported before the commands were loaded lazily;
- with ``--before DIR`` (a folder holding an older ``sqlalchemy_kms_field`` package, e.g.
  ``git archive main sqlalchemy_kms_field | tar -x -C DIR``): that version's ``--help``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODULES = [
    "sqlalchemy_kms_field.types",
    *(f"sqlalchemy_kms_field.cli.{m}" for m in ("keys", "jobs", "status", "bootstrap")),
    "rich.console",
    "rich.table",
    "rich.progress",
]
EVERYTHING = "import " + ", ".join(MODULES)
VARIANTS = {
    "floor: python -c pass": ["-c", "pass"],
    "kms-field --help": ["-m", "sqlalchemy_kms_field.cli", "--help"],
    "kms-field keys destroy --help": [
        "-m",
        "sqlalchemy_kms_field.cli",
        "keys",
        "destroy",
        "--help",
    ],
    "import everything a command needs": ["-c", EVERYTHING],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--before", metavar="DIR", help="an older package's folder, to compare")
    options = parser.parse_args()
    runs = options.runs
    variants = {name: (args, None) for name, args in VARIANTS.items()}
    if options.before:
        before = {**os.environ, "PYTHONPATH": options.before}
        variants["kms-field --help, before (--before)"] = (VARIANTS["kms-field --help"], before)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, (args, env) in variants.items():
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, *args],
                check=True,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd=tempfile.gettempdir(),  # not a checkout: -m would import from the cwd first
            )
            times[name].append(time.perf_counter() - started)
    floor = statistics.median(times["floor: python -c pass"])
    print(f"median of {runs} starts each")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:40s} {median * 1000:7.1f} ms  ({median / floor:5.2f}x the floor)")


if __name__ == "__main__":
    main()
