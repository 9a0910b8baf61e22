"""The hand-written handlers: volume data as streams (dense or in the sparse framing),
job waits and events as long polls, and the Server-Sent Events stream.

Their arguments are still declared in ``api/operations.py`` and checked by ``bind``
before anything starts.
"""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import quote

from virtstore.api import Connection, JobInfo
from virtstore.api.operations import BY_NAME, MAX_INT
from virtstore.errors import InvalidArgument, VirtstoreError
from virtstore.server.http import HTTPError, Request, Response, StreamWriter, error_response
from virtstore.server.sparse import SPARSE, SparseDecoder, SparseEncoder, data_pieces
from virtstore.server.wire import OCTETS, Body, bind, flat, job_final, json_response

# Longest a single request blocks waiting for a job or an event; clients loop.
MAX_WAIT = 60.0
EVENT_KEEPALIVE = 15.0


def _range(offset: int, length: int | None) -> None:
    """An upload's or download's end must be a file offset."""
    if offset + (length or 0) > MAX_INT:
        raise InvalidArgument(f"offset + length must be at most {MAX_INT}")


def volume_upload(conn: Connection, req: Request, p: list[str]) -> Response:
    a = bind(BY_NAME["volume_upload"], req, p, Body())
    source: Any = req.stream()
    length = a["length"]
    if req.content_type == SPARSE:
        # The framing's length is not the volume's: the end record says how much.
        source = SparseDecoder(source)
        a["sparse"] = True
    elif length is None:
        cl = req.headers.get("content-length")
        length = int(cl) if cl is not None and cl.isdigit() else None
    _range(a["offset"], length)
    return _when_done(conn, conn.volume_upload(a["pool"], a["name"], source,
                                               offset=a["offset"], length=length,
                                               sparse=a["sparse"], bandwidth=a["bandwidth"]))


def volume_receive(conn: Connection, req: Request, p: list[str]) -> Response:
    a = bind(BY_NAME["volume_receive"], req, p, Body())
    if req.content_type != SPARSE:
        # Only the framing's end record tells a whole body from one cut short.
        raise InvalidArgument(f"a received volume travels as {SPARSE}")
    return _when_done(conn, conn.volume_receive(
        a["pool"], a["name"], data_pieces(req.stream(), a["capacity"]), a["capacity"],
        format=a["format"], like=a["like"], required=a["required"], bandwidth=a["bandwidth"]))


def _when_done(conn: Connection, job: JobInfo) -> Response:
    """The answer to a request whose body was the job's data: the job once it ended."""
    return job_final(job if job.finished else conn.job_wait(job.id))


def volume_download(conn: Connection, req: Request, p: list[str]) -> Response:
    a = bind(BY_NAME["volume_download"], req, p, Body())
    _range(a["offset"], a["length"])
    framed = SPARSE in req.headers.get("accept", "")

    def run(writer: StreamWriter) -> Response | None:
        sink = _LazySink(writer, SPARSE if framed else OCTETS)
        # A browser following a download link saves the bytes under the volume's name.
        sink.extra = [("Content-Disposition",
                       f"attachment; filename*=UTF-8''{quote(a['name'], safe='')}")]
        try:
            try:
                job = conn.volume_download(a["pool"], a["name"], sink,  # type: ignore[arg-type]
                                           offset=a["offset"], length=a["length"], sparse=False,
                                           bandwidth=a["bandwidth"])
                sink.job_id = job.id
            finally:
                sink.job_known.set()
            if not job.finished:
                job = conn.job_wait(job.id)
        except VirtstoreError as err:
            if writer.started:
                return None
            return error_response(HTTPError(err.http_status, err.code, str(err)))
        if job.state != "done":
            if writer.started:
                return None  # the connection closes without the last chunk
            return job_final(job)
        if not writer.started:
            writer.start(200, SPARSE if framed else OCTETS,
                         [("X-Virtstore-Job", job.id), *sink.extra])
        if sink.encoder is not None:
            sink.encoder.finish()
        writer.finish()
        return None

    return Response(200, stream=run)


def job_wait(conn: Connection, req: Request, p: list[str]) -> Response:
    a = bind(BY_NAME["job_wait"], req, p, Body())
    timeout = min(MAX_WAIT if a["timeout"] is None else a["timeout"], MAX_WAIT)
    return json_response(flat(conn.job_wait(a["job_id"], timeout)))


def events(conn: Connection, req: Request, p: list[str]) -> Response:
    if "text/event-stream" in req.headers.get("accept", ""):
        return _event_stream(conn, req)
    a = bind(BY_NAME["events_since"], req, p, Body())
    timeout = min(a["timeout"] or 0.0, MAX_WAIT)
    limit = max(1, min(a["limit"], 10000))
    evs = conn.events_since(a["last_id"], timeout=timeout, limit=limit)
    return json_response([flat(e) for e in evs])


def _event_stream(conn: Connection, req: Request) -> Response:
    start = req.headers.get("last-event-id") or req.query.get("since")
    try:
        last = int(start) if start is not None else -1
    except ValueError:
        raise InvalidArgument("Last-Event-ID / since must be an integer") from None
    if last < 0:
        last = conn.latest_event_id()

    def run(writer: StreamWriter) -> Response | None:
        nonlocal last
        writer.start(200, "text/event-stream", [("Cache-Control", "no-cache")])
        writer.write(b"retry: 2000\n\n")
        while True:
            evs = conn.events_since(last, timeout=EVENT_KEEPALIVE)
            if not evs:
                writer.write(b": keep-alive\n\n")
                continue
            parts = []
            for ev in evs:
                data = json.dumps(flat(ev), separators=(",", ":"))
                parts.append(f"id: {ev.id}\nevent: {ev.kind}\ndata: {data}\n\n")
                last = ev.id
            writer.write("".join(parts).encode())

    return Response(200, stream=run)


class _LazySink:
    """The engine's sink for a download: the response starts with the first byte, and
    names the job (which the engine returns just after starting it)."""

    def __init__(self, writer: StreamWriter, content_type: str) -> None:
        self.writer = writer
        self.content_type = content_type
        self.job_id: str | None = None
        self.extra: list[tuple[str, str]] = []
        self.job_known = threading.Event()
        self.encoder = SparseEncoder(self._send) if content_type == SPARSE else None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not self.writer.started:
            # An engine that copies before returning never sets it: go on without.
            self.job_known.wait(2.0)
            headers = [("X-Virtstore-Job", self.job_id)] if self.job_id else []
            self.writer.start(200, self.content_type, headers + self.extra)
        if self.encoder is not None:
            return self.encoder.write(data)
        return self.writer.write(data)

    def _send(self, data: bytes) -> None:
        if not self.writer.started:
            self.writer.start(200, self.content_type)
        self.writer.write(data)

    def flush(self) -> None:
        pass
