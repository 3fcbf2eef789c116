"""The fake runtime's processes: scripts (``FakeStep``s, and ``shell_script``, which
reads a tiny subset of ``sh -c``) and ``FakeProcess``, which runs one in virtual time.

``sandvm.runtime.fake`` says what a script may do and how time passes; its
``FakeIsolationRuntime`` starts, feeds and reads ``FakeProcess``es. The package
``sandvm.runtime`` exports these names.
"""

from __future__ import annotations

import shlex
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sandvm.errors import InvalidSpec
from sandvm.runtime.port import ProcessIoFrame, ProcessSignal

__all__ = [
    "FakeEchoStdin",
    "FakeExit",
    "FakeIgnore",
    "FakeProcess",
    "FakeProcessContext",
    "FakeScript",
    "FakeSleep",
    "FakeStep",
    "FakeWrite",
    "shell_script",
]

_EPS = 1e-9
_HEAD_CAP = 16 << 20


# ----------------------------------------------------------------------------- scripts


@dataclass(frozen=True)
class FakeWrite:
    """Write ``data`` to stdout (or stderr)."""

    data: bytes
    stderr: bool = False


@dataclass(frozen=True)
class FakeSleep:
    """Block for ``seconds`` of virtual time."""

    seconds: float


@dataclass(frozen=True)
class FakeEchoStdin:
    """Copy stdin to stdout until stdin is closed (``cat``)."""


@dataclass(frozen=True)
class FakeIgnore:
    """Ignore these signals from now on (KILL cannot be ignored)."""

    signals: tuple[ProcessSignal, ...]

    def __post_init__(self) -> None:
        if ProcessSignal.KILL in self.signals:
            raise InvalidSpec("kill cannot be ignored")


@dataclass(frozen=True)
class FakeExit:
    """Exit with ``code`` (remaining steps do not run)."""

    code: int


FakeStep = FakeWrite | FakeSleep | FakeEchoStdin | FakeIgnore | FakeExit


@dataclass(frozen=True, kw_only=True)
class FakeProcessContext:
    """What a fake process sees: its argv, variables and files (secret files)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    files: Mapping[str, bytes] = field(repr=False)
    cwd: str | None = None


FakeScript = Callable[[FakeProcessContext], Sequence[FakeStep]]

_SIGNAL_NAMES = {"INT": ProcessSignal.INTERRUPT, "SIGINT": ProcessSignal.INTERRUPT, "2":
                 ProcessSignal.INTERRUPT, "TERM": ProcessSignal.TERMINATE,
                 "SIGTERM": ProcessSignal.TERMINATE, "15": ProcessSignal.TERMINATE}


def _split_commands(text: str) -> list[list[str]]:
    lex = shlex.shlex(text.replace("\n", ";"), posix=True, punctuation_chars=";")
    lex.whitespace_split = True
    commands: list[list[str]] = [[]]
    try:
        for tok in lex:
            if tok and set(tok) == {";"}:
                commands.append([])
            else:
                commands[-1].append(tok)
    except ValueError:  # unbalanced quotes
        return [["sh:", "syntax error"]]
    return [c for c in commands if c]


def _expand(word: str, env: Mapping[str, str]) -> str:
    if word.startswith("${") and word.endswith("}"):
        return env.get(word[2:-1], "")
    if word.startswith("$") and len(word) > 1 and (word[1:].replace("_", "a").isalnum()):
        return env.get(word[1:], "")
    return word


def _command(words: list[str], ctx: FakeProcessContext) -> tuple[list[FakeStep], int]:
    """The steps of one command and its exit status."""
    to_err = False
    if words and words[-1] in (">&2", "1>&2"):
        to_err, words = True, words[:-1]
    if not words:
        return [], 0
    name, args = words[0].rsplit("/", 1)[-1], words[1:]

    def out(data: bytes) -> FakeStep:
        return FakeWrite(data, stderr=to_err)

    def err(msg: str) -> FakeStep:
        return FakeWrite(msg.encode(), stderr=True)

    if name == "echo":
        newline = not (args and args[0] == "-n")
        text = " ".join(args[0 if newline else 1:]) + ("\n" if newline else "")
        return [out(text.encode())], 0
    if name == "cat":
        if not args:
            return [FakeEchoStdin()], 0
        steps: list[FakeStep] = []
        status = 0
        for path in args:
            if path in ctx.files:
                steps.append(out(ctx.files[path]))
            else:
                steps.append(err(f"cat: {path}: No such file or directory\n"))
                status = 1
        return steps, status
    if name == "printenv":
        if len(args) == 1 and args[0] in ctx.env:
            return [out(ctx.env[args[0]].encode() + b"\n")], 0
        return [], 1
    if name == "sleep":
        try:
            seconds = float(args[0])
        except (IndexError, ValueError):
            return [err("sleep: invalid time interval\n")], 1
        return [FakeSleep(max(0.0, seconds))], 0
    if name == "head" and len(args) == 3 and args[0] == "-c" and args[2] == "/dev/zero":
        try:
            n = min(int(args[1]), _HEAD_CAP)
        except ValueError:
            return [err("head: invalid number of bytes\n")], 1
        return [out(b"\0" * n)], 0
    if name == "trap":
        if len(args) >= 2 and args[0] == "":
            sigs = tuple(_SIGNAL_NAMES[s.upper()] for s in args[1:] if s.upper() in _SIGNAL_NAMES)
            return [FakeIgnore(sigs)], 0
        return [], 0
    if name in ("true", ":"):
        return [], 0
    if name == "false":
        return [], 1
    return [err(f"sh: 1: {words[0]}: not found\n")], 127


def shell_script(ctx: FakeProcessContext) -> list[FakeStep]:
    """The default script: a tiny ``sh -c`` subset (see the module docstring)."""
    argv = list(ctx.argv)
    shell = argv[0].rsplit("/", 1)[-1] in ("sh", "bash", "dash", "ash")
    if shell and len(argv) >= 3 and argv[1] == "-c":
        commands = [[_expand(w, ctx.env) for w in c] for c in _split_commands(argv[2])]
    else:
        commands = [argv]
    steps: list[FakeStep] = []
    status = 0
    for words in commands:
        if words[0] == "exit":
            try:
                code = int(words[1]) & 0xFF if len(words) > 1 else status
            except ValueError:
                code = 2
            steps.append(FakeExit(code))
            return steps
        more, status = _command(words, ctx)
        steps.extend(more)
    steps.append(FakeExit(status))
    return steps


# ----------------------------------------------------------------------------- processes


class FakeProcess:
    """A scripted process running in virtual time: ``run`` its steps until one blocks,
    ``advance`` the clock, take output with ``frame``; ``end``/``kill`` it. Its fields
    are the fake runtime's to read and set (stdin, ignored signals, grace deadline)."""

    def __init__(self, process_id: str, session_id: str, steps: Sequence[FakeStep], *,
                 stdin_open: bool, timeout: float | None) -> None:
        self.process_id = process_id
        self.session_id = session_id
        self.steps: deque[FakeStep] = deque(steps)
        self.out = bytearray()
        self.err = bytearray()
        self.stdin = bytearray()
        self.stdin_log = bytearray()
        self.stdin_open = stdin_open
        self.started_with_stdin = stdin_open
        self.timeout = timeout
        self.kill_at: float | None = None
        self.sleep_left: float | None = None
        self.ignored: set[ProcessSignal] = set()
        self.elapsed = 0.0
        self.steps_run = 0
        self.sequence = 0
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.timed_out = False

    @property
    def exited(self) -> bool:
        return self.exit_code is not None

    def end(self, code: int, *, signal: int | None = None, timed_out: bool = False) -> None:
        if self.exited:
            return
        self.exit_code, self.signal, self.timed_out = code, signal, timed_out
        self.steps.clear()
        self.sleep_left = self.kill_at = None
        self.stdin_open = False

    def kill(self, signum: int, *, timed_out: bool = False) -> None:
        self.end(128 + signum, signal=signum, timed_out=timed_out)

    def run(self) -> None:
        """Run steps until the script blocks or ends."""
        while not self.exited:
            if not self.steps:
                self.end(0)
                return
            step = self.steps[0]
            if isinstance(step, FakeWrite):
                (self.err if step.stderr else self.out).extend(step.data)
            elif isinstance(step, FakeExit):
                self.steps_run += 1
                self.end(step.code & 0xFF)
                return
            elif isinstance(step, FakeIgnore):
                self.ignored.update(step.signals)
            elif isinstance(step, FakeSleep):
                if self.sleep_left is None:
                    self.sleep_left = step.seconds
                if self.sleep_left > _EPS:
                    return
                self.sleep_left = None
            elif isinstance(step, FakeEchoStdin):
                self.out.extend(self.stdin)
                self.stdin.clear()
                if self.stdin_open:
                    return
            self.steps.popleft()
            self.steps_run += 1

    def _deadlines(self) -> None:
        if self.timeout is not None and self.elapsed >= self.timeout - _EPS:
            self.kill(ProcessSignal.KILL.signum, timed_out=True)
        elif self.kill_at is not None and self.elapsed >= self.kill_at - _EPS:
            self.kill(ProcessSignal.KILL.signum)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass (sleeps, timeout, grace)."""
        self.run()
        while seconds > _EPS and not self.exited:
            events = [t for t in (
                self.sleep_left,
                None if self.timeout is None else self.timeout - self.elapsed,
                None if self.kill_at is None else self.kill_at - self.elapsed) if t is not None]
            step = max(0.0, min([seconds, *events]))
            self.elapsed += step
            seconds -= step
            if self.sleep_left is not None:
                self.sleep_left = max(0.0, self.sleep_left - step)
            self._deadlines()
            self.run()
            if self.out or self.err:
                break

    def frame(self, max_bytes: int) -> ProcessIoFrame:
        out = bytes(self.out[:max_bytes])
        del self.out[:len(out)]
        err = bytes(self.err[:max_bytes - len(out)])
        del self.err[:len(err)]
        finished = self.exited and not self.out and not self.err
        self.sequence += 1
        return ProcessIoFrame(
            process_id=self.process_id, sequence=self.sequence - 1, stdout=out, stderr=err,
            finished=finished, exit_code=self.exit_code if finished else None,
            signal=self.signal if finished else None, timed_out=finished and self.timed_out)
