"""The test suite's own rules: under CI nothing skips (a missing tool, address or
mirror fails the run); `.ci/run` says it is CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

SAMPLE = '''
import pytest
from conftest import require

def test_needs_a_tool():
    require(False, "needs frobnicator (apt-get install frobnicator)")

@pytest.mark.skipif(True, reason="a plain skipif")
def test_marked():
    pass

def test_imports_what_is_not_there():
    pytest.importorskip("no_such_module_anywhere")

def test_has_it():
    require(True, "never shown")
'''


def _run_sample(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    clean = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", "-p", "no:cacheprovider",
         str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True, text=True,
        env={**clean, "PYTHONPATH": str(TESTS), **env}, timeout=120)


def test_a_missing_requirement_skips_locally(tmp_path: Path) -> None:
    r = _run_sample(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 3 skipped" in r.stdout
    assert "needs frobnicator" in r.stdout


def test_under_ci_every_skip_fails(tmp_path: Path) -> None:
    r = _run_sample(tmp_path, CI="1")
    assert r.returncode == 1, r.stdout
    assert "cannot run in CI: needs frobnicator" in r.stdout
    assert "skipped under CI" in r.stdout and "a plain skipif" in r.stdout
    assert "no_such_module_anywhere" in r.stdout
    assert "1 passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]


def test_ci_entry_point_sets_ci_and_runs_the_readme_commands() -> None:
    script = (TESTS.parent / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "export CI=1" in lines
    assert lines.index("export CI=1") < lines.index("make test")
    assert "make setup" in lines
