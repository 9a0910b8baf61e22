"""The REST resources of virtstored: each request becomes one Connection call.

The routes come from ``virtstore.api.operations``: one per method and path, serving
the operations declared there. Most go through one generic handler that checks the
whole request against the declaration (``wire.bind``), calls the connection and encodes
the result by its kind; the few with streams or long polls have handlers of their own
(``streams.py``, and pool definitions below, which remote callers may make only under
the configured roots). Names taken from the URL go to the engine as they are, after
percent-decoding; the engine checks them, the server never makes a path out of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from virtstore.api import Connection
from virtstore.api.operations import BY_NAME, BYTES, NOTHING, OPS, RECORD, RECORDS, XML, Op
from virtstore.errors import Forbidden, InvalidArgument, VirtstoreError
from virtstore.server import streams, web
from virtstore.server.auth import Authenticator
from virtstore.server.http import ClientGone, HTTPError, Request, Response, error_response
from virtstore.server.wire import (
    JSON,
    OCTETS,
    bind,
    call_args,
    flat,
    job_accepted,
    json_response,
    load,
    peek,
    select,
)
from virtstore.server.wire import XML as XML_TYPE

log = logging.getLogger("virtstored")
audit = logging.getLogger("virtstored.audit")

Handler = Callable[["App", Request, list[str]], Response]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # with {names}, as the OpenAPI document shows it
    pattern: tuple[str | None, ...]  # None: a name taken from the URL
    ops: tuple[Op, ...]  # the operations it serves; the first describes it
    handler: Handler | None  # None: the generic one
    # A GET of one operation whose only arguments are the path's names (a lookup, an
    # info): answered without binding a query or a body.
    plain: Op | None = None

    @property
    def access(self) -> str:
        return self.ops[0].access

    @property
    def summary(self) -> str:
        return self.ops[0].summary


class App:
    def __init__(self, conn: Connection, auth: Authenticator,
                 openapi: Callable[[], bytes] | None = None, *,
                 remote_pool_roots: Sequence[str] = (),
                 move_targets: Sequence[str] = ()) -> None:
        self.conn = conn
        self.auth = auth
        self._openapi = openapi
        self.remote_pool_roots = tuple(remote_pool_roots)
        self.move_targets = tuple(move_targets)
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
        if web.is_page(req):
            try:
                return web.serve(req)
            except HTTPError as err:
                return error_response(err)
        try:
            role = self.auth.authenticate(req)
            route_, params = self._match(req)
            if route_.access != "read" and role != "rw":
                raise HTTPError(403, "forbidden", "read-only access: "
                                f"{req.method} {req.raw_path} is not allowed")
            if route_.handler is None:
                resp = self.call(route_, req, params)
            else:
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
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = " " + str(json.loads(resp.body)["error"]["code"])
        result = "streaming" if resp.stream is not None else f"{resp.status}{code}"
        audit.info("who=%s op=%s %s result=%s", req.who or "?", req.method, req.raw_path,
                   result)

    # -- the generic handler ---------------------------------------------------------
    def call(self, route: Route, req: Request, params: list[str]) -> Response:
        if any(op.local for op in route.ops) and req.peer.listener == "tcp":
            raise Forbidden(f"{req.method} {route.path} is for local callers only (it "
                            "reads host directories the caller names)")
        plain = route.plain
        if plain is not None and not req.query:
            args = dict(zip(plain.path_names, params, strict=True))
            return self.answer(plain, args, getattr(self.conn, plain.name)(**args))
        body = load(req, route.ops)
        op = select(route.ops, req, body)
        bound = bind(op, req, params, body)
        if op.name == "volume_move" and bound.get("target") and req.peer.listener == "tcp":
            self._check_move_target(str(bound["target"]))
        if op.json_method:
            return Response(200, getattr(self.conn, op.json_method)(**call_args(op, bound)),
                            JSON)
        result = getattr(self.conn, op.name)(**call_args(op, bound))
        return self.answer(op, bound, result)

    def _check_move_target(self, target: str) -> None:
        """A remote caller's vol-move target: the daemon goes there as itself (root on a
        unix socket, its own token over https), so only to the configured hosts."""
        if target.startswith("unix:"):
            raise Forbidden("a move to a unix:// target is for local callers only")
        parts = urlsplit(target)
        if f"{parts.scheme}://{parts.netloc.lower()}" not in self.move_targets:
            raise Forbidden(f"'{target}' is not a move target remote callers may name "
                            "(the daemon's move_targets)")

    def answer(self, op: Op, bound: dict[str, Any], result: Any) -> Response:
        if op.job:
            return job_accepted(result)
        then, key = op.answer
        names: list[Any] = []
        if then:
            # The method made or found a name: answer with its record.
            target = BY_NAME[then]
            names = [bound[a.name] for a in target.args[:-1]] + [result]
            try:
                result = getattr(self.conn, then)(*names)
            except VirtstoreError as err:
                if err.http_status != 404 or not op.created:
                    raise
                # Made, then deleted by another client before this answer: a success.
                result = {**{a.name: bound[a.name] for a in target.args[:-1]}, key: names[-1]}
        if op.result == NOTHING:
            return Response(204)
        if op.result == XML:
            return Response(200, result.encode("utf-8"), XML_TYPE)
        if op.result == BYTES:
            return Response(200, result, OCTETS)
        if op.result == RECORD and not isinstance(result, dict):
            result = flat(result)
        elif op.result == RECORDS:
            result = [flat(r) for r in result]
        resp = json_response({op.wrap: result} if op.wrap else result, op.status)
        if then and op.created:
            resp.headers.append(("Location", BY_NAME[then].url(names)))
        return resp

    # -- hand-written handlers ---------------------------------------------------------
    def openapi(self, req: Request, p: list[str]) -> Response:
        if self._openapi is None:
            raise HTTPError(404, "not-found", "no OpenAPI document")
        return Response(200, self._openapi(), JSON)

    def version(self, req: Request, p: list[str]) -> Response:
        from virtstore import __version__

        return json_response({"version": __version__, "api": 1,
                              "role": self.auth.role_of(req)})

    def download_ticket(self, req: Request, p: list[str]) -> Response:
        op = BY_NAME["download_ticket"]
        bound = bind(op, req, p, load(req, (op,)))
        ticket = self.auth.ticket(req, bound["path"])
        return json_response({"ticket": ticket, "url": f"{bound['path']}?ticket={ticket}"})

    def _confine_remote(self, req: Request, xml: str) -> None:
        """A remote caller names host directories only under the configured roots."""
        if req.peer.listener != "tcp":
            return
        from virtstore.engine.confine import check_remote_target
        from virtstore.xml.pool import parse_pool_xml

        check_remote_target(parse_pool_xml(xml), self.remote_pool_roots)

    def pools_post(self, req: Request, p: list[str]) -> Response:
        define, create = BY_NAME["pool_define_xml"], BY_NAME["pool_create_xml"]
        body = load(req, (define, create))
        op = create if peek(create, req, body, "transient") else define
        bound = bind(op, req, p, body, allow=("transient",))
        self._confine_remote(req, bound["xml"])
        return self.answer(op, bound, getattr(self.conn, op.name)(**call_args(op, bound)))

    def pool_put(self, req: Request, p: list[str]) -> Response:
        op = BY_NAME["pool_redefine_xml"]
        bound = bind(op, req, p, load(req, (op,)))
        from virtstore.xml.pool import parse_pool_xml

        name = parse_pool_xml(bound["xml"]).name
        if name != bound["name"]:
            raise InvalidArgument(f"the XML defines pool '{name}', not '{bound['name']}'")
        self._confine_remote(req, bound["xml"])
        self.conn.pool_define_xml(bound["xml"])
        return json_response(flat(self.conn.pool_info(name)))


_OWN: dict[str, Handler] = {
    "openapi": App.openapi,
    "version": App.version,
    "download_ticket": App.download_ticket,
    "pool_define_xml": App.pools_post,
    "pool_redefine_xml": App.pool_put,
    "volume_upload": lambda app, req, p: streams.volume_upload(app.conn, req, p),
    "volume_download": lambda app, req, p: streams.volume_download(app.conn, req, p),
    "volume_receive": lambda app, req, p: streams.volume_receive(app.conn, req, p),
    "job_wait": lambda app, req, p: streams.job_wait(app.conn, req, p),
    "events_since": lambda app, req, p: streams.events(app.conn, req, p),
}


def _routes() -> list[Route]:
    groups: dict[tuple[str, str], list[Op]] = {}
    for op in OPS:
        groups.setdefault((op.method, op.path), []).append(op)
    out = []
    for (method, path), ops in groups.items():
        pattern = tuple(None if seg.startswith("{") else seg
                        for seg in path.strip("/").split("/"))
        own = [op for op in ops if op.custom]
        plain = ops[0] if (method == "GET" and len(ops) == 1 and not ops[0].other_args
                           and not (ops[0].local or ops[0].job or ops[0].pack
                                    or ops[0].answer[0])
                           and all(a.param for a in ops[0].path_args)) else None
        out.append(Route(method, path, pattern, tuple(ops),
                         _OWN[own[0].name] if own else None, plain))
    return out


ROUTES = _routes()
