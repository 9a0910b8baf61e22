"""The OpenAPI 3 document of virtstored, built from the route table.

Paths, parameters, request bodies and answers come from the operations each route
serves (``virtstore.api.operations``), so the document cannot miss a route or an
argument; only the records' schemas are written here.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from virtstore.api.operations import (
    BODY,
    BYTES,
    EITHER,
    NAMES,
    NOTHING,
    NUMBER,
    OBJECT,
    OBJECTS,
    QUERY,
    RAW,
    RECORDS,
    XML,
    Arg,
    Op,
)
from virtstore.server.app import ROUTES, Route
from virtstore.server.sparse import SPARSE
from virtstore.server.wire import JSON, OCTETS
from virtstore.server.wire import XML as XML_TYPE

_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_BOOL = {"type": "boolean"}
_NSTR = {"type": ["string", "null"]}
_NINT = {"type": ["integer", "null"], "minimum": 0}
_NNUM = {"type": ["number", "null"]}
_BIN = {"type": "string", "format": "binary"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _obj({"code": _STR, "message": _STR}, ("code", "message")),
                   "job": _ref("Job")}, ("error",)),
    "Pool": _obj({"name": _STR, "uuid": _STR, "type": _STR,
                  "state": {"type": "string", "enum": ["inactive", "building", "running",
                                                       "degraded", "inaccessible"]},
                  "persistent": _BOOL, "autostart": _BOOL, "capacity": _INT,
                  "allocation": _INT, "available": _INT, "target_path": _NSTR,
                  "shared": _BOOL},
                 ("name", "uuid", "type", "state", "persistent", "autostart", "capacity",
                  "allocation", "available", "target_path")),
    "Volume": _obj({"pool": _STR, "name": _STR, "key": _STR, "path": _STR,
                    "type": _STR, "format": _NSTR, "capacity": _INT, "allocation": _INT,
                    "physical": _INT},
                   ("pool", "name", "key", "path", "type", "format", "capacity",
                    "allocation", "physical")),
    "VolumePage": _obj({"total": _INT, "offset": _INT,
                        "volumes": {"type": "array", "items": _ref("Volume")}},
                       ("total", "offset", "volumes")),
    "Secret": _obj({"uuid": _STR, "usage_type": _NSTR, "usage_id": _NSTR,
                    "description": _NSTR, "ephemeral": _BOOL, "private": _BOOL},
                   ("uuid", "usage_type", "usage_id", "description", "ephemeral", "private")),
    "Job": _obj({"id": _STR, "kind": _STR,
                 "state": {"type": "string",
                           "enum": ["queued", "running", "done", "failed", "cancelled"]},
                 "pool": _NSTR, "volume": _NSTR, "target_pool": _NSTR,
                 "target_volume": _NSTR, "bytes_done": _INT, "bytes_total": _INT,
                 "rate": {"type": "number"}, "started": _NNUM, "ended": _NNUM,
                 "error": _NSTR, "error_code": _NSTR, "bandwidth": _NINT},
                ("id", "kind", "state")),
    "Snapshot": _obj({"pool": _STR, "volume": _STR, "name": _STR, "kind": _STR,
                      "created": {"type": "number"}, "size": _INT},
                     ("pool", "volume", "name", "kind", "created")),
    "Event": _obj({"id": _INT, "time": {"type": "number"}, "kind": _STR, "action": _STR,
                   "pool": _NSTR, "name": _NSTR,
                   "job": {"oneOf": [_ref("Job"), {"type": "null"}]}},
                  ("id", "time", "kind", "action")),
}


# The resource a path is about, for the document's tags: its last known noun.
_TAGS = ("pools", "volumes", "snapshots", "jobs", "secrets", "host", "events", "backups",
         "cluster", "leases", "capabilities", "pool-types", "pool-sources", "tickets")


def _tag(path: str) -> str:
    nouns = [seg for seg in path.strip("/").split("/") if seg in _TAGS]
    return nouns[-1] if nouns else "misc"


def _arg_schema(arg: Arg) -> dict[str, Any]:
    if arg.type is bool:
        return _BOOL
    if arg.type is int and arg.size:
        return {"oneOf": [{"type": "integer", "minimum": arg.minimum},
                          {"type": "string", "pattern": "^[0-9]+ *[A-Za-z]*$",
                           "description": "a size as virsh takes it: 10G, 512MiB, 1TB"}]}
    if arg.type is int:
        return {"type": "integer", "minimum": arg.minimum}
    if arg.type is float:
        return {"type": "number", "minimum": 0}
    if arg.type is tuple:
        return {"type": "string", "description": "comma-separated"}
    if arg.type is dict:
        return _obj({f.key: _arg_schema(f) for f in arg.fields}, tuple(f.key for f in arg.fields))
    return _STR


def _content(schema: dict[str, Any], *types: str) -> dict[str, Any]:
    return {t: {"schema": schema} for t in types}


# Data that also travels in the sparse framing, and the events' other form.
_ALSO = {"volume_upload": SPARSE, "volume_download": SPARSE, "volume_receive": SPARSE,
         "events_since": "text/event-stream"}


_FREE: dict[str, dict[str, Any]] = {
    OBJECT: {"type": "object"}, OBJECTS: {"type": "array", "items": {"type": "object"}},
    NAMES: {"type": "array", "items": _STR}, NUMBER: _INT}


def _result(op: Op) -> tuple[str, dict[str, Any]]:
    """The status and the answer of an operation, from its result kind."""
    schema: dict[str, Any]
    if op.result == NOTHING:
        return "204", {"description": "Done"}
    if op.result in (XML, BYTES):
        schema, ctype = (_STR, "application/xml") if op.result == XML else (_BIN, OCTETS)
        types = (ctype, _ALSO[op.name]) if op.name in _ALSO else (ctype,)
        return "200", {"description": "OK", "content": _content(schema, *types)}
    if op.record is not None:
        schema = _ref(op.record.__name__.removesuffix("Info"))
        if op.result == RECORDS:
            schema = {"type": "array", "items": schema}
    else:
        schema = _FREE[op.result]
    if op.wrap:
        schema = _obj({op.wrap: schema}, (op.wrap,))
    types = (JSON, _ALSO[op.name]) if op.name in _ALSO else (JSON,)
    desc = {200: "OK", 201: "Created", 202: "The job, started"}[op.status]
    return str(op.status), {"description": desc, "content": _content(schema, *types)}


def _operation(r: Route) -> dict[str, Any]:
    ops, one = r.ops, len(r.ops) == 1
    params = [{"name": seg[1:-1], "in": "path", "required": True, "schema": _STR}
              for seg in r.path.strip("/").split("/") if seg.startswith("{")]
    fields: dict[str, dict[str, Any]] = {}
    required: list[str] = []
    for op in ops:
        for arg in op.args:
            if arg.where in (QUERY, EITHER) and all(p["name"] != arg.key for p in params):
                params.append({"name": arg.key, "in": "query", "schema": _arg_schema(arg),
                               "required": arg.required and one})
            if arg.where in (BODY, EITHER):
                fields[arg.key] = _arg_schema(arg)
                if arg.required and one:
                    required.append(arg.key)
    out: dict[str, Any] = {"operationId": ops[0].name, "summary": r.summary,
                           "tags": [_tag(r.path)],
                           "x-operations": [op.name for op in ops]}
    if params:
        out["parameters"] = params
    content: dict[str, Any] = {}
    if any(op.xml_body for op in ops):
        content[XML_TYPE] = {"schema": _STR}
    if fields:
        content[JSON] = {"schema": _obj(fields, tuple(required))}
    raw = [op for op in ops if any(a.where == RAW for a in op.args)]
    if raw:
        content.update(_content(_BIN, OCTETS, *([_ALSO[raw[0].name]]
                                                 if raw[0].name in _ALSO else [])))
    if content:
        out["requestBody"] = {"content": content, "required": any(
            op.body_required or op.xml_body or op in raw for op in ops)}
    responses: dict[str, Any] = {}
    for op in ops:
        status, answer = _result(op)
        have = responses.get(status)
        if have is None or have == answer:
            responses[status] = answer
        else:  # one route, two answers (a list, or a lookup's one record)
            for ctype, media in answer["content"].items():
                old = have["content"][ctype]["schema"]
                have["content"][ctype]["schema"] = {"oneOf": [old, media["schema"]]}
    for status, desc in _ERRORS.items():
        responses.setdefault(status, {"description": desc,
                                      "content": _content(_ref("Error"), JSON)})
    out["responses"] = responses
    if r.access != "read":
        out["x-access"] = "read-write"
    return out


_ERRORS = {
    "400": "Invalid argument or malformed body",
    "401": "No valid token (TCP)",
    "403": "Read-only access, or not allowed",
    "404": "No such pool, volume, secret, job or resource",
    "409": "Invalid in the object's state, already exists, or busy",
    "413": "Body too large",
    "500": "Internal error or an outside command failed",
    "501": "Unsupported by this pool type or host",
}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    from virtstore import __version__

    return {
        "openapi": "3.1.0",
        "info": {"title": "virtstored", "version": __version__,
                 "description": "virtstore's storage API: pools, volumes, secrets, jobs, "
                                "snapshots and events. Read-only access (the read-only "
                                "socket, an 'ro' token) may use the operations without "
                                "x-access: read-write."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
    }


@functools.cache
def document_bytes() -> bytes:
    return json.dumps(document(), indent=1).encode()
