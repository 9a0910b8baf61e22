"""The data types every layer shares: pool, volume, secret, job, snapshot and event
records, filters and creation arguments. This module imports nothing of the project,
so the engine, the backends, the transports and the CLI can all use it without cycles.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass as record
    from dataclasses import field
    from typing import Any, Protocol, TypeVar

    _R = TypeVar("_R")

    __all__ = ["field", "record"]  # re-exported: the records' decorator, as typed
else:
    Protocol = object  # only type checkers look at the protocols' structure

    # The standard dataclasses module imports inspect (ast, dis, tokenize): a few
    # milliseconds that every single-object command would pay. The records here and
    # the backends' need only __init__, __repr__, __eq__, __hash__, frozen, slots and
    # default factories; type checkers see the real decorator above.
    _MISSING = object()

    class _Field:
        __slots__ = ("default_factory",)

        def __init__(self, default_factory: Any) -> None:
            self.default_factory = default_factory

    def field(*, default_factory: Any) -> Any:
        return _Field(default_factory)

    def record(cls: Any = None, /, *, frozen: bool = False, slots: bool = False) -> Any:
        def wrap(cls: type) -> type:
            return _make_record(cls, frozen, slots)

        return wrap if cls is None else wrap(cls)

    def _make_record(cls: Any, frozen: bool, slots: bool) -> Any:
        if any(hasattr(b, "__record_fields__") for b in cls.__mro__[1:]):
            raise TypeError(f"{cls.__name__}: a record does not inherit another's fields")
        own = cls.__dict__
        names = [n for n, t in own.get("__annotations__", {}).items()
                 if not str(t).startswith(("ClassVar", "typing.ClassVar"))]
        defaults = {n: own[n] for n in names if n in own}
        fields_of = _fields_getter(names)

        def __init__(self: Any, *args: object, **kwargs: object) -> None:
            # Compiling an __init__ is most of a record class's cost, and a command
            # uses few of the records it imports: each is compiled when first made.
            new.__init__ = init = _compile_init(names, defaults, frozen, slots)
            init(self, *args, **kwargs)

        def __repr__(self: Any) -> str:
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
            return f"{type(self).__qualname__}({inner})"

        def __eq__(self: Any, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return bool(fields_of(self) == fields_of(other))

        ns = {"__init__": __init__, "__repr__": __repr__, "__eq__": __eq__,
              "__match_args__": tuple(names), "__record_fields__": tuple(names)}
        if frozen:
            def __hash__(self: Any) -> int:
                return hash(fields_of(self))

            ns.update(__setattr__=_frozen_setattr, __delattr__=_frozen_delattr,
                      __hash__=__hash__)
        else:
            ns["__hash__"] = None
        ns.update((k, v) for k, v in own.items() if k not in ns and k not in (
            "__dict__", "__weakref__") and not (slots and k in defaults))
        if slots:
            ns["__slots__"] = tuple(names)
        new = type(cls)(cls.__name__, cls.__bases__, ns)
        new.__qualname__ = cls.__qualname__
        return new

    def _frozen_setattr(self: Any, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field '{name}'")

    def _frozen_delattr(self: Any, name: str) -> None:
        raise AttributeError(f"cannot delete field '{name}'")

    def _compile_init(names: list[str], defaults: dict[str, Any], frozen: bool,
                      slots: bool) -> Any:
        scope: dict[str, Any] = {"_object_setattr": object.__setattr__, "_MISSING": _MISSING}
        params, body = [], []
        for n in names:
            default = defaults.get(n, _MISSING)
            if isinstance(default, _Field):
                scope[f"_f_{n}"] = default.default_factory
                params.append(f"{n}=_MISSING")
                value = f"_f_{n}() if {n} is _MISSING else {n}"
            elif default is not _MISSING:
                scope[f"_d_{n}"] = default
                params.append(f"{n}=_d_{n}")
                value = n
            else:
                params.append(n)
                value = n
            if frozen and not slots:  # past __setattr__, straight into the instance
                body.append(f"_d['{n}'] = {value}")
            elif frozen:
                body.append(f"_object_setattr(self, '{n}', {value})")
            else:
                body.append(f"self.{n} = {value}")
        if frozen and not slots:
            body.insert(0, "_d = self.__dict__")
        src = (f"def __init__(self, {', '.join(params)}):\n    "
               + "\n    ".join(body or ["pass"]))
        exec(src, scope)  # the source is made from the class's own field names
        return scope["__init__"]

    def _fields_getter(names: list[str]) -> Any:
        if not names:
            return lambda _obj: ()
        if len(names) == 1:
            name = names[0]
            return lambda obj: (getattr(obj, name),)
        import operator

        return operator.attrgetter(*names)


def replace(obj: _R, /, **changes: Any) -> _R:
    """A copy of a record with some fields changed (dataclasses.replace for records)."""
    return type(obj)(**(as_dict(obj) | changes))


def field_names(obj: Any) -> tuple[str, ...]:
    """A record's (or a record class's) field names, in order."""
    names = getattr(obj, "__record_fields__", None)
    if names is None:
        names = tuple(obj.__dataclass_fields__)
    return tuple(names)


def as_dict(obj: Any) -> dict[str, Any]:
    """A record's fields by name (not recursing into records inside)."""
    return {n: getattr(obj, n) for n in field_names(obj)}


class _Fields:
    def to_dict(self) -> dict[str, Any]:
        """The fields by name, for JSON."""
        return as_dict(self)


# Pool states, as libvirt names them (virStoragePoolState).
POOL_INACTIVE = "inactive"
POOL_BUILDING = "building"
POOL_RUNNING = "running"
POOL_DEGRADED = "degraded"
POOL_INACCESSIBLE = "inaccessible"


@record(frozen=True)
class PoolInfo(_Fields):
    name: str
    uuid: str
    type: str
    state: str
    persistent: bool
    autostart: bool
    capacity: int
    allocation: int
    available: int
    target_path: str | None
    shared: bool = False  # the pool's storage is reachable from other hosts too


@record(frozen=True)
class VolumeInfo(_Fields):
    pool: str
    name: str
    key: str
    path: str
    type: str  # file, block, dir, network, netdir, ploop
    format: str | None
    capacity: int
    allocation: int
    physical: int


# How a page of volumes may be sorted ('-' before one: descending).
VOLUME_SORT_KEYS = ("name", "type", "format", "capacity", "allocation")
MAX_PAGE = 1000


@record(frozen=True)
class VolumePage:
    """One page of a pool's volumes, sorted and filtered, and how many match in all."""

    total: int
    offset: int
    volumes: list[VolumeInfo]


@record(frozen=True)
class SecretInfo(_Fields):
    uuid: str
    usage_type: str | None
    usage_id: str | None
    description: str | None
    ephemeral: bool
    private: bool


# Job states.
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
JOB_FINAL = (JOB_DONE, JOB_FAILED, JOB_CANCELLED)


@record(frozen=True)
class JobInfo(_Fields):
    """Long work (clone, convert, wipe, upload, download, resize, build) and its progress."""

    id: str
    kind: str  # clone, create-from, resize, wipe, upload, download, build, ...
    state: str
    pool: str | None
    volume: str | None
    target_pool: str | None = None
    target_volume: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0  # bytes per second, averaged since the start
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    error_code: str | None = None  # the VirtstoreError code of a failed job
    bandwidth: int | None = None  # bytes per second, None: unlimited

    @property
    def finished(self) -> bool:
        return self.state in JOB_FINAL


@record(frozen=True)
class SnapshotInfo(_Fields):
    pool: str
    volume: str
    name: str
    kind: str  # internal (qcow2), external (qcow2 overlay), reflink, native
    created: float
    size: int = 0


@record(frozen=True)
class Event:
    """A lifecycle or progress event. ``kind``: pool, volume or job."""

    id: int
    time: float
    kind: str
    action: str  # defined, undefined, started, stopped, created, deleted, refreshed, progress,
    # done, failed, cancelled
    pool: str | None = None
    name: str | None = None
    job: JobInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        d = as_dict(self)
        if self.job is not None:
            d["job"] = self.job.to_dict()
        return d


class NbdExport(Protocol):
    """A volume served over NBD; a context manager that stops serving on exit."""

    @property
    def url(self) -> str: ...

    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...

    def __enter__(self) -> NbdExport: ...

    def __exit__(self, *exc: object) -> None: ...


@record(frozen=True)
class PoolFilter:
    """Filters of pool-list; None means "either"."""

    active: bool | None = None
    persistent: bool | None = None
    autostart: bool | None = None
    types: tuple[str, ...] = ()

    def matches(self, info: PoolInfo) -> bool:
        if self.active is not None and (info.state != POOL_INACTIVE) != self.active:
            return False
        if self.persistent is not None and info.persistent != self.persistent:
            return False
        if self.autostart is not None and info.autostart != self.autostart:
            return False
        return not (self.types and info.type not in self.types)


@record(frozen=True)
class VolumeCreateArgs:
    """vol-create-as in arguments rather than XML."""

    name: str
    capacity: int
    allocation: int | None = None
    format: str | None = None
    backing_vol: str | None = None  # name in the same pool, key or path
    backing_vol_format: str | None = None
    prealloc_metadata: bool = False


def default_root() -> str:
    """State root: VIRTSTORE_ROOT, else /var/lib/virtstore for root, else the XDG data dir."""
    env = os.environ.get("VIRTSTORE_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/virtstore"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                          "share")
    return os.path.join(xdg, "virtstore")
