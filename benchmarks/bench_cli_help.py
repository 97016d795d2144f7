"""How long `kms-field --help` takes, against the interpreter's own start-up in the same run.

    python benchmarks/bench_cli_help.py [--runs 15]

Each measurement starts a fresh interpreter (as the shell does) and takes the median of
``--runs`` starts, interleaved so that a busy moment hits every variant alike:

- floor: ``python -c pass``, the interpreter alone;
- ``kms-field --help`` (``python -m sqlalchemy_kms_field.cli --help``);
- ``kms-field keys destroy --help``;
- everything a command needs (SQLAlchemy, the column types, the command modules, rich): what
  ``--help`` imported before the commands were loaded lazily.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
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
    runs = parser.parse_args().runs
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(runs):
        for name, args in VARIANTS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    floor = statistics.median(times["floor: python -c pass"])
    print(f"median of {runs} starts each")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:40s} {median * 1000:7.1f} ms  ({median / floor:5.2f}x the floor)")


if __name__ == "__main__":
    main()
