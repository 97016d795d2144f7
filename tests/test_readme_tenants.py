"""The README's "A data key per tenant" example runs as written, in a process of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- tenant-example -->"


def test_the_tenant_example_runs_as_written(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, f"{README} lost its {MARKER} marker"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.DOTALL)
    assert match, f"no ```python block right after {MARKER}"
    (tmp_path / "example.py").write_text(match.group(1) + '\nprint("ok")\n', encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"
