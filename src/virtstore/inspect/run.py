"""Running the worker: child processes that read guests' disks, a time limit per
filesystem, and a fresh child after a filesystem that crashed or hung it, so that one
hostile filesystem costs its own entry and nothing else."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from virtstore.errors import Cancelled, CommandFailed, OperationInvalid

FS_TIMEOUT = 30.0  # seconds for one filesystem
OP_TIMEOUT = 120.0  # seconds for inspect / boot files, which read several


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtstore.inspect.worker", *args]


class _Died(Exception):
    """The reader ended, or was killed for taking too long, in the middle of an answer."""


class Reader:
    """A worker process giving df of disk after disk (``worker serve``): a pool's volumes
    pay for Python's start-up and imports once per reader, not once per volume (they
    were two thirds of a volume's reading). Each disk is still read afresh (its own
    connection and cache); after a filesystem that crashed or hung the process, it is
    killed and a new one goes on with the next filesystem. One thread uses a Reader."""

    def __init__(self, timeout: float = FS_TIMEOUT) -> None:
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._out = b""
        self._err = b""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the process: it leaves on the end of its input, or is killed."""
        from virtstore.host.runner import end_process

        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            end_process(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    def _kill(self, why: str) -> _Died:
        proc = self._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        rest = b"" if proc.stderr is None else proc.stderr.read()
        lines = (self._err + rest).decode("utf-8", "replace").strip().splitlines()
        self.close()
        if why:
            return _Died(why)
        code = f"exit {proc.returncode}" if proc.returncode >= 0 else \
            f"signal {-proc.returncode}"
        return _Died(f"its reader failed ({code}): {lines[-1] if lines else 'no output'}")

    def _start(self) -> subprocess.Popen[bytes]:
        from virtstore.host.runner import dies_with_us

        if self._proc is None:
            self._out = self._err = b""
            self._proc = subprocess.Popen(dies_with_us(_argv("serve")), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self._proc

    def _ask(self, source: str, start: int, on_doc: Callable[[dict[str, Any]], None]) -> None:
        """df of ``source`` from region ``start`` on, each document to ``on_doc``."""
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + self.timeout
        try:
            proc.stdin.write(json.dumps({"source": source, "start": start}).encode() + b"\n")
            proc.stdin.flush()
        except OSError:  # it is gone: what it said on its way out tells why
            raise self._kill("") from None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while True:
                while b"\n" in self._out:
                    line, _, self._out = self._out.partition(b"\n")
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        continue
                    if doc.get("done"):
                        return
                    if "begin" in doc:
                        deadline = time.monotonic() + self.timeout
                    on_doc(doc)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._kill(f"reading it took more than {self.timeout:g}s")
                for key, _ in sel.select(left):
                    data = os.read(key.fd, 65536)
                    if key.fileobj is proc.stderr:
                        if not data:
                            sel.unregister(proc.stderr)
                        self._err = (self._err + data)[-4096:]
                    elif not data:
                        raise self._kill("")
                    else:
                        self._out += data

    def df(self, source: str) -> dict[str, Any]:
        """Every filesystem of the disk at ``source`` (NBD URL or raw file) with its
        usage; a filesystem the reader died on, or took too long with, is ``unknown``
        with the reason."""
        out: dict[str, Any] = {"table": None, "filesystems": []}
        start = 0
        current: dict[str, Any] = {}
        error: list[str] = []

        def on_doc(doc: dict[str, Any]) -> None:
            if "table" in doc:
                out["table"] = doc["table"]
            elif "begin" in doc:
                current.clear()
                current.update(doc)
            elif "fs" in doc:
                out["filesystems"].append(doc["fs"])
                current.clear()
            elif "error" in doc:
                error.append(doc["error"])

        while True:
            current.clear()
            del error[:]
            why = None
            try:
                self._ask(source, start, on_doc)
            except _Died as exc:
                why = str(exc)
            if error:
                raise OperationInvalid(f"cannot read the disk: {error[0]}")
            if why is None:
                return out
            if not current:
                raise OperationInvalid(f"cannot read the disk: {why}")
            entry = {k: v for k, v in current.items() if k != "begin"}
            out["filesystems"].append({**entry, "type": "unknown", "error": why})
            start = int(current["begin"]) + 1


def df(source: str, *, timeout: float = FS_TIMEOUT) -> dict[str, Any]:
    """Every filesystem of the disk at ``source`` (NBD URL or raw file) with its usage."""
    with Reader(timeout) as reader:
        return reader.df(source)


def single(op: str, source: str, *extra: str, timeout: float = OP_TIMEOUT) -> dict[str, Any]:
    """``inspect`` or ``boot``: one answer, or OperationInvalid saying why not."""
    from virtstore.host.runner import stream

    result: dict[str, Any] = {}
    error: list[str] = []
    deadline = time.monotonic() + timeout

    def line(text: str) -> None:
        try:
            doc = json.loads(text)
        except ValueError:
            return
        if "result" in doc:
            result.update(doc["result"])
        elif "error" in doc:
            error.append(doc["error"])

    try:
        stream(_argv(op, source, *extra), line,
               should_stop=lambda: time.monotonic() > deadline, timeout=None)
    except Cancelled:
        raise OperationInvalid(f"reading the guest took more than {timeout:g}s") from None
    except CommandFailed as exc:
        raise OperationInvalid(f"the guest's disk could not be read: {exc}") from None
    if error:
        raise OperationInvalid(error[0])
    return result
