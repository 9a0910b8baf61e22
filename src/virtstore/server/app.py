"""The REST resources of virtstored: each request becomes one Connection call.

Every route declares its access: ``read`` (allowed on the read-only socket and with a
read-only token), ``write`` (a change: read-write only, audited) or ``secret`` (a read
that discloses data, a secret's value or a volume's bytes: read-write only, audited, as
libvirt refuses them on a read-only connection). Names taken from the URL go to the
engine as they are, after percent-decoding; the engine checks them, the server never
makes a path out of one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from virtstore.api import (
    Connection,
    Event,
    JobInfo,
    PoolFilter,
    VolumeCreateArgs,
)
from virtstore.errors import Forbidden, InvalidArgument, NoSuchVolume, VirtstoreError
from virtstore.server.auth import Authenticator
from virtstore.server.http import (
    ClientGone,
    HTTPError,
    Request,
    Response,
    StreamWriter,
    error_response,
)
from virtstore.server.sparse import SPARSE, SparseDecoder, SparseEncoder

log = logging.getLogger("virtstored")
audit = logging.getLogger("virtstored.audit")

# Bodies other than volume data: definitions, JSON arguments, secret values.
MAX_BODY = 1024 * 1024
# Longest a single request blocks waiting for a job or an event; clients loop.
MAX_WAIT = 60.0
EVENT_KEEPALIVE = 15.0
# Largest integer argument: sizes and offsets end up in off_t and SQLite's INTEGER.
MAX_INT = 2**63 - 1

JSON = "application/json"
XML = "application/xml"
OCTETS = "application/octet-stream"

Handler = Callable[["App", Request, list[str]], Response]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # with {names}, as the OpenAPI document shows it
    pattern: tuple[str | None, ...]  # None: a name taken from the URL
    handler: Handler
    access: str  # read, write, secret
    summary: str


ROUTES: list[Route] = []


def route(method: str, path: str, access: str = "read",
          summary: str = "") -> Callable[[Handler], Handler]:
    pattern = tuple(None if seg.startswith("{") else seg for seg in path.strip("/").split("/"))

    def deco(fn: Handler) -> Handler:
        ROUTES.append(Route(method, path, pattern, fn, access,
                            summary or (fn.__doc__ or "").strip()))
        return fn

    return deco


# One encoder for every answer: json.dumps with separators builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, _ENCODER.encode(value).encode())


def _xml(text: str) -> Response:
    return Response(200, text.encode("utf-8"), XML)


def _flat(obj: Any) -> dict[str, Any]:
    """A flat dataclass as a dict, without asdict's deep copy (it is on every lookup)."""
    return dict(obj.__dict__)


def _job(job: JobInfo) -> dict[str, Any]:
    return _flat(job)


def _event(ev: Event) -> dict[str, Any]:
    d = _flat(ev)
    if ev.job is not None:
        d["job"] = _flat(ev.job)
    return d


# -- arguments ------------------------------------------------------------------------


def _qbool(req: Request, key: str, default: bool | None = None) -> bool | None:
    raw = req.query.get(key)
    if raw is None:
        return default
    low = raw.lower()
    if low in ("1", "true", "yes", "on", ""):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"query parameter '{key}' must be true or false, not '{raw}'")


def _qint(req: Request, key: str, default: int | None = None) -> int | None:
    raw = req.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"query parameter '{key}' must be an integer, "
                              f"not '{raw}'") from None
    if value < 0:
        raise InvalidArgument(f"query parameter '{key}' must not be negative")
    if value > MAX_INT:
        raise InvalidArgument(f"query parameter '{key}' must be at most {MAX_INT}")
    return value


def _qfloat(req: Request, key: str, default: float) -> float:
    raw = req.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"query parameter '{key}' must be a number, not '{raw}'") from None
    if not value >= 0:  # also refuses NaN
        raise InvalidArgument(f"query parameter '{key}' must not be negative")
    return value


def _range(req: Request, default_length: int | None = None) -> tuple[int, int | None]:
    """``offset`` and ``length`` of an upload or download; their end must be a file offset."""
    offset = _qint(req, "offset", 0) or 0
    length = _qint(req, "length", default_length)
    if offset + (length or 0) > MAX_INT:
        raise InvalidArgument(f"offset + length must be at most {MAX_INT}")
    return offset, length


class Args:
    """A JSON object body, read field by field with type checks; unknown fields refused."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.used: set[str] = set()

    def _get(self, key: str, types: tuple[type, ...], what: str) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in types:
            raise InvalidArgument(f"field '{key}' must be {what}")
        if not isinstance(value, types):
            raise InvalidArgument(f"field '{key}' must be {what}")
        return value

    def text(self, key: str, default: str | None = None) -> str | None:
        v = self._get(key, (str,), "a string")
        return default if v is None else str(v)

    def req_text(self, key: str) -> str:
        v = self.text(key)
        if v is None:
            raise InvalidArgument(f"field '{key}' is required")
        return v

    def flag(self, key: str, default: bool = False) -> bool:
        v = self._get(key, (bool,), "true or false")
        return default if v is None else bool(v)

    def opt_flag(self, key: str) -> bool | None:
        v = self._get(key, (bool,), "true or false")
        return None if v is None else bool(v)

    def num(self, key: str, default: int | None = None) -> int | None:
        v = self._get(key, (int,), "an integer")
        if v is None:
            return default
        if v < 0:
            raise InvalidArgument(f"field '{key}' must not be negative")
        if v > MAX_INT:
            raise InvalidArgument(f"field '{key}' must be at most {MAX_INT}")
        return int(v)

    def req_num(self, key: str) -> int:
        v = self.num(key)
        if v is None:
            raise InvalidArgument(f"field '{key}' is required")
        return v

    def obj(self, key: str) -> Args | None:
        v = self._get(key, (dict,), "an object")
        return None if v is None else Args(v)

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise InvalidArgument(f"unknown field '{extra[0]}'")


def _body_json(req: Request, *, required: bool = True) -> Args:
    body = req.body(MAX_BODY)
    ctype = req.content_type
    if not body.strip():
        if required:
            raise InvalidArgument("a JSON object is required in the request body")
        return Args({})
    if ctype not in ("", JSON):
        raise HTTPError(415, "invalid-argument", f"expected {JSON}, not '{ctype}'")
    try:
        data = json.loads(body)
        # JSON's \u escapes can spell a lone surrogate, which is no character: nothing
        # downstream (SQLite, file names, XML) could store it.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("malformed JSON: a string holds a lone surrogate "
                              "(not a Unicode character)") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return Args(data)


def _text(body: bytes, what: str) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8") from None


def _body_xml_or_json(req: Request) -> tuple[str | None, Args]:
    """An XML body, or a JSON object (which may carry the XML in ``xml``)."""
    if req.content_type in (XML, "text/xml"):
        body = req.body(MAX_BODY)
        if not body.strip():
            raise InvalidArgument("an XML document is required in the request body")
        return _text(body, "the XML document"), Args({})
    args = _body_json(req)
    return args.text("xml"), args


def _require_xml(req: Request) -> str:
    xml, args = _body_xml_or_json(req)
    args.done()
    if xml is None:
        raise InvalidArgument("an XML document is required (application/xml, or JSON "
                              "with an 'xml' field)")
    return xml


# -- the application -------------------------------------------------------------------


class App:
    def __init__(self, conn: Connection, auth: Authenticator,
                 openapi: Callable[[], bytes] | None = None, *,
                 remote_pool_roots: Sequence[str] = ()) -> None:
        self.conn = conn
        self.auth = auth
        self._openapi = openapi
        self.remote_pool_roots = tuple(remote_pool_roots)
        # Routes bucketed by (number of segments, second segment) for a short scan.
        self._table: dict[tuple[int, str | None], list[Route]] = {}
        for r in ROUTES:
            self._table.setdefault((len(r.pattern), r.pattern[1] if len(r.pattern) > 1
                                    else None), []).append(r)

    def _match(self, req: Request) -> tuple[Route, list[str]]:
        segs = req.segments
        cands = self._table.get((len(segs), segs[1] if len(segs) > 1 else None), ())
        allowed: list[str] = []
        for r in cands:
            params: list[str] = []
            for pat, seg in zip(r.pattern, segs, strict=True):
                if pat is None:
                    params.append(seg)
                elif pat != seg:
                    break
            else:
                if r.method == req.method or (req.method == "HEAD" and r.method == "GET"):
                    return r, params
                allowed.append(r.method)
        if allowed:
            raise HTTPError(405, "invalid-argument",
                            f"method {req.method} not allowed here",
                            headers=(("Allow", ", ".join(sorted(set(allowed)))),))
        raise HTTPError(404, "not-found", f"no such resource '{req.raw_path}'")

    def __call__(self, req: Request) -> Response:
        route_: Route | None = None
        try:
            role = self.auth.authenticate(req)
            route_, params = self._match(req)
            if route_.access != "read" and role != "rw":
                raise HTTPError(403, "forbidden", "read-only access: "
                                f"{req.method} {req.raw_path} is not allowed")
            resp = route_.handler(self, req, params)
        except HTTPError as err:
            resp = error_response(err)
        except VirtstoreError as err:
            resp = error_response(HTTPError(err.http_status, err.code, str(err)))
        except (ClientGone, RecursionError):
            raise
        except Exception as exc:
            log.exception("%s %s failed", req.method, req.raw_path)
            resp = error_response(HTTPError(500, "internal-error",
                                            f"internal error: {type(exc).__name__}: {exc}"))
        if (route_ is not None and route_.access != "read") or resp.status == 403:
            self._audit(req, resp)
        return resp

    def _audit(self, req: Request, resp: Response) -> None:
        code = ""
        if resp.status >= 400 and resp.body:
            try:
                code = " " + str(json.loads(resp.body)["error"]["code"])
            except (ValueError, KeyError, TypeError):
                pass
        result = "streaming" if resp.stream is not None else f"{resp.status}{code}"
        audit.info("who=%s op=%s %s result=%s", req.who or "?", req.method, req.raw_path,
                   result)

    # -- misc ------------------------------------------------------------------------
    @route("GET", "/openapi.json", summary="This API's OpenAPI 3 document")
    def openapi(self, req: Request, p: list[str]) -> Response:
        if self._openapi is None:
            raise HTTPError(404, "not-found", "no OpenAPI document")
        return Response(200, self._openapi(), JSON)

    @route("GET", "/v1/version", summary="Server version and connection URI")
    def version(self, req: Request, p: list[str]) -> Response:
        from virtstore import __version__

        return _json({"version": __version__, "api": 1, "role": self.auth.role_of(req)})

    @route("GET", "/v1/capabilities", summary="Pool capabilities (libvirt's XML)")
    def capabilities(self, req: Request, p: list[str]) -> Response:
        return _xml(self.conn.pool_capabilities_xml())

    @route("GET", "/v1/pool-types", summary="Per pool type: what works on this host")
    def pool_types(self, req: Request, p: list[str]) -> Response:
        return _json(self.conn.pool_type_features())

    @route("GET", "/v1/host/devices", summary="The host's block devices")
    def host_devices(self, req: Request, p: list[str]) -> Response:
        return _json(self.conn.host_devices())

    @route("GET", "/v1/pool-sources", summary="Storage pool sources found on the host "
           "(libvirt's <sources> XML); query: type, source (a <source> XML hint)")
    def pool_sources(self, req: Request, p: list[str]) -> Response:
        ptype = req.query.get("type")
        if not ptype:
            raise InvalidArgument("missing query parameter 'type'")
        return _xml(self.conn.find_pool_sources(ptype, req.query.get("source")))

    def _confine_remote(self, req: Request, xml: str) -> None:
        """A remote caller names host directories only under the configured roots."""
        if req.peer.listener != "tcp":
            return
        from virtstore.engine.confine import check_remote_target
        from virtstore.xml.pool import parse_pool_xml

        check_remote_target(parse_pool_xml(xml), self.remote_pool_roots)

    @route("POST", "/v1/import-libvirt", "write",
           summary="Define the pools found in libvirt's configuration directory")
    def import_libvirt(self, req: Request, p: list[str]) -> Response:
        if req.peer.listener == "tcp":
            # It reads definitions from a host directory the caller names.
            raise Forbidden("importing libvirt's pools is for local callers only")
        args = _body_json(req, required=False)
        config_dir = args.text("config_dir", "/etc/libvirt/storage")
        args.done()
        assert config_dir is not None
        return _json({"imported": self.conn.import_libvirt_pools(config_dir)})

    # -- pools -----------------------------------------------------------------------
    @route("GET", "/v1/pools",
           summary="List pools (filters active, persistent, autostart, type), or look one "
                   "up by uuid or target_path")
    def pools(self, req: Request, p: list[str]) -> Response:
        q = req.query
        if "uuid" in q:
            return _json(_flat(self.conn.pool_info(self.conn.pool_lookup_by_uuid(q["uuid"]))))
        if "target_path" in q:
            name = self.conn.pool_lookup_by_target_path(q["target_path"])
            return _json(_flat(self.conn.pool_info(name)))
        types = tuple(t for t in q.get("type", "").split(",") if t)
        flt = PoolFilter(active=_qbool(req, "active"), persistent=_qbool(req, "persistent"),
                         autostart=_qbool(req, "autostart"), types=types)
        return _json([_flat(i) for i in self.conn.list_pools(flt)])

    @route("POST", "/v1/pools", "write",
           summary="Define a pool from XML (or create a transient one with transient=true)")
    def pools_post(self, req: Request, p: list[str]) -> Response:
        xml, args = _body_xml_or_json(req)
        transient = args.opt_flag("transient")
        build = args.opt_flag("build")
        overwrite = args.opt_flag("overwrite")
        args.done()
        if xml is None:
            raise InvalidArgument("an XML document is required")
        if transient is None:
            transient = bool(_qbool(req, "transient", False))
        if build is None:
            build = bool(_qbool(req, "build", False))
        if overwrite is None:
            overwrite = _qbool(req, "overwrite")
        self._confine_remote(req, xml)
        if transient:
            name = self.conn.pool_create_xml(xml, build=build, overwrite=overwrite)
        else:
            if build or overwrite is not None:
                raise InvalidArgument("build and overwrite apply to transient pools only")
            name = self.conn.pool_define_xml(xml)
        resp = _json(_flat(self.conn.pool_info(name)), 201)
        resp.headers.append(("Location", f"/v1/pools/{_q(name)}"))
        return resp

    @route("GET", "/v1/pools/{pool}", summary="A pool's state and sizes")
    def pool_get(self, req: Request, p: list[str]) -> Response:
        return _json(_flat(self.conn.pool_info(p[0])))

    @route("PUT", "/v1/pools/{pool}", "write",
           summary="Define (or redefine) the pool from XML; the name must match")
    def pool_put(self, req: Request, p: list[str]) -> Response:
        xml = _require_xml(req)
        from virtstore.xml.pool import parse_pool_xml

        name = parse_pool_xml(xml).name
        if name != p[0]:
            raise InvalidArgument(f"the XML defines pool '{name}', not '{p[0]}'")
        self._confine_remote(req, xml)
        self.conn.pool_define_xml(xml)
        return _json(_flat(self.conn.pool_info(name)))

    @route("DELETE", "/v1/pools/{pool}", "write", summary="Undefine the pool")
    def pool_undefine(self, req: Request, p: list[str]) -> Response:
        self.conn.pool_undefine(p[0])
        return Response(204)

    @route("GET", "/v1/pools/{pool}/xml", summary="The pool's XML (inactive=true: as defined)")
    def pool_xml(self, req: Request, p: list[str]) -> Response:
        return _xml(self.conn.pool_xml(p[0], inactive=bool(_qbool(req, "inactive", False))))

    @route("POST", "/v1/pools/{pool}/start", "write", summary="Start the pool")
    def pool_start(self, req: Request, p: list[str]) -> Response:
        args = _body_json(req, required=False)
        build, overwrite = args.flag("build"), args.opt_flag("overwrite")
        args.done()
        self.conn.pool_start(p[0], build=build, overwrite=overwrite)
        return Response(204)

    @route("POST", "/v1/pools/{pool}/stop", "write",
           summary="Stop the pool (a transient pool disappears)")
    def pool_stop(self, req: Request, p: list[str]) -> Response:
        _body_json(req, required=False).done()
        self.conn.pool_stop(p[0])
        return Response(204)

    @route("POST", "/v1/pools/{pool}/build", "write", summary="Build the pool's storage")
    def pool_build(self, req: Request, p: list[str]) -> Response:
        args = _body_json(req, required=False)
        overwrite = args.opt_flag("overwrite")
        args.done()
        self.conn.pool_build(p[0], overwrite=overwrite)
        return Response(204)

    @route("POST", "/v1/pools/{pool}/delete", "write", summary="Delete the pool's storage")
    def pool_delete(self, req: Request, p: list[str]) -> Response:
        _body_json(req, required=False).done()
        self.conn.pool_delete(p[0])
        return Response(204)

    @route("POST", "/v1/pools/{pool}/refresh", "write", summary="Rescan the pool's volumes")
    def pool_refresh(self, req: Request, p: list[str]) -> Response:
        _body_json(req, required=False).done()
        self.conn.pool_refresh(p[0])
        return Response(204)

    @route("POST", "/v1/pools/{pool}/autostart", "write",
           summary="Set autostart ({\"autostart\": true|false})")
    def pool_autostart(self, req: Request, p: list[str]) -> Response:
        args = _body_json(req)
        on = args.opt_flag("autostart")
        args.done()
        if on is None:
            raise InvalidArgument("field 'autostart' is required")
        self.conn.pool_set_autostart(p[0], on)
        return Response(204)

    # -- volumes -----------------------------------------------------------------------
    @route("GET", "/v1/volumes", summary="Look a volume up by key or path")
    def volume_lookup(self, req: Request, p: list[str]) -> Response:
        if "key" in req.query:
            return _json(_flat(self.conn.volume_lookup_by_key(req.query["key"])))
        if "path" in req.query:
            return _json(_flat(self.conn.volume_lookup_by_path(req.query["path"])))
        raise InvalidArgument("query parameter 'key' or 'path' is required")

    @route("GET", "/v1/pools/{pool}/volumes", summary="The pool's volumes, in name order")
    def volumes(self, req: Request, p: list[str]) -> Response:
        return _json([_flat(v) for v in self.conn.list_volumes(p[0])])

    @route("POST", "/v1/pools/{pool}/volumes", "write",
           summary="Create a volume: from XML, from arguments, or (with source) filled "
                   "from another volume as a job")
    def volume_create(self, req: Request, p: list[str]) -> Response:
        pool = p[0]
        xml, args = _body_xml_or_json(req)
        prealloc = args.opt_flag("prealloc_metadata")
        if prealloc is None:
            prealloc = bool(_qbool(req, "prealloc_metadata", False))
        source = args.obj("source")
        if source is not None:
            src_pool, src_name = source.req_text("pool"), source.req_text("name")
            source.done()
            reflink = args.flag("reflink")
            bandwidth = args.num("bandwidth")
            args.done()
            if xml is None:
                raise InvalidArgument("field 'xml' is required with 'source'")
            job = self.conn.volume_create_from(pool, xml, src_pool, src_name, reflink=reflink,
                                               prealloc_metadata=prealloc,
                                               bandwidth=bandwidth)
            return _job_accepted(job)
        if xml is not None:
            args.done()
            name = self.conn.volume_create_xml(pool, xml, prealloc_metadata=prealloc)
        else:
            cargs = VolumeCreateArgs(
                name=args.req_text("name"), capacity=args.req_num("capacity"),
                allocation=args.num("allocation"), format=args.text("format"),
                backing_vol=args.text("backing_vol"),
                backing_vol_format=args.text("backing_vol_format"),
                prealloc_metadata=prealloc)
            args.done()
            name = self.conn.volume_create(pool, cargs)
        try:
            body: Any = _flat(self.conn.volume_info(pool, name))
        except NoSuchVolume:
            # Made, then deleted by another client before this answer: still a success.
            body = {"pool": pool, "name": name}
        resp = _json(body, 201)
        resp.headers.append(("Location", f"/v1/pools/{_q(pool)}/volumes/{_q(name)}"))
        return resp

    @route("GET", "/v1/pools/{pool}/volumes/{volume}", summary="A volume's type and sizes")
    def volume_get(self, req: Request, p: list[str]) -> Response:
        return _json(_flat(self.conn.volume_info(p[0], p[1])))

    @route("DELETE", "/v1/pools/{pool}/volumes/{volume}", "write", summary="Delete the volume")
    def volume_delete(self, req: Request, p: list[str]) -> Response:
        self.conn.volume_delete(p[0], p[1])
        return Response(204)

    @route("GET", "/v1/pools/{pool}/volumes/{volume}/xml", summary="The volume's XML")
    def volume_xml(self, req: Request, p: list[str]) -> Response:
        return _xml(self.conn.volume_xml(p[0], p[1]))

    @route("GET", "/v1/pools/{pool}/volumes/{volume}/features",
           summary="Per feature, whether this volume offers it now")
    def volume_features(self, req: Request, p: list[str]) -> Response:
        return _json(self.conn.volume_features(p[0], p[1]))

    @route("GET", "/v1/pools/{pool}/volumes/{volume}/device",
           summary="A LUN volume's SCSI identity (vendor, product, revision, serial)")
    def volume_device(self, req: Request, p: list[str]) -> Response:
        return _json(self.conn.volume_device(p[0], p[1]))

    @route("POST", "/v1/pools/{pool}/volumes/{volume}/clone", "write",
           summary="Clone the volume (a job)")
    def volume_clone(self, req: Request, p: list[str]) -> Response:
        args = _body_json(req)
        job = self.conn.volume_clone(
            p[0], p[1], args.req_text("new_name"), target_pool=args.text("target_pool"),
            format=args.text("format"), reflink=args.flag("reflink"), linked=args.flag("linked"),
            prealloc_metadata=args.flag("prealloc_metadata"), bandwidth=args.num("bandwidth"))
        args.done()
        return _job_accepted(job)

    @route("POST", "/v1/pools/{pool}/volumes/{volume}/resize", "write",
           summary="Resize the volume (a job)")
    def volume_resize(self, req: Request, p: list[str]) -> Response:
        args = _body_json(req)
        capacity = args.req_num("capacity")
        delta, shrink, allocate = args.flag("delta"), args.flag("shrink"), args.flag("allocate")
        args.done()
        job = self.conn.volume_resize(p[0], p[1], capacity, delta=delta, shrink=shrink,
                                      allocate=allocate)
        return _job_accepted(job)

    @route("POST", "/v1/pools/{pool}/volumes/{volume}/wipe", "write",
           summary="Wipe the volume (a job)")
    def volume_wipe(self, req: Request, p: list[str]) -> Response:
        args = _body_json(req, required=False)
        algorithm = args.text("algorithm", "zero")
        bandwidth = args.num("bandwidth")
        args.done()
        assert algorithm is not None
        return _job_accepted(self.conn.volume_wipe(p[0], p[1], algorithm, bandwidth=bandwidth))

    @route("PUT", "/v1/pools/{pool}/volumes/{volume}/upload", "write",
           summary="Write the request body into the volume (at offset); answers when done")
    def volume_upload(self, req: Request, p: list[str]) -> Response:
        cl = req.headers.get("content-length")
        offset, length = _range(req, int(cl) if cl is not None and cl.isdigit() else None)
        bandwidth = _qint(req, "bandwidth")
        sparse = bool(_qbool(req, "sparse", True))
        source: Any = req.stream()
        if req.content_type == SPARSE:
            # The framing's length is not the volume's: the end record says how much.
            source = SparseDecoder(source)
            length = _qint(req, "length")
            sparse = True
        job = self.conn.volume_upload(p[0], p[1], source, offset=offset, length=length,
                                      sparse=sparse, bandwidth=bandwidth)
        if not job.finished:
            job = self.conn.job_wait(job.id)
        return _job_final(job)

    @route("GET", "/v1/pools/{pool}/volumes/{volume}/download", "secret",
           summary="The volume's bytes (from offset, length bytes)")
    def volume_download(self, req: Request, p: list[str]) -> Response:
        offset, length = _range(req)
        bandwidth = _qint(req, "bandwidth")
        pool, name = p
        conn = self.conn
        framed = SPARSE in req.headers.get("accept", "")

        def run(writer: StreamWriter) -> Response | None:
            sink = _LazySink(writer, SPARSE if framed else OCTETS)
            try:
                try:
                    job = conn.volume_download(pool, name, sink,  # type: ignore[arg-type]
                                               offset=offset, length=length, sparse=False,
                                               bandwidth=bandwidth)
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
                return _job_final(job)
            if not writer.started:
                writer.start(200, SPARSE if framed else OCTETS, [("X-Virtstore-Job", job.id)])
            if sink.encoder is not None:
                sink.encoder.finish()
            writer.finish()
            return None

        return Response(200, stream=run)

    @route("GET", "/v1/pools/{pool}/volumes/{volume}/snapshots",
           summary="The volume's storage snapshots")
    def snapshots(self, req: Request, p: list[str]) -> Response:
        return _json([_flat(s) for s in self.conn.volume_snapshot_list(p[0], p[1])])

    @route("POST", "/v1/pools/{pool}/volumes/{volume}/snapshots", "write",
           summary="Take a storage snapshot ({\"name\": ..., \"external\": false})")
    def snapshot_create(self, req: Request, p: list[str]) -> Response:
        args = _body_json(req)
        name, external = args.req_text("name"), args.flag("external")
        args.done()
        return _json(_flat(self.conn.volume_snapshot_create(p[0], p[1], name,
                                                            external=external)), 201)

    @route("POST", "/v1/pools/{pool}/volumes/{volume}/snapshots/{snapshot}/revert", "write",
           summary="Revert the volume to the snapshot")
    def snapshot_revert(self, req: Request, p: list[str]) -> Response:
        _body_json(req, required=False).done()
        self.conn.volume_snapshot_revert(p[0], p[1], p[2])
        return Response(204)

    @route("DELETE", "/v1/pools/{pool}/volumes/{volume}/snapshots/{snapshot}", "write",
           summary="Delete the snapshot")
    def snapshot_delete(self, req: Request, p: list[str]) -> Response:
        self.conn.volume_snapshot_delete(p[0], p[1], p[2])
        return Response(204)

    # -- secrets -----------------------------------------------------------------------
    @route("GET", "/v1/secrets",
           summary="List secrets, or look one up by usage_type and usage_id")
    def secrets(self, req: Request, p: list[str]) -> Response:
        q = req.query
        if "usage_type" in q or "usage_id" in q:
            if "usage_type" not in q or "usage_id" not in q:
                raise InvalidArgument("usage_type and usage_id go together")
            uuid = self.conn.secret_lookup_by_usage(q["usage_type"], q["usage_id"])
            return _json(_flat(self.conn.secret_info(uuid)))
        return _json([_flat(s) for s in self.conn.list_secrets()])

    @route("POST", "/v1/secrets", "write", summary="Define a secret from XML")
    def secret_define(self, req: Request, p: list[str]) -> Response:
        uuid = self.conn.secret_define_xml(_require_xml(req))
        resp = _json(_flat(self.conn.secret_info(uuid)), 201)
        resp.headers.append(("Location", f"/v1/secrets/{_q(uuid)}"))
        return resp

    @route("GET", "/v1/secrets/{uuid}", summary="A secret's usage and flags")
    def secret_get(self, req: Request, p: list[str]) -> Response:
        return _json(_flat(self.conn.secret_info(p[0])))

    @route("DELETE", "/v1/secrets/{uuid}", "write", summary="Undefine the secret")
    def secret_undefine(self, req: Request, p: list[str]) -> Response:
        self.conn.secret_undefine(p[0])
        return Response(204)

    @route("GET", "/v1/secrets/{uuid}/xml", summary="The secret's XML")
    def secret_xml(self, req: Request, p: list[str]) -> Response:
        return _xml(self.conn.secret_xml(p[0]))

    @route("GET", "/v1/secrets/{uuid}/value", "secret", summary="The secret's value (bytes)")
    def secret_value(self, req: Request, p: list[str]) -> Response:
        return Response(200, self.conn.secret_get_value(p[0]), OCTETS)

    @route("PUT", "/v1/secrets/{uuid}/value", "write",
           summary="Set the secret's value (the request body's bytes)")
    def secret_set_value(self, req: Request, p: list[str]) -> Response:
        self.conn.secret_set_value(p[0], req.body(MAX_BODY))
        return Response(204)

    # -- jobs ----------------------------------------------------------------------------
    @route("GET", "/v1/jobs", summary="Jobs (include_finished=false: running ones only)")
    def jobs(self, req: Request, p: list[str]) -> Response:
        inc = bool(_qbool(req, "include_finished", True))
        return _json([_job(j) for j in self.conn.list_jobs(include_finished=inc)])

    @route("GET", "/v1/jobs/{job}", summary="A job's state and progress")
    def job_get(self, req: Request, p: list[str]) -> Response:
        return _json(_job(self.conn.job_info(p[0])))

    @route("DELETE", "/v1/jobs/{job}", "write", summary="Cancel the job")
    def job_cancel(self, req: Request, p: list[str]) -> Response:
        self.conn.job_cancel(p[0])
        return Response(204)

    @route("GET", "/v1/jobs/{job}/wait",
           summary="Wait for the job to finish (timeout seconds, at most 60); its state")
    def job_wait(self, req: Request, p: list[str]) -> Response:
        timeout = min(_qfloat(req, "timeout", MAX_WAIT), MAX_WAIT)
        return _json(_job(self.conn.job_wait(p[0], timeout)))

    # -- events ----------------------------------------------------------------------------
    @route("GET", "/v1/events/latest", summary="The id of the latest event")
    def events_latest(self, req: Request, p: list[str]) -> Response:
        return _json({"id": self.conn.latest_event_id()})

    @route("GET", "/v1/events",
           summary="Events after 'since' (JSON, waiting up to 'timeout'), or a Server-Sent "
                   "Events stream with Accept: text/event-stream")
    def events(self, req: Request, p: list[str]) -> Response:
        if "text/event-stream" in req.headers.get("accept", ""):
            return self._event_stream(req)
        since = req.query.get("since", "0")
        try:
            last = int(since)
        except ValueError:
            raise InvalidArgument(f"query parameter 'since' must be an integer, "
                                  f"not '{since}'") from None
        timeout = min(_qfloat(req, "timeout", 0.0), MAX_WAIT)
        limit = max(1, min(_qint(req, "limit", 1000) or 1000, 10000))
        evs = self.conn.events_since(last, timeout=timeout, limit=limit)
        return _json([_event(e) for e in evs])

    def _event_stream(self, req: Request) -> Response:
        start = req.headers.get("last-event-id") or req.query.get("since")
        try:
            last = int(start) if start is not None else -1
        except ValueError:
            raise InvalidArgument("Last-Event-ID / since must be an integer") from None
        conn = self.conn
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
                    data = json.dumps(_event(ev), separators=(",", ":"))
                    parts.append(f"id: {ev.id}\nevent: {ev.kind}\ndata: {data}\n\n")
                    last = ev.id
                writer.write("".join(parts).encode())

        return Response(200, stream=run)


def _q(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _job_accepted(job: JobInfo) -> Response:
    resp = _json(_job(job), 202)
    resp.headers.append(("Location", f"/v1/jobs/{_q(job.id)}"))
    return resp


def _job_final(job: JobInfo) -> Response:
    """A finished job as the answer to a request that waited for it."""
    if job.state == "done":
        return _json(_job(job))
    from virtstore.errors import error_for_code

    cls = error_for_code(job.error_code or "internal-error")
    status = cls.http_status if job.error_code else 500
    body = {"error": {"code": job.error_code or "internal-error",
                      "message": job.error or job.state}, "job": _job(job)}
    return Response(status, json.dumps(body).encode())


class _LazySink:
    """The engine's sink for a download: the response starts with the first byte, and
    names the job (which the engine returns just after starting it)."""

    def __init__(self, writer: StreamWriter, content_type: str) -> None:
        self.writer = writer
        self.content_type = content_type
        self.job_id: str | None = None
        self.job_known = threading.Event()
        self.encoder = SparseEncoder(self._send) if content_type == SPARSE else None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not self.writer.started:
            # An engine that copies before returning never sets it: go on without.
            self.job_known.wait(2.0)
            headers = [("X-Virtstore-Job", self.job_id)] if self.job_id else []
            self.writer.start(200, self.content_type, headers)
        if self.encoder is not None:
            return self.encoder.write(data)
        return self.writer.write(data)

    def _send(self, data: bytes) -> None:
        if not self.writer.started:
            self.writer.start(200, self.content_type)
        self.writer.write(data)

    def flush(self) -> None:
        pass
