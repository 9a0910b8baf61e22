"""The operations table (virtstore.api.operations) against what is built from it: each
exposed Connection method declared once and matching its signature, a route and an
OpenAPI entry for each, and every write route refusing a malformed request — an
unknown field, a wrong type, a missing field, an integer past 2^63-1, a lone
surrogate — with 400 and no effect, on a real virtstored."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import virtstore
from conftest import dir_pool_xml
from server_fixtures import Daemon, daemon_fixture, request  # noqa: F401
from virtstore.api import Connection, VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.api.operations import (
    BODY,
    EITHER,
    OPS,
    PATH,
    QUERY,
    RAW,
    READ,
    WRITE,
    Arg,
    Op,
)
from virtstore.client import RemoteConnection
from virtstore.server.app import ROUTES
from virtstore.types import field_names

# Connection methods that stay on the caller's side: conveniences built on the others,
# and the NBD export, which runs beside the volume.
NOT_REMOTE = {"close", "pool", "volume_disk_xml", "volume_by_path_or_key",
              "volume_export_nbd",
              # handles and conveniences built on the declared methods
              "volume", "secret", "job", "define_pool", "define_secret"}


# Parameters that never cross the wire: where a download's bytes go, and whether holes
# are made in it.
CLIENT_SIDE = {"volume_download": {"sink", "sparse"}}


def _methods() -> set[str]:
    # An operation's json_method is the server's way of answering it, not one of its own.
    return {n for n, v in vars(Connection).items()
            if callable(v) and not n.startswith("_")} - NOT_REMOTE - {
                op.json_method for op in OPS}


def _params(op: Op) -> set[str]:
    """The method parameters an operation's arguments stand for."""
    names: set[str] = set()
    for arg in op.args:
        if arg.param:
            names.update(f.name for f in arg.fields) if arg.fields else names.add(arg.name)
    if op.pack is not None:
        packed = set(field_names(op.pack[1]))
        assert packed <= names, (op.name, packed - names)
        names = (names - packed) | {op.pack[0]}
    return names


def test_each_exposed_method_is_declared_once() -> None:
    declared = [op.name for op in OPS if op.call]
    assert len(declared) == len(set(declared))
    assert set(declared) == _methods()
    for op in OPS:
        if not op.call:
            assert not hasattr(Connection, op.name), op.name
            continue
        for cls in (Connection, EmbeddedConnection):
            sig = inspect.signature(getattr(cls, op.name))
            params = set(list(sig.parameters)[1:]) - CLIENT_SIDE.get(op.name, set())
            assert params == _params(op), (cls.__name__, op.name)
        # the remote client implements it, with the same signature
        remote = getattr(RemoteConnection, op.name)
        assert remote is not getattr(Connection, op.name), op.name
        assert inspect.signature(remote) == inspect.signature(getattr(Connection, op.name))
        # path arguments in the order of the path's placeholders
        holes = [s[1:-1] for s in op.path.split("/") if s.startswith("{")]
        assert [a.key for a in op.where(PATH)] == holes, op.name


def test_each_declaration_has_a_route_and_an_openapi_entry() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    from virtstore.server.openapi import document

    doc = document()
    validator.validate(doc)
    routes = {(r.method, r.path): r for r in ROUTES}
    assert len(routes) == len(ROUTES)
    seen: list[str] = []
    for (method, path), r in routes.items():
        entry = doc["paths"][path][method.lower()]
        assert entry["x-operations"] == [op.name for op in r.ops]
        assert ("x-access" in entry) == (r.access != READ)
        assert {op.access for op in r.ops} == {r.access}, path
        seen += entry["x-operations"]
    assert sorted(seen) == sorted(op.name for op in OPS)
    for op in OPS:
        entry = doc["paths"][op.path][op.method.lower()]
        params = {(p["name"], p["in"]) for p in entry.get("parameters", ())}
        body = entry.get("requestBody", {}).get("content", {})
        fields = body.get("application/json", {}).get("schema", {}).get("properties", {})
        for arg in op.args:
            if arg.where in (PATH, QUERY, EITHER):
                assert (arg.key, "query" if arg.where == EITHER else arg.where) in params
            if arg.where in (BODY, EITHER):
                assert arg.key in fields, (op.name, arg.key)
            if arg.where == RAW:
                assert "application/octet-stream" in body, op.name
        assert str(op.status) in entry["responses"], op.name


# -- malformed requests to every write route ------------------------------------------

DATA = bytes(range(256)) * 256


@pytest.fixture(name="world")
def world_fixture(daemon: Daemon, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A volume with data, a secret and a finished job to aim the requests at."""
    c = virtstore.connect(daemon.rw_uri)
    c.volume_create("default", VolumeCreateArgs("v", len(DATA), format="raw"))
    src = tmp_path / "data"
    src.write_bytes(DATA)
    with src.open("rb") as f:
        job = c.volume_upload("default", "v", f)
    uuid = c.secret_define_xml("<secret private='no'><usage type='ceph'><name>n</name>"
                               "</usage></secret>")
    c.secret_set_value(uuid, b"s3cret")
    c.close()
    yield {"pool": "default", "volume": "v", "snapshot": "s", "uuid": uuid, "job": job.id,
           "xml": dir_pool_xml("made", tmp_path / "made")}


def _state(d: Daemon) -> tuple[Any, ...]:
    """What a refused request must leave as it was."""
    c = virtstore.connect(d.rw_uri)
    try:
        latest = c.latest_event_id()
        return (sorted(os.listdir(d.root / "images")),
                [(v.name, v.capacity) for v in c.list_volumes("default")],
                [(p.name, p.state, p.autostart) for p in c.list_pools()],
                [(j.id, j.state) for j in c.list_jobs()],
                [s.uuid for s in c.list_secrets()],
                [s.name for s in c.volume_snapshot_list("default", "v")],
                (d.root / "images" / "v").read_bytes(), latest,
                c.events_since(latest))
    finally:
        c.close()


_GOOD: dict[type, Any] = {str: "x", int: 4096, bool: True, float: 1.0}
_WRONG: dict[type, Any] = {str: 12, int: "12", bool: "yes", float: "soon", dict: "x",
                           tuple: 1}
_WRONG_QUERY: dict[type, str] = {int: "twelve", bool: "maybe", float: "soon"}


def _good(arg: Arg, world: dict[str, str]) -> Any:
    if arg.fields:
        return {f.key: world["pool"] if f.key == "pool" else world["volume"]
                for f in arg.fields}
    if arg.name == "xml":
        return world["xml"]
    return arg.default if not arg.param else _GOOD[arg.type]


def _cases(op: Op, world: dict[str, str]) -> Iterator[tuple[str, str, bytes, str]]:
    """(what, query, body, words the error must name) for each malformed request."""
    fields = [a for a in op.args if a.where in (BODY, EITHER)]
    queries = [a for a in op.args if a.where == QUERY]
    good = {a.key: _good(a, world) for a in fields if a.required or not a.param}
    raw = any(a.where == RAW for a in op.args)

    def body(d: dict[str, Any]) -> bytes:
        return b"x" * 4096 if raw else json.dumps(d).encode()

    if raw:
        yield "unknown", "bogus=1", body({}), "bogus"
    else:
        yield "unknown", "", body({**good, "bogus": 1}), "bogus"
        yield "unknown query", "bogus=1", body(good), "bogus"
    if not fields and not raw:
        yield "not an object", "", b"[1]", "object"
    for arg in fields:
        if arg.param:
            # A size also takes virsh's size strings: a wrong one is a word.
            wrong = "ten" if arg.size else _WRONG[arg.type]
            yield "wrong type", "", body({**good, arg.key: wrong}), arg.key
        if arg.type is int:
            yield "past 2^63-1", "", body({**good, arg.key: 2**63}), "at most"
        if arg.type is str:
            yield "surrogate", "", body({**good, arg.key: "\ud800"}), "surrogate"
        if arg.required:
            yield "missing", "", body({k: v for k, v in good.items() if k != arg.key}), ""
    for arg in queries:
        if arg.type in _WRONG_QUERY:  # any text is a string
            wrong = "ten" if arg.size else _WRONG_QUERY[arg.type]
            yield ("wrong type (query)", f"{arg.key}={wrong}", body(good), arg.key)
        if arg.type is int:
            yield "past 2^63-1 (query)", f"{arg.key}={2**63}", body(good), "at most"


def test_write_routes_refuse_malformed_requests(daemon: Daemon,
                                                world: dict[str, str]) -> None:
    before = _state(daemon)
    writes = [op for op in OPS if op.access == WRITE]
    assert len(writes) > 20
    tried = 0
    for op in writes:
        path = "/".join(world[s[1:-1]] if s.startswith("{") else s
                        for s in op.path.split("/"))
        raw = any(a.where == RAW for a in op.args)
        ctype = "application/octet-stream" if raw else "application/json"
        kinds = set()
        for what, query, body, words in _cases(op, world):
            kinds.add(what.split(" (")[0])
            r = request(daemon.rw_socket, op.method, path + ("?" + query if query else ""),
                        body, {"Content-Type": ctype})
            assert r.status == 400, (op.name, what, query, body[:200], r)
            message = r.json()["error"]["message"]  # type: ignore[index]
            assert words in message, (op.name, what, message)
            tried += 1
        assert _state(daemon) == before, op.name
        # each is tried with an unknown field and a wrong type (or a body that is no
        # object), and without each required field
        assert "unknown" in kinds, op.name
        assert raw or kinds & {"wrong type", "not an object"}, op.name
        assert ("missing" in kinds) == any(a.required and a.where in (BODY, EITHER)
                                           for a in op.args), op.name
    assert tried > 130
    log = daemon.log()
    assert "Traceback" not in log and "internal-error" not in log
