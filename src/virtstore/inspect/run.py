"""Running the worker: a child process per volume, a time limit per filesystem, and a
fresh child after a filesystem that crashed or hung it, so that one hostile filesystem
costs its own entry and nothing else."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from virtstore.errors import Cancelled, CommandFailed, OperationInvalid

FS_TIMEOUT = 30.0  # seconds for one filesystem
OP_TIMEOUT = 120.0  # seconds for inspect / boot files, which read several


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtstore.inspect.worker", *args]


def _run(args: list[str], on_doc: Any, *, timeout: float, per_item: bool = False) -> None:
    from virtstore.host.runner import stream

    deadline = [time.monotonic() + timeout]

    def line(text: str) -> None:
        text = text.strip()
        if not text:
            return
        try:
            doc = json.loads(text)
        except ValueError:
            return
        if per_item and "begin" in doc:
            deadline[0] = time.monotonic() + timeout
        on_doc(doc)

    stream(_argv(*args), line, should_stop=lambda: time.monotonic() > deadline[0],
           timeout=None)


def df(source: str, *, timeout: float = FS_TIMEOUT) -> dict[str, Any]:
    """Every filesystem of the disk at ``source`` (NBD URL or raw file) with its usage."""
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
            _run(["df", source, str(start)], on_doc, timeout=timeout, per_item=True)
        except Cancelled:
            why = f"reading it took more than {timeout:g}s"
        except CommandFailed as exc:
            why = f"its reader failed: {exc}"
        if error:
            raise OperationInvalid(f"cannot read the disk: {error[0]}")
        if why is None:
            return out
        if not current:
            raise OperationInvalid(f"cannot read the disk: {why}")
        entry = {k: v for k, v in current.items() if k != "begin"}
        out["filesystems"].append({**entry, "type": "unknown", "error": why})
        start = int(current["begin"]) + 1


def single(op: str, source: str, *extra: str, timeout: float = OP_TIMEOUT) -> dict[str, Any]:
    """``inspect`` or ``boot``: one answer, or OperationInvalid saying why not."""
    result: dict[str, Any] = {}
    error: list[str] = []

    def on_doc(doc: dict[str, Any]) -> None:
        if "result" in doc:
            result.update(doc["result"])
        elif "error" in doc:
            error.append(doc["error"])

    try:
        _run([op, source, *extra], on_doc, timeout=timeout)
    except Cancelled:
        raise OperationInvalid(f"reading the guest took more than {timeout:g}s") from None
    except CommandFailed as exc:
        raise OperationInvalid(f"the guest's disk could not be read: {exc}") from None
    if error:
        raise OperationInvalid(error[0])
    return result
