"""The README's "Testing your application" block works as written, in a pytest run of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- testing-guide -->"


def guide_source() -> str:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, f"{README} lost its {MARKER} marker"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.DOTALL)
    assert match, f"no ```python block right after {MARKER}"
    return match.group(1)


def test_the_testing_guide_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "test_app.py").write_text(guide_source(), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout
