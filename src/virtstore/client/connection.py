"""RemoteConnection: the Connection interface over virtstored's REST API."""

from __future__ import annotations

import http.client
import os
import stat
import time
from typing import Any, BinaryIO
from urllib.parse import urlencode

from virtstore.api import (
    JOB_DONE,
    Connection,
    Event,
    JobInfo,
    PoolFilter,
    PoolInfo,
    SecretInfo,
    SnapshotInfo,
    VolumeCreateArgs,
    VolumeInfo,
)
from virtstore.client.transport import BLOCK, Transport, q, raise_for
from virtstore.errors import InternalError, InvalidArgument

SPARSE = "application/vnd.virtstore.sparse"

# The server answers a wait after at most this long; the client asks again.
_WAIT_STEP = 55.0


def _qs(**params: Any) -> str:
    items = {}
    for k, v in params.items():
        if v is None:
            continue
        items[k] = ("true" if v else "false") if isinstance(v, bool) else v
    return ("?" + urlencode(items)) if items else ""


def _job(d: dict[str, Any]) -> JobInfo:
    return JobInfo(**d)


def _event(d: dict[str, Any]) -> Event:
    job = d.get("job")
    return Event(**{**d, "job": _job(job) if job else None})


class _Limited:
    """At most ``n`` bytes of a file object, for a Content-Length body."""

    def __init__(self, src: BinaryIO, n: int) -> None:
        self.src = src
        self.left = n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        want = self.left if size is None or size < 0 else min(size, self.left)
        data = self.src.read(want)
        self.left -= len(data)
        return data


class RemoteConnection(Connection):
    """``unix:///path/to/virtstored.sock`` or ``https://host:port`` (token, CA)."""

    def __init__(self, uri: str, *, token: str | None = None, ca: str | None = None,
                 cert: str | None = None, key: str | None = None,
                 timeout: float = 300.0) -> None:
        self.uri = uri
        self.http = Transport(uri, token=token, ca=ca, cert=cert, key=key, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    # -- pools -----------------------------------------------------------------
    def list_pools(self, flt: PoolFilter | None = None) -> list[PoolInfo]:
        path = "/v1/pools"
        if flt is not None:
            path += _qs(active=flt.active, persistent=flt.persistent, autostart=flt.autostart,
                        type=",".join(flt.types) or None)
        return [PoolInfo(**d) for d in self.http.get_json(path)]

    def pool_info(self, name: str) -> PoolInfo:
        return PoolInfo(**self.http.get_json(f"/v1/pools/{q(name)}"))

    def pool_lookup_by_uuid(self, uuid: str) -> str:
        return str(self.http.get_json("/v1/pools" + _qs(uuid=uuid))["name"])

    def pool_lookup_by_target_path(self, path: str) -> str:
        return str(self.http.get_json("/v1/pools" + _qs(target_path=path))["name"])

    def pool_define_xml(self, xml: str) -> str:
        return str(self.http.send_xml("POST", "/v1/pools", xml).json()["name"])

    def pool_create_xml(self, xml: str, *, build: bool = False,
                        overwrite: bool | None = None) -> str:
        path = "/v1/pools" + _qs(transient=True, build=build or None, overwrite=overwrite)
        return str(self.http.send_xml("POST", path, xml).json()["name"])

    def pool_xml(self, name: str, *, inactive: bool = False) -> str:
        return self.http.get_text(f"/v1/pools/{q(name)}/xml" + _qs(inactive=inactive or None))

    def _pool_action(self, name: str, action: str, body: dict[str, Any] | None = None) -> None:
        self.http.send_json("POST", f"/v1/pools/{q(name)}/{action}", body)

    def pool_build(self, name: str, *, overwrite: bool | None = None) -> None:
        self._pool_action(name, "build", {"overwrite": overwrite} if overwrite is not None
                          else None)

    def pool_start(self, name: str, *, build: bool = False,
                   overwrite: bool | None = None) -> None:
        body: dict[str, Any] = {}
        if build:
            body["build"] = True
        if overwrite is not None:
            body["overwrite"] = overwrite
        self._pool_action(name, "start", body or None)

    def pool_stop(self, name: str) -> None:
        self._pool_action(name, "stop")

    def pool_delete(self, name: str) -> None:
        self._pool_action(name, "delete")

    def pool_undefine(self, name: str) -> None:
        self.http.call("DELETE", f"/v1/pools/{q(name)}")

    def pool_refresh(self, name: str) -> None:
        self._pool_action(name, "refresh")

    def pool_set_autostart(self, name: str, autostart: bool) -> None:
        self._pool_action(name, "autostart", {"autostart": autostart})

    def pool_capabilities_xml(self) -> str:
        return self.http.get_text("/v1/capabilities")

    def pool_type_features(self) -> list[dict[str, Any]]:
        features: list[dict[str, Any]] = self.http.get_json("/v1/pool-types")
        return features

    def volume_features(self, pool: str, name: str) -> dict[str, bool]:
        found: dict[str, bool] = self.http.get_json(
            f"/v1/pools/{q(pool)}/volumes/{q(name)}/features")
        return found

    def volume_device(self, pool: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.http.get_json(f"/v1/pools/{q(pool)}/volumes/{q(name)}/device")
        return found

    def host_devices(self) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self.http.get_json("/v1/host/devices")
        return devices

    def find_pool_sources(self, pool_type: str, source_xml: str | None = None) -> str:
        return self.http.get_text("/v1/pool-sources" + _qs(type=pool_type, source=source_xml))

    def import_libvirt_pools(self, config_dir: str = "/etc/libvirt/storage") -> list[str]:
        got = self.http.send_json("POST", "/v1/import-libvirt", {"config_dir": config_dir})
        return [str(n) for n in got.json()["imported"]]

    # -- volumes ---------------------------------------------------------------
    def list_volumes(self, pool: str) -> list[VolumeInfo]:
        return [VolumeInfo(**d) for d in self.http.get_json(f"/v1/pools/{q(pool)}/volumes")]

    def volume_info(self, pool: str, name: str) -> VolumeInfo:
        return VolumeInfo(**self.http.get_json(f"/v1/pools/{q(pool)}/volumes/{q(name)}"))

    def volume_lookup_by_key(self, key: str) -> VolumeInfo:
        return VolumeInfo(**self.http.get_json("/v1/volumes" + _qs(key=key)))

    def volume_lookup_by_path(self, path: str) -> VolumeInfo:
        return VolumeInfo(**self.http.get_json("/v1/volumes" + _qs(path=path)))

    def volume_xml(self, pool: str, name: str) -> str:
        return self.http.get_text(f"/v1/pools/{q(pool)}/volumes/{q(name)}/xml")

    def volume_create_xml(self, pool: str, xml: str, *, prealloc_metadata: bool = False) -> str:
        path = f"/v1/pools/{q(pool)}/volumes" + _qs(prealloc_metadata=prealloc_metadata or None)
        return str(self.http.send_xml("POST", path, xml).json()["name"])

    def volume_create(self, pool: str, args: VolumeCreateArgs) -> str:
        body = {k: v for k, v in args.__dict__.items() if v is not None}
        got = self.http.send_json("POST", f"/v1/pools/{q(pool)}/volumes", body)
        return str(got.json()["name"])

    def volume_delete(self, pool: str, name: str) -> None:
        self.http.call("DELETE", f"/v1/pools/{q(pool)}/volumes/{q(name)}")

    # -- secrets ---------------------------------------------------------------
    def secret_define_xml(self, xml: str) -> str:
        return str(self.http.send_xml("POST", "/v1/secrets", xml).json()["uuid"])

    def list_secrets(self) -> list[SecretInfo]:
        return [SecretInfo(**d) for d in self.http.get_json("/v1/secrets")]

    def secret_info(self, uuid: str) -> SecretInfo:
        return SecretInfo(**self.http.get_json(f"/v1/secrets/{q(uuid)}"))

    def secret_lookup_by_usage(self, usage_type: str, usage_id: str) -> str:
        got = self.http.get_json("/v1/secrets" + _qs(usage_type=usage_type, usage_id=usage_id))
        return str(got["uuid"])

    def secret_xml(self, uuid: str) -> str:
        return self.http.get_text(f"/v1/secrets/{q(uuid)}/xml")

    def secret_set_value(self, uuid: str, value: bytes) -> None:
        self.http.call("PUT", f"/v1/secrets/{q(uuid)}/value", bytes(value),
                       {"Content-Type": "application/octet-stream"})

    def secret_get_value(self, uuid: str) -> bytes:
        return self.http.call("GET", f"/v1/secrets/{q(uuid)}/value").body

    def secret_undefine(self, uuid: str) -> None:
        self.http.call("DELETE", f"/v1/secrets/{q(uuid)}")

    # -- jobs ------------------------------------------------------------------
    def list_jobs(self, *, include_finished: bool = True) -> list[JobInfo]:
        path = "/v1/jobs" + _qs(include_finished=include_finished)
        return [_job(d) for d in self.http.get_json(path)]

    def job_info(self, job_id: str) -> JobInfo:
        return _job(self.http.get_json(f"/v1/jobs/{q(job_id)}"))

    def job_wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = _WAIT_STEP
            if deadline is not None:
                step = max(0.0, min(step, deadline - time.monotonic()))
            info = _job(self.http.get_json(f"/v1/jobs/{q(job_id)}/wait" + _qs(timeout=step)))
            if info.finished or (deadline is not None and time.monotonic() >= deadline):
                return info

    def job_cancel(self, job_id: str) -> None:
        self.http.call("DELETE", f"/v1/jobs/{q(job_id)}")

    # -- data operations -------------------------------------------------------
    def _vol(self, pool: str, name: str) -> str:
        return f"/v1/pools/{q(pool)}/volumes/{q(name)}"

    def volume_clone(self, pool: str, name: str, new_name: str, *,
                     target_pool: str | None = None, format: str | None = None,
                     reflink: bool = False, linked: bool = False,
                     prealloc_metadata: bool = False,
                     bandwidth: int | None = None) -> JobInfo:
        body = {"new_name": new_name, "target_pool": target_pool, "format": format,
                "reflink": reflink, "linked": linked, "prealloc_metadata": prealloc_metadata,
                "bandwidth": bandwidth}
        return _job(self.http.send_json("POST", self._vol(pool, name) + "/clone", body).json())

    def volume_create_from(self, pool: str, xml: str, src_pool: str, src_name: str, *,
                           reflink: bool = False, prealloc_metadata: bool = False,
                           bandwidth: int | None = None) -> JobInfo:
        body = {"xml": xml, "source": {"pool": src_pool, "name": src_name},
                "reflink": reflink, "prealloc_metadata": prealloc_metadata,
                "bandwidth": bandwidth}
        return _job(self.http.send_json("POST", f"/v1/pools/{q(pool)}/volumes", body).json())

    def volume_resize(self, pool: str, name: str, capacity: int, *, delta: bool = False,
                      shrink: bool = False, allocate: bool = False) -> JobInfo:
        body = {"capacity": capacity, "delta": delta, "shrink": shrink, "allocate": allocate}
        return _job(self.http.send_json("POST", self._vol(pool, name) + "/resize",
                                        body).json())

    def volume_wipe(self, pool: str, name: str, algorithm: str = "zero", *,
                    bandwidth: int | None = None) -> JobInfo:
        body = {"algorithm": algorithm, "bandwidth": bandwidth}
        return _job(self.http.send_json("POST", self._vol(pool, name) + "/wipe", body).json())

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
            body = _Limited(source, length)
        # else: http.client sends a body of unknown length chunked
        path = self._vol(pool, name) + "/upload" + _qs(offset=offset or None, length=length,
                                                       sparse=sparse, bandwidth=bandwidth)
        job = _job(self.http.call("PUT", path, body, headers).json())
        if headers["Content-Type"] == SPARSE and length is not None:
            source.seek(start + length)
        return job

    def volume_download(self, pool: str, name: str, sink: BinaryIO, *, offset: int = 0,
                        length: int | None = None, sparse: bool = True,
                        bandwidth: int | None = None) -> JobInfo:
        path = self._vol(pool, name) + "/download" + _qs(offset=offset or None, length=length,
                                                         bandwidth=bandwidth)
        holes = sparse and _is_regular(sink)
        resp = self.http.open("GET", path, headers={"Accept": SPARSE} if holes else None)
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
        except (OSError, http.client.HTTPException, InvalidArgument) as exc:
            self.http._drop()
            raise InternalError(f"download of '{name}' interrupted: {exc}") from None
        if holes:
            sink.truncate(sink.tell())
        job_id = resp.getheader("X-Virtstore-Job") or ""
        if job_id:
            try:
                return self.job_info(job_id)
            except Exception:
                pass
        return JobInfo(id=job_id, kind="download", state=JOB_DONE, pool=pool, volume=name,
                       bytes_done=done, bytes_total=done, started=started, ended=time.time())

    # -- snapshots -------------------------------------------------------------
    def volume_snapshot_create(self, pool: str, name: str, snapshot: str, *,
                               external: bool = False) -> SnapshotInfo:
        got = self.http.send_json("POST", self._vol(pool, name) + "/snapshots",
                                  {"name": snapshot, "external": external})
        return SnapshotInfo(**got.json())

    def volume_snapshot_list(self, pool: str, name: str) -> list[SnapshotInfo]:
        return [SnapshotInfo(**d)
                for d in self.http.get_json(self._vol(pool, name) + "/snapshots")]

    def volume_snapshot_revert(self, pool: str, name: str, snapshot: str) -> None:
        self.http.send_json("POST", self._vol(pool, name) + f"/snapshots/{q(snapshot)}/revert")

    def volume_snapshot_delete(self, pool: str, name: str, snapshot: str) -> None:
        self.http.call("DELETE", self._vol(pool, name) + f"/snapshots/{q(snapshot)}")

    # -- events ----------------------------------------------------------------
    def events_since(self, last_id: int = 0, *, timeout: float = 0.0,
                     limit: int = 1000) -> list[Event]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            step = max(0.0, min(_WAIT_STEP, deadline - time.monotonic()))
            got = self.http.get_json("/v1/events" + _qs(since=last_id, timeout=step,
                                                        limit=limit))
            if got or last_id < 0 or time.monotonic() >= deadline:
                return [_event(d) for d in got]

    def latest_event_id(self) -> int:
        return int(self.http.get_json("/v1/events/latest")["id"])

    def __repr__(self) -> str:
        return f"<RemoteConnection {self.uri}>"


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
