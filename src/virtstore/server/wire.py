"""A request's arguments checked against its operation's declaration, and answers.

``bind`` reads the path, the query and the body of a request and checks all of them —
unknown fields, types, ranges, required ones — before anything is called, so a refused
request has no effect.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from virtstore.api import JobInfo
from virtstore.api.operations import BODY, EITHER, MAX_INT, PATH, QUERY, RAW, Arg, Op
from virtstore.errors import InvalidArgument, error_for_code
from virtstore.server.http import HTTPError, Request, Response
from virtstore.xml.units import parse_scaled

# Bodies other than volume data: definitions, JSON arguments, secret values.
MAX_BODY = 1024 * 1024

JSON = "application/json"
XML = "application/xml"
OCTETS = "application/octet-stream"


@dataclass
class Body:
    """A request body as read once for its route: XML text, a JSON object, or bytes."""

    xml: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    empty: bool = True


def load(req: Request, ops: tuple[Op, ...]) -> Body:
    if req.method in ("GET", "HEAD"):
        return Body()
    if any(a.where == RAW for op in ops for a in op.args):
        return Body(raw=req.body(MAX_BODY), empty=False)
    body = req.body(MAX_BODY)
    if not body.strip():
        return Body()
    ctype = req.content_type
    if ctype in (XML, "text/xml") and any(op.xml_body for op in ops):
        try:
            return Body(xml=body.decode("utf-8"), empty=False)
        except UnicodeDecodeError:
            raise InvalidArgument("the XML document is not valid UTF-8") from None
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
    return Body(data=data, empty=False)


def present(req: Request, body: Body, key: str) -> bool:
    return key in req.query or key in body.data or (key == "xml" and body.xml is not None)


def select(ops: tuple[Op, ...], req: Request, body: Body) -> Op:
    """Of the operations sharing a route, the one the request's fields pick."""
    for op in ops:
        if op.select and present(req, body, op.select):
            return op
    for op in ops:
        if not op.select:
            return op
    keys = " or ".join(f"'{op.select}'" for op in ops)
    raise InvalidArgument(f"{keys} is required")


def _query_value(arg: Arg, raw: str) -> Any:
    what = f"query parameter '{arg.key}'"
    if arg.type is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on", ""):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise InvalidArgument(f"{what} must be true or false, not '{raw}'")
    if arg.type is int:
        try:
            return _number(arg, int(raw), what)
        except ValueError:
            if arg.size:
                return _number(arg, parse_scaled(raw, what), what)
            raise InvalidArgument(f"{what} must be an integer, not '{raw}'") from None
    if arg.type is float:
        try:
            value = float(raw)
        except ValueError:
            raise InvalidArgument(f"{what} must be a number, not '{raw}'") from None
        if not value >= 0:  # also refuses NaN
            raise InvalidArgument(f"{what} must not be negative")
        return value
    if arg.type is tuple:
        return tuple(t for t in raw.split(",") if t)
    return raw


def _number(arg: Arg, value: int, what: str) -> int:
    if value < arg.minimum:
        raise InvalidArgument(f"{what} must not be negative" if arg.minimum == 0
                              else f"{what} must be at least {arg.minimum}")
    if value > MAX_INT:
        raise InvalidArgument(f"{what} must be at most {MAX_INT}")
    return value


_JSON_TYPES: dict[type, tuple[tuple[type, ...], str]] = {
    str: ((str,), "a string"), bool: ((bool,), "true or false"), int: ((int,), "an integer"),
    float: ((int, float), "a number"), dict: ((dict,), "an object"),
}


def _json_value(arg: Arg, value: Any) -> Any:
    what = f"field '{arg.key}'"
    if arg.size and isinstance(value, str):
        return _number(arg, parse_scaled(value, what), what)
    types, desc = _JSON_TYPES[arg.type]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise InvalidArgument(f"{what} must be {desc}")
    if isinstance(value, int) and arg.type is int:
        return _number(arg, value, what)
    if isinstance(value, dict):
        return _members(arg.fields, value, "field")
    return value


def _fill(out: dict[str, Any], args: Iterable[Arg], items: Mapping[str, Any],
          convert: Callable[[Arg, Any], Any], what: str, allow: tuple[str, ...] = ()) -> None:
    """``items`` checked and converted into ``out`` by argument name; unknown keys refused."""
    if not items:
        return
    by_key = {a.key: a for a in args}
    for key, value in items.items():
        arg = by_key.get(key)
        if arg is None:
            if key in allow:
                continue
            raise InvalidArgument(f"unknown {what} '{key}'")
        if value is not None:
            out[arg.name] = convert(arg, value)


def _members(args: tuple[Arg, ...], data: dict[str, Any], what: str) -> dict[str, Any]:
    """An object's members: each declared one required, no other allowed."""
    out: dict[str, Any] = {}
    _fill(out, args, data, _json_value, what)
    missing = [a.key for a in args if a.name not in out]
    if missing:
        raise InvalidArgument(f"{what} '{missing[0]}' is required")
    return out


def peek(op: Op, req: Request, body: Body, key: str) -> Any:
    """One argument, checked, from the JSON body or else the query; None if absent."""
    arg = next(a for a in op.args if a.key == key)
    if body.data.get(key) is not None:
        return _json_value(arg, body.data[key])
    if key in req.query:
        return _query_value(arg, req.query[key])
    return None


def bind(op: Op, req: Request, params: list[str], body: Body,
         allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every argument of ``op`` from the request, checked; unknown ones refused."""
    out: dict[str, Any] = {a.name: p for a, p in zip(op.path_args, params, strict=True)}
    _fill(out, op.where(QUERY, EITHER), req.query, _query_value, "query parameter", allow)
    if body.xml is not None:
        out["xml"] = body.xml
    for arg in op.where(RAW):
        if body.raw is not None:
            out[arg.name] = body.raw
    if op.body_required and body.empty:
        raise InvalidArgument("a JSON object is required in the request body")
    _fill(out, op.where(BODY, EITHER), body.data, _json_value, "field", allow)
    for arg in op.other_args:
        if out.get(arg.name) is None and arg.where != RAW:
            if arg.required:
                what = "query parameter" if arg.where == QUERY else "field"
                raise InvalidArgument(f"{what} '{arg.key}' is required")
            out[arg.name] = arg.default
    return out


def call_args(op: Op, bound: dict[str, Any]) -> dict[str, Any]:
    """The method's keyword arguments: wire-only ones dropped, objects and records packed."""
    kwargs: dict[str, Any] = {}
    for arg in op.args:
        if not arg.param:
            continue
        if arg.fields:
            kwargs.update(bound[arg.name])
        else:
            kwargs[arg.name] = bound[arg.name]
    if op.pack is not None:
        name, record = op.pack
        paths = {a.name for a in op.where(PATH)}
        packed = {k: v for k, v in kwargs.items() if k not in paths}
        kwargs = {k: v for k, v in kwargs.items() if k in paths}
        kwargs[name] = record(**packed)
    return kwargs


# -- answers ----------------------------------------------------------------------------

def json_response(value: Any, status: int = 200) -> Response:
    # orjson: the standard encoder is most of a lookup's answer and of a listing's.
    return Response(status, orjson.dumps(value))


def flat(obj: Any) -> dict[str, Any]:
    """A record as a dict, without asdict's deep copy (it is on every lookup)."""
    d = dict(obj.__dict__)
    if d.get("job") is not None:  # an event's job
        d["job"] = dict(d["job"].__dict__)
    elif isinstance(d.get("volumes"), list):  # a page of volumes
        d["volumes"] = [dict(v.__dict__) for v in d["volumes"]]
    return d


def q(name: str) -> str:
    return quote(name, safe="")


def job_accepted(job: JobInfo) -> Response:
    resp = json_response(flat(job), 202)
    resp.headers.append(("Location", f"/v1/jobs/{q(job.id)}"))
    return resp


def job_final(job: JobInfo) -> Response:
    """A finished job as the answer to a request that waited for it."""
    if job.state == "done":
        return json_response(flat(job))
    cls = error_for_code(job.error_code or "internal-error")
    status = cls.http_status if job.error_code else 500
    body = {"error": {"code": job.error_code or "internal-error",
                      "message": job.error or job.state}, "job": flat(job)}
    return Response(status, json.dumps(body).encode())
