"""The one door for running outside programs.

Every external tool (qemu-img, lvm, parted, mkfs, mount, ...) runs through ``run``: an
argv list (never a shell string), a timeout, captured output, and a CommandFailed that
names the command and its complaint.
"""

from __future__ import annotations

import codecs
import errno
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from virtstore.errors import Cancelled, CommandFailed, NoSpace

DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def which(program: str) -> str | None:
    return shutil.which(program)


def _summarise(stderr: str, stdout: str) -> str:
    text = (stderr or stdout).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def run(argv: Sequence[str], *, timeout: float | None = DEFAULT_TIMEOUT,
        check: bool = True, input: str | None = None,
        env: Mapping[str, str] | None = None) -> Result:
    """Run ``argv`` and return its output; raise CommandFailed when it fails and ``check``."""
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("empty argv")
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    full_env = full_env or dict(os.environ)
    # Tools' messages are parsed and shown to users: keep them in English.
    full_env.setdefault("LC_ALL", "C")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              input=input, env=full_env, check=False,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise CommandFailed(f"cannot run '{args[0]}': program not found (is it installed?)",
                            argv=args) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"'{' '.join(args)}' timed out after {timeout:g}s", argv=args) from exc
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        why = _summarise(proc.stderr, proc.stdout)
        if "No space left on device" in why:
            raise NoSpace(f"no space left on device: {args[0]}: {why}")
        raise CommandFailed(f"'{os.path.basename(args[0])}' failed (exit {proc.returncode}): {why}",
                            argv=args, returncode=proc.returncode, stderr=proc.stderr)
    return result


def oserror_message(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def dies_with_us(args: list[str]) -> list[str]:
    """Long-running tools get SIGKILL when the thread that started them dies (setpriv
    --pdeathsig, util-linux): a killed virtstore must not leave a qemu-img writing on
    into a staging file the next start removes. Python's subprocess has no such option,
    and a preexec_fn is unsafe in a process with threads."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or shutil.which(args[0]) is None:
        return args  # a missing program is reported by Popen itself
    return [setpriv, "--pdeathsig", "KILL", "--", *args]


def stream(argv: Sequence[str], on_line: Callable[[str], None], *,
           should_stop: Callable[[], bool] | None = None,
           timeout: float | None = DEFAULT_TIMEOUT, env: Mapping[str, str] | None = None,
           separators: str = "\n\r", poll_interval: float = 0.1,
           grace: float = 2.0) -> Result:
    """Run ``argv`` and hand its standard output to ``on_line`` as it comes.

    The output is cut after every character in ``separators`` (newline and carriage
    return by default, so ``qemu-img -p``'s ``\\r``-refreshed progress arrives line by
    line); each piece keeps its separator, and a last piece without one comes at the end.
    ``should_stop`` is asked every ``poll_interval`` seconds at least: when it returns true
    the program is terminated (SIGTERM, SIGKILL after ``grace`` seconds), reaped, and
    Cancelled is raised. If ``on_line`` or ``should_stop`` raise, the program is killed the
    same way and their exception goes on. Standard error is collected for the error
    message; the returned Result holds the tail of standard output.
    """
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("empty argv")
    full_env = dict(os.environ)
    if env is not None:
        full_env.update(env)
    full_env.setdefault("LC_ALL", "C")
    try:
        proc = subprocess.Popen(dies_with_us(args), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
    except FileNotFoundError as exc:
        raise CommandFailed(f"cannot run '{args[0]}': program not found (is it installed?)",
                            argv=args) from exc
    deadline = None if timeout is None else time.monotonic() + timeout
    out_tail: list[str] = []
    err: list[bytes] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    finished = False
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while sel.get_map():
                if deadline is not None and time.monotonic() > deadline:
                    raise CommandFailed(f"'{' '.join(args)}' timed out after {timeout:g}s",
                                        argv=args)
                for key, _ in sel.select(poll_interval):
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fileobj)
                        continue
                    if key.fileobj is proc.stderr:
                        if sum(map(len, err)) < 1 << 20:
                            err.append(data)
                        continue
                    pending += decoder.decode(data)
                    pending = _deliver(pending, separators, on_line, out_tail)
                if should_stop is not None and should_stop():
                    raise Cancelled(f"'{os.path.basename(args[0])}' was stopped on request")
            pending += decoder.decode(b"", final=True)
            if pending:
                on_line(pending)
                out_tail.append(pending)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                proc.wait(remaining)
            except subprocess.TimeoutExpired as exc:
                raise CommandFailed(f"'{' '.join(args)}' timed out after {timeout:g}s",
                                    argv=args) from exc
            finished = True
    finally:
        if not finished:
            end_process(proc, grace)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    stderr = b"".join(err).decode("utf-8", "replace")
    result = Result(args, proc.returncode, "".join(out_tail)[-65536:], stderr)
    if proc.returncode != 0:
        why = _summarise(stderr, result.stdout)
        if "No space left on device" in why or "Disk quota exceeded" in why:
            raise NoSpace(f"no space left on device: {args[0]}: {why}")
        raise CommandFailed(f"'{os.path.basename(args[0])}' failed (exit {proc.returncode}): {why}",
                            argv=args, returncode=proc.returncode, stderr=stderr)
    return result


def _deliver(text: str, separators: str, on_line: Callable[[str], None],
             tail: list[str]) -> str:
    """Call ``on_line`` for every complete piece of ``text``; return the incomplete rest."""
    start = 0
    for i, ch in enumerate(text):
        if ch in separators:
            piece = text[start:i + 1]
            start = i + 1
            on_line(piece)
            tail.append(piece)
            if len(tail) > 4096:
                del tail[:2048]
    return text[start:]


def end_process(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    """Terminate ``proc`` (then kill it) and reap it, so no process is left behind."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
