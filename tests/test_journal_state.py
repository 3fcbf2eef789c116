"""The journal's one state enum: its transitions, and the file stays loadable without
sandvm (the keeper runs it under ``python -I -S``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandvm.runtime import journal as journal_mod
from sandvm.runtime.journal import Journal, JournalState


def test_states_move_starting_running_ended(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.add("sb-1")
    assert j.get("sb-1").state is JournalState.STARTING  # type: ignore[union-attr]
    assert j.update("sb-1", unless_ended=True, state=JournalState.RUNNING)
    rec = j.get("sb-1")
    assert rec is not None and rec.state is JournalState.RUNNING
    assert rec.state.label == "running"
    with pytest.raises(ValueError, match="end"):
        j.update("sb-1", state=JournalState.ENDED)  # only end() ends a sandbox
    with pytest.raises(ValueError):
        j.add("sb-2", state="ended")
    assert j.end("sb-1", "killed") and not j.end("sb-1", "again")
    rec = j.get("sb-1")
    assert rec is not None and rec.state is JournalState.ENDED and rec.end_reason == "killed"
    assert not j.update("sb-1", unless_ended=True, state=JournalState.RUNNING)
    assert j.sandboxes() == [] and [r.id for r in j.sandboxes(include_ended=True)] == ["sb-1"]
    j.close()


def test_an_unknown_state_reads_as_running(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.add("sb-1")
    j._db.execute("UPDATE sandboxes SET state = 'hibernating'")  # a newer sandvm's
    rec = j.get("sb-1")
    assert rec is not None and rec.state is JournalState.RUNNING
    j.close()


def test_journal_loads_without_sandvm(tmp_path: Path) -> None:
    path = journal_mod.__file__
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sandvm_journal', {path!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['sandvm_journal'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert not any(m == 'sandvm' or m.startswith('sandvm.') for m in sys.modules)\n"
        f"j = mod.Journal(__import__('pathlib').Path({str(tmp_path / 'k.db')!r}))\n"
        "j.add('sb-k'); j.update('sb-k', state=mod.JournalState.RUNNING)\n"
        "print(j.get('sb-k').state.label)\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "running"
