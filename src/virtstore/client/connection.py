"""RemoteConnection: the Connection interface over virtstored's REST API.

Every call is built from its declaration in ``virtstore.api.operations`` by ``_call``:
the path, query and body from the arguments, the result from its kind. Only the data
streams and the long polls (split into requests of at most a minute) are written out.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterable, Iterator
from urllib.parse import urlencode

from virtstore.api import JOB_DONE, Connection, Event, JobInfo, VolumeInfo, VolumePage
from virtstore.api.operations import (
    BODY,
    BY_NAME,
    BYTES,
    EITHER,
    NOTHING,
    QUERY,
    RAW,
    RECORDS,
    XML,
    Op,
)
from virtstore.client.transport import BLOCK, Transport, raise_for
from virtstore.errors import InternalError, InvalidArgument
from virtstore.host.files import Bounded

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing's import is a remote command's to save
    from typing import Any, BinaryIO

SPARSE = "application/vnd.virtstore.sparse"

# The server answers a wait after at most this long; the client asks again.
_WAIT_STEP = 55.0


def _record(cls: type, d: dict[str, Any]) -> Any:
    if cls is Event and d.get("job"):
        d = {**d, "job": JobInfo(**d["job"])}
    elif cls is VolumePage:
        d = {**d, "volumes": [VolumeInfo(**v) for v in d["volumes"]]}
    return cls(**d)


def _wire(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return value


def _request(op: Op, kwargs: dict[str, Any]) -> tuple[str, bytes | None, dict[str, str]]:
    """The path with its query, the body and its type, for a call of ``op``."""
    path = op.url([kwargs[a.name] for a in op.path_args])
    if not op.other_args:
        return path, None, {}
    xml = kwargs.get("xml") if op.xml_body else None
    query: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    body: bytes | None = None
    headers: dict[str, str] = {}
    for arg in op.other_args:
        if arg.fields:
            value: Any = {f.key: kwargs[f.name] for f in arg.fields}
        elif arg.param:
            value = kwargs.get(arg.name, arg.default)
            if value is None or (value == arg.default and not arg.required):
                continue  # the server takes the same default
        else:
            value = arg.default
        if arg.where == RAW:
            body, headers = bytes(value), {"Content-Type": "application/octet-stream"}
        elif arg.where == QUERY or (arg.where == EITHER and xml is not None):
            query[arg.key] = _wire(value)
        elif arg.where in (BODY, EITHER) and not (xml is not None and arg.name == "xml"):
            fields[arg.key] = value
    if xml is not None:
        body, headers = xml.encode("utf-8"), {"Content-Type": "application/xml"}
    elif fields:
        body, headers = json.dumps(fields).encode(), {"Content-Type": "application/json"}
    return path + ("?" + urlencode(query) if query else ""), body, headers


def _remote(name: str) -> Any:
    """The method ``name`` of Connection, as a call of its declared operation."""
    op = BY_NAME[name]
    base = getattr(Connection, name)
    # Read from the code object: inspect.signature for every operation cost each remote
    # command ~20 ms of start-up. help() still shows the signature through __wrapped__.
    code = base.__code__
    names = code.co_varnames[1:code.co_argcount]
    defaults = dict(zip(names[len(names) - len(base.__defaults__ or ()):],
                        base.__defaults__ or (), strict=True))
    defaults.update(base.__kwdefaults__ or {})

    def method(self: RemoteConnection, *args: Any, **kwargs: Any) -> Any:
        kw = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
        if op.pack is not None:  # a record's fields travel one by one
            kw.update(vars(kw.pop(op.pack[0]) or op.pack[1]()))
        return self._call(name, **kw)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = base.__doc__
    method.__wrapped__ = base  # type: ignore[attr-defined]
    return method


class RemoteConnection(Connection):
    """``unix:///path/to/virtstored.sock`` or ``https://host:port`` (token, CA)."""

    def __init__(self, uri: str, *, token: str | None = None, ca: str | None = None,
                 cert: str | None = None, key: str | None = None,
                 timeout: float = 300.0) -> None:
        self.uri = uri
        self.http = Transport(uri, token=token, ca=ca, cert=cert, key=key, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, name: str, /, **kwargs: Any) -> Any:
        """Run the operation ``name`` on the server; its result, decoded by its kind."""
        op = BY_NAME[name]
        path, body, headers = _request(op, kwargs)
        resp = self.http.call(op.method, path, body, headers)
        if op.result == NOTHING:
            return None
        if op.result == XML:
            return resp.body.decode("utf-8")
        if op.result == BYTES:
            return resp.body
        data = resp.json()
        if op.wrap:
            data = data[op.wrap]
        if op.answer[1]:
            return str(data[op.answer[1]])
        if op.record is None:
            return data
        if op.result == RECORDS:
            return [_record(op.record, d) for d in data]
        return _record(op.record, data)

    # Each a call of its declared operation, with the Connection method's signature.
    # -- pools -----------------------------------------------------------------
    list_pools = _remote("list_pools")
    pool_info = _remote("pool_info")
    pool_lookup_by_uuid = _remote("pool_lookup_by_uuid")
    pool_lookup_by_target_path = _remote("pool_lookup_by_target_path")
    pool_define_xml = _remote("pool_define_xml")
    pool_create_xml = _remote("pool_create_xml")
    pool_xml = _remote("pool_xml")
    pool_build = _remote("pool_build")
    pool_start = _remote("pool_start")
    pool_stop = _remote("pool_stop")
    pool_delete = _remote("pool_delete")
    pool_undefine = _remote("pool_undefine")
    pool_refresh = _remote("pool_refresh")
    pool_set_autostart = _remote("pool_set_autostart")
    pool_capabilities_xml = _remote("pool_capabilities_xml")
    pool_type_features = _remote("pool_type_features")
    host_devices = _remote("host_devices")
    find_pool_sources = _remote("find_pool_sources")
    import_libvirt_pools = _remote("import_libvirt_pools")
    # -- volumes ---------------------------------------------------------------
    list_volumes = _remote("list_volumes")
    list_volumes_page = _remote("list_volumes_page")
    volume_info = _remote("volume_info")
    volume_lookup_by_key = _remote("volume_lookup_by_key")
    volume_lookup_by_path = _remote("volume_lookup_by_path")
    volume_xml = _remote("volume_xml")
    volume_create_xml = _remote("volume_create_xml")
    volume_create = _remote("volume_create")
    volume_delete = _remote("volume_delete")
    volume_features = _remote("volume_features")
    volume_device = _remote("volume_device")
    volume_df = _remote("volume_df")
    pool_df = _remote("pool_df")
    volume_inspect = _remote("volume_inspect")
    volume_boot_files = _remote("volume_boot_files")
    volume_backup = _remote("volume_backup")
    volume_restore = _remote("volume_restore")
    volume_import = _remote("volume_import")
    volume_move = _remote("volume_move")
    volume_receive_check = _remote("volume_receive_check")
    volume_chunk_hashes = _remote("volume_chunk_hashes")
    backup_verify = _remote("backup_verify")
    backup_list = _remote("backup_list")
    volume_migrate_info = _remote("volume_migrate_info")
    migrate_target_check = _remote("migrate_target_check")
    cluster_status = _remote("cluster_status")
    volume_lease = _remote("volume_lease")
    volume_unlease = _remote("volume_unlease")
    volume_lease_list = _remote("volume_lease_list")
    pool_overrides = _remote("pool_overrides")
    pool_override = _remote("pool_override")
    # -- secrets ---------------------------------------------------------------
    secret_define_xml = _remote("secret_define_xml")
    list_secrets = _remote("list_secrets")
    secret_info = _remote("secret_info")
    secret_lookup_by_usage = _remote("secret_lookup_by_usage")
    secret_xml = _remote("secret_xml")
    secret_set_value = _remote("secret_set_value")
    secret_get_value = _remote("secret_get_value")
    secret_undefine = _remote("secret_undefine")
    # -- jobs ------------------------------------------------------------------
    list_jobs = _remote("list_jobs")
    job_info = _remote("job_info")
    job_cancel = _remote("job_cancel")
    # -- data operations -------------------------------------------------------
    volume_clone = _remote("volume_clone")
    volume_create_from = _remote("volume_create_from")
    volume_resize = _remote("volume_resize")
    volume_wipe = _remote("volume_wipe")
    # -- snapshots and events --------------------------------------------------
    volume_snapshot_create = _remote("volume_snapshot_create")
    volume_snapshot_list = _remote("volume_snapshot_list")
    volume_snapshot_revert = _remote("volume_snapshot_revert")
    volume_snapshot_delete = _remote("volume_snapshot_delete")
    latest_event_id = _remote("latest_event_id")

    def job_wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = _WAIT_STEP
            if deadline is not None:
                step = max(0.0, min(step, deadline - time.monotonic()))
            info: JobInfo = self._call("job_wait", job_id=job_id, timeout=step)
            if info.finished or (deadline is not None and time.monotonic() >= deadline):
                return info

    def _path(self, op_name: str, /, **kwargs: Any) -> str:
        return _request(BY_NAME[op_name], kwargs)[0]

    def volume_upload(self, pool: str, name: str, source: BinaryIO, *, offset: int = 0,
                      length: int | None = None, sparse: bool = True,
                      bandwidth: int | None = None) -> JobInfo:
        avail = _remaining(source)
        if length is None:
            length = avail
        elif avail is not None and length > avail:
            raise InvalidArgument(f"the source has only {avail} bytes, not {length}")
        headers = {"Content-Type": "application/octet-stream"}
        body: Any = source
        start = 0
        if sparse and avail is not None and length is not None and length <= avail:
            # A regular file: its holes and zero blocks travel as records, not zeros.
            from virtstore.data.monitor import Monitor
            from virtstore.data.stream import encode_sparse

            start = source.tell()
            headers["Content-Type"] = SPARSE
            body = encode_sparse(source.fileno(), start, length, Monitor())
        elif length is not None:
            headers["Content-Length"] = str(length)
            body = Bounded(source, length)
        # else: http.client sends a body of unknown length chunked
        path = self._path("volume_upload", pool=pool, name=name, offset=offset, length=length,
                          sparse=sparse, bandwidth=bandwidth)
        job = JobInfo(**self.http.call("PUT", path, body, headers).json())
        if headers["Content-Type"] == SPARSE and length is not None:
            source.seek(start + length)
        return job

    def volume_receive(self, pool: str, name: str, source: Iterable[tuple[int, bytes]],
                       capacity: int, *, format: str | None = None, like: str | None = None,
                       required: int = 0, bandwidth: int | None = None) -> JobInfo:
        path = self._path("volume_receive", pool=pool, name=name, capacity=capacity,
                          format=format, like=like, required=required, bandwidth=bandwidth)
        try:
            body: Any = _framed(source, capacity)
            resp = self.http.call("PUT", path, body, {"Content-Type": SPARSE})
        except BaseException:
            # Whatever stopped the stream (the source's failure, a cancel) leaves the
            # request cut short: the server sees no end record and keeps nothing.
            self.http._drop()
            raise
        return JobInfo(**resp.json())

    def volume_download(self, pool: str, name: str, sink: BinaryIO, *, offset: int = 0,
                        length: int | None = None, sparse: bool = True,
                        bandwidth: int | None = None) -> JobInfo:
        path = self._path("volume_download", pool=pool, name=name, offset=offset,
                          length=length, bandwidth=bandwidth)
        holes = sparse and _is_regular(sink)
        resp = self.http.open("GET", path, headers={"Accept": SPARSE} if holes else None)
        from http.client import HTTPException  # loaded by the stream's connection already
        if resp.status >= 400:
            data = resp.read()
            raise_for(resp.status, data, resp.reason)
        done = 0
        started = time.time()
        try:
            if resp.getheader("Content-Type", "") == SPARSE:
                from virtstore.data.monitor import Monitor
                from virtstore.data.stream import decode_sparse

                sink.flush()
                pos = sink.tell()
                done = decode_sparse(iter(lambda: resp.read(BLOCK), b""), sink.fileno(), pos,
                                     Monitor())
                sink.seek(pos + done)
                holes = False
            while True:
                chunk = resp.read(BLOCK)
                if not chunk:
                    break
                if holes and chunk.count(0) == len(chunk):
                    sink.seek(len(chunk), os.SEEK_CUR)
                else:
                    sink.write(chunk)
                done += len(chunk)
        except (OSError, HTTPException, InvalidArgument) as exc:
            self.http._drop()
            raise InternalError(f"download of '{name}' interrupted: {exc}") from None
        if holes:
            sink.truncate(sink.tell())
        job_id = resp.getheader("X-Virtstore-Job") or ""
        if job_id:
            with contextlib.suppress(Exception):
                job: JobInfo = self.job_info(job_id)
                return job
        return JobInfo(id=job_id, kind="download", state=JOB_DONE, pool=pool, volume=name,
                       bytes_done=done, bytes_total=done, started=started, ended=time.time())

    def events_since(self, last_id: int = 0, *, timeout: float = 0.0,
                     limit: int = 1000) -> list[Event]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            step = max(0.0, min(_WAIT_STEP, deadline - time.monotonic()))
            got: list[Event] = self._call("events_since", last_id=last_id, timeout=step,
                                          limit=limit)
            if got or last_id < 0 or time.monotonic() >= deadline:
                return got

    def __repr__(self) -> str:
        return f"<RemoteConnection {self.uri}>"


def _framed(pieces: Iterable[tuple[int, bytes]], length: int) -> Iterator[bytes]:
    """(offset, data) pieces in the sparse framing: data records, then the end record."""
    from virtstore.data.stream import DATA, END, MAGIC, RECORD

    yield MAGIC
    for offset, data in pieces:
        yield RECORD.pack(DATA, offset, len(data)) + data
    yield RECORD.pack(END, 0, length)


def _is_regular(f: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode) and f.seekable()
    except (AttributeError, OSError, ValueError):
        return False


def _remaining(f: BinaryIO) -> int | None:
    """Bytes left in a regular file from its position; None for a pipe or a stream."""
    if not _is_regular(f):
        return None
    return max(0, os.fstat(f.fileno()).st_size - f.tell())
