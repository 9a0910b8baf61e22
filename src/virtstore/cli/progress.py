"""Waiting for a job on the command line: a progress bar, JSON lines, Ctrl-C to cancel.

The bar goes to stderr, and only when stderr is a terminal and the job has run for
more than ``BAR_DELAY`` seconds, so quick jobs and scripts see nothing. ``--json``
turns the updates into one JSON object (a JobInfo) per line on stdout, the last one
being the finished job. Ctrl-C while waiting cancels the job, waits for it to stop (so
nothing half-made is left behind) and fails with one line.

rich is imported only when a bar is actually drawn.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from virtstore.errors import Cancelled, VirtstoreError

if TYPE_CHECKING:
    from virtstore.api import Connection, JobInfo
    from virtstore.cli.context import Context

BAR_DELAY = 0.5  # seconds a job runs before a bar appears
POLL = 0.1  # seconds between two looks at the job
JSON_INTERVAL = 0.2  # seconds between two JSON progress lines, at most one per update


def job_error(job: JobInfo) -> VirtstoreError:
    """The error a failed or cancelled job ends with, as the class its code names."""
    if job.state == "cancelled":
        return Cancelled(f"operation aborted: {job.kind} job '{job.id}' was cancelled")
    from virtstore import errors

    cls: type[VirtstoreError] = errors.InternalError
    stack: list[type[VirtstoreError]] = [errors.VirtstoreError]
    while stack:
        candidate = stack.pop()
        if candidate.code == job.error_code:
            cls = candidate
            break
        stack.extend(candidate.__subclasses__())
    return cls(job.error or f"{job.kind} job '{job.id}' {job.state}")


def _json_line(out: TextIO, job: JobInfo) -> None:
    import json

    out.write(json.dumps(job.to_dict()) + "\n")
    out.flush()


class _Bar:
    """A rich progress bar on stderr for one job, made on first use."""

    def __init__(self, label: str, job: JobInfo) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            Task,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            """Bytes per second in binary units, as the sizes are shown."""

            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                if speed is None:
                    return Text("?", style="progress.data.speed")
                from virtstore.cli.output import pretty_size

                return Text(f"{pretty_size(int(speed))}/s", style="progress.data.speed")

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(binary_units=True), Rate(),
                                 TimeRemainingColumn(),
                                 console=Console(file=sys.stderr), transient=True)
        self.task = self.progress.add_task(label, total=job.bytes_total or None,
                                           completed=job.bytes_done)
        self.progress.start()

    def update(self, job: JobInfo) -> None:
        total = job.bytes_total or None
        self.progress.update(self.task, completed=job.bytes_done, total=total)

    def stop(self) -> None:
        self.progress.stop()


def _want_bar() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def follow(conn: Connection, job: JobInfo, *, out: TextIO, json_lines: bool = False,
           label: str | None = None) -> JobInfo:
    """Wait for ``job`` to finish, showing its progress; returns its final state.

    Raises the job's error if it failed or was cancelled, and Cancelled after Ctrl-C
    (the job is cancelled first and waited for).
    """
    bar: _Bar | None = None
    want_bar = not json_lines and _want_bar()
    start = time.monotonic()
    last_line = 0.0
    shown: tuple[int, int, str] | None = None
    try:
        try:
            while True:
                if json_lines and not job.finished:
                    now = time.monotonic()
                    key = (job.bytes_done, job.bytes_total, job.state)
                    if key != shown and now - last_line >= JSON_INTERVAL:
                        _json_line(out, job)
                        shown, last_line = key, now
                if bar is None and want_bar and time.monotonic() - start >= BAR_DELAY:
                    bar = _Bar(label or f"{job.kind} {job.volume or ''}".strip(), job)
                elif bar is not None:
                    bar.update(job)
                if job.finished:
                    break
                job = conn.job_wait(job.id, timeout=POLL)
        finally:
            if bar is not None:
                bar.stop()
    except KeyboardInterrupt:
        job = _cancel_and_wait(conn, job)
        if json_lines:
            _json_line(out, job)
        if job.state == "cancelled":
            raise Cancelled(f"operation aborted: {job.kind} job '{job.id}' cancelled "
                            "by the user") from None
        if job.state != "done":
            raise job_error(job) from None
        return job
    if json_lines:
        _json_line(out, job)
    if job.state != "done":
        raise job_error(job)
    return job


def _cancel_and_wait(conn: Connection, job: JobInfo) -> JobInfo:
    from virtstore.errors import OperationInvalid

    try:
        conn.job_cancel(job.id)
    except OperationInvalid:
        pass  # it finished meanwhile
    return conn.job_wait(job.id)


def run_job(ctx: Context, job: JobInfo, *, json_lines: bool = False,
            label: str | None = None) -> JobInfo:
    """``follow`` for a command: JSON lines turn off virsh's closing empty line."""
    if json_lines:
        ctx.trailer = False
    return follow(ctx.conn, job, out=ctx.out, json_lines=json_lines, label=label)
