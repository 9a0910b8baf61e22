"""The one door for running outside programs.

Every external tool (qemu-img, lvm, parted, mkfs, mount, ...) runs through ``run``: an
argv list (never a shell string), a timeout, captured output, and a CommandFailed that
names the command and its complaint.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from virtstore.errors import CommandFailed, NoSpace

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
