"""The OpenAPI 3 document of virtstored, built from the route table.

Paths, methods and summaries come from the routes themselves, so a route cannot be
missing here; what each takes and answers is described below, per handler.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from virtstore.server.app import ROUTES
from virtstore.server.sparse import SPARSE

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
    "VolumeCreate": {
        "description": "Arguments (name, capacity, ...), or xml, or xml with source "
                       "(create-from, answered 202 with a job).",
        "type": "object", "additionalProperties": False,
        "properties": {"name": _STR, "capacity": _INT, "allocation": _INT, "format": _STR,
                       "backing_vol": _STR, "backing_vol_format": _STR,
                       "prealloc_metadata": _BOOL, "xml": _STR,
                       "source": _obj({"pool": _STR, "name": _STR}, ("pool", "name")),
                       "reflink": _BOOL, "bandwidth": _INT}},
}


def _q(name: str, schema: dict[str, Any], desc: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
    if desc:
        out["description"] = desc
    return out


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _xml_body(extra_json: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"application/xml": {"schema": _STR}}
    content["application/json"] = {"schema": extra_json or _obj({"xml": _STR}, ("xml",))}
    return {"required": True, "content": content}


def _ok(schema: dict[str, Any] | None, status: str = "200",
        ctype: str = "application/json", desc: str = "OK") -> dict[str, Any]:
    if schema is None:
        return {status: {"description": desc}}
    return {status: {"description": desc, "content": {ctype: {"schema": schema}}}}


def _arr(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


_XML_OK = _ok(_STR, ctype="application/xml")
_NO_CONTENT = _ok(None, "204", desc="Done")
_JOB_ACCEPTED = _ok(_ref("Job"), "202", desc="The job, started")
_BOOLS = {"build": _BOOL, "overwrite": _BOOL}

# handler name -> extra fields of its operation
OPS: dict[str, dict[str, Any]] = {
    "openapi": {"responses": _ok({"type": "object"})},
    "version": {"responses": _ok(_obj({"version": _STR, "api": _INT, "role": _STR}))},
    "capabilities": {"responses": _XML_OK},
    "pool_types": {"responses": _ok({"type": "array", "items": {"type": "object"}},
                                    desc="Per pool type: supported, why not, operations")},
    "volume_features": {"responses": _ok({"type": "object",
                                          "additionalProperties": {"type": "boolean"}},
                                         desc="snapshot, clone-linked, resize-grow, ...: "
                                              "true or false")},
    "volume_device": {"responses": _ok({"type": "object"},
                                       desc="lun, device_type, vendor, product, revision, "
                                            "serial, block_size, capacity")},
    "host_devices": {"responses": _ok({"type": "array", "items": {"type": "object"}},
                                      desc="The host's block devices")},
    "pool_sources": {"parameters": [{**_q("type", _STR, "pool type"), "required": True},
                                    _q("source", _STR, "a <source> XML search hint")],
                     "responses": _XML_OK},
    "import_libvirt": {"requestBody": _json_body(_obj({"config_dir": _STR}), False),
                       "responses": _ok(_obj({"imported": {"type": "array", "items": _STR}}))},
    "pools": {"parameters": [_q("active", _BOOL), _q("persistent", _BOOL),
                             _q("autostart", _BOOL),
                             _q("type", _STR, "pool types, comma separated"),
                             _q("uuid", _STR, "look one pool up by UUID"),
                             _q("target_path", _STR, "look one pool up by target path")],
              "responses": _ok({"oneOf": [_arr("Pool"), _ref("Pool")]},
                               desc="The pools; one pool for a uuid or target_path lookup")},
    "pools_post": {"parameters": [_q("transient", _BOOL), _q("build", _BOOL),
                                  _q("overwrite", _BOOL)],
                   "requestBody": _xml_body(_obj({"xml": _STR, "transient": _BOOL,
                                                  **_BOOLS}, ("xml",))),
                   "responses": _ok(_ref("Pool"), "201", desc="Defined")},
    "pool_get": {"responses": _ok(_ref("Pool"))},
    "pool_put": {"requestBody": _xml_body(), "responses": _ok(_ref("Pool"))},
    "pool_undefine": {"responses": _NO_CONTENT},
    "pool_xml": {"parameters": [_q("inactive", _BOOL)], "responses": _XML_OK},
    "pool_start": {"requestBody": _json_body(_obj(dict(_BOOLS)), False),
                   "responses": _NO_CONTENT},
    "pool_stop": {"responses": _NO_CONTENT},
    "pool_build": {"requestBody": _json_body(_obj({"overwrite": _BOOL}), False),
                   "responses": _NO_CONTENT},
    "pool_delete": {"responses": _NO_CONTENT},
    "pool_refresh": {"responses": _NO_CONTENT},
    "pool_autostart": {"requestBody": _json_body(_obj({"autostart": _BOOL}, ("autostart",))),
                       "responses": _NO_CONTENT},
    "volume_lookup": {"parameters": [_q("key", _STR), _q("path", _STR)],
                      "responses": _ok(_ref("Volume"))},
    "volumes": {"responses": _ok(_arr("Volume"))},
    "volume_create": {"parameters": [_q("prealloc_metadata", _BOOL)],
                      "requestBody": {"required": True, "content": {
                          "application/xml": {"schema": _STR},
                          "application/json": {"schema": _ref("VolumeCreate")}}},
                      "responses": {**_ok(_ref("Volume"), "201", desc="Created"),
                                    **_JOB_ACCEPTED}},
    "volume_get": {"responses": _ok(_ref("Volume"))},
    "volume_delete": {"responses": _NO_CONTENT},
    "volume_xml": {"responses": _XML_OK},
    "volume_clone": {"requestBody": _json_body(_obj({
        "new_name": _STR, "target_pool": _STR, "format": _STR, "reflink": _BOOL,
        "linked": _BOOL, "prealloc_metadata": _BOOL, "bandwidth": _INT}, ("new_name",))),
        "responses": _JOB_ACCEPTED},
    "volume_resize": {"requestBody": _json_body(_obj({
        "capacity": _INT, "delta": _BOOL, "shrink": _BOOL, "allocate": _BOOL},
        ("capacity",))), "responses": _JOB_ACCEPTED},
    "volume_wipe": {"requestBody": _json_body(_obj({"algorithm": _STR, "bandwidth": _INT}),
                                              False),
                    "responses": _JOB_ACCEPTED},
    "volume_upload": {"parameters": [_q("offset", _INT), _q("length", _INT),
                                     _q("sparse", _BOOL), _q("bandwidth", _INT)],
                      "requestBody": {"required": True, "content": {
                          "application/octet-stream": {"schema": _BIN},
                          SPARSE: {"schema": _BIN}}},
                      "responses": _ok(_ref("Job"), desc="The finished job")},
    "volume_download": {"parameters": [_q("offset", _INT), _q("length", _INT),
                                       _q("bandwidth", _INT)],
                        "responses": {"200": {
                            "description": "The bytes (Accept: " + SPARSE + " for the "
                                           "sparse framing)",
                            "content": {"application/octet-stream": {"schema": _BIN},
                                        SPARSE: {"schema": _BIN}}}}},
    "snapshots": {"responses": _ok(_arr("Snapshot"))},
    "snapshot_create": {"requestBody": _json_body(_obj({"name": _STR, "external": _BOOL},
                                                       ("name",))),
                        "responses": _ok(_ref("Snapshot"), "201", desc="Taken")},
    "snapshot_revert": {"responses": _NO_CONTENT},
    "snapshot_delete": {"responses": _NO_CONTENT},
    "secrets": {"parameters": [_q("usage_type", _STR), _q("usage_id", _STR)],
                "responses": _ok({"oneOf": [_arr("Secret"), _ref("Secret")]},
                                 desc="The secrets; one secret for a usage lookup")},
    "secret_define": {"requestBody": _xml_body(),
                      "responses": _ok(_ref("Secret"), "201", desc="Defined")},
    "secret_get": {"responses": _ok(_ref("Secret"))},
    "secret_undefine": {"responses": _NO_CONTENT},
    "secret_xml": {"responses": _XML_OK},
    "secret_value": {"responses": _ok({"type": "string", "format": "binary"},
                                      ctype="application/octet-stream")},
    "secret_set_value": {"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": _NO_CONTENT},
    "jobs": {"parameters": [_q("include_finished", _BOOL)], "responses": _ok(_arr("Job"))},
    "job_get": {"responses": _ok(_ref("Job"))},
    "job_cancel": {"responses": _NO_CONTENT},
    "job_wait": {"parameters": [_q("timeout", {"type": "number", "minimum": 0})],
                 "responses": _ok(_ref("Job"))},
    "events_latest": {"responses": _ok(_obj({"id": _INT}, ("id",)))},
    "events": {"parameters": [_q("since", {"type": "integer"}),
                              _q("timeout", {"type": "number", "minimum": 0}),
                              _q("limit", _INT)],
               "responses": {"200": {"description": "Events", "content": {
                   "application/json": {"schema": _arr("Event")},
                   "text/event-stream": {"schema": _STR}}}}},
}

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
        name = r.handler.__name__
        extra = OPS[name]
        op: dict[str, Any] = {"operationId": name, "summary": r.summary,
                              "tags": [r.pattern[1] or "misc"
                                       if len(r.pattern) > 1 else "misc"]}
        params = [{"name": seg[1:-1], "in": "path", "required": True, "schema": _STR}
                  for seg in r.path.strip("/").split("/") if seg.startswith("{")]
        params += extra.get("parameters", [])
        if params:
            op["parameters"] = params
        if "requestBody" in extra:
            op["requestBody"] = extra["requestBody"]
        responses = dict(extra["responses"])
        for status, desc in _ERRORS.items():
            responses.setdefault(status, {"description": desc, "content": {
                "application/json": {"schema": _ref("Error")}}})
        op["responses"] = responses
        if r.access != "read":
            op["x-access"] = "read-write"
        paths.setdefault(r.path, {})[r.method.lower()] = op
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
