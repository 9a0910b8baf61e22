"""Every operation of the REST API, declared once.

The server's routes, its request validation and its OpenAPI document, and the remote
client's calls are all built from ``OPS``, so none of them can disagree with another.
An operation's name is the ``Connection`` method it runs (``call=False`` for the few
routes that are the server's own); its arguments are that method's parameters, each
with where it travels on the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cached_property
from urllib.parse import quote

from virtstore.types import (
    Event,
    JobInfo,
    PoolFilter,
    PoolInfo,
    SecretInfo,
    SnapshotInfo,
    VolumeCreateArgs,
    VolumeInfo,
    VolumePage,
    record,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and dataclasses (under record) cost a remote command ~5 ms
    from typing import Any

# Access: ``read`` is allowed to read-only callers; ``write`` changes something;
# ``secret`` reads what libvirt refuses on a read-only connection (a secret's value, a
# volume's bytes). Both of the latter need read-write access and are audited.
READ, WRITE, SECRET = "read", "write", "secret"

# Where an argument travels. EITHER: a query parameter or a JSON body field (the query
# when the body is XML); RAW: the whole body, as bytes.
PATH, QUERY, BODY, EITHER, RAW = "path", "query", "body", "either", "raw"

# Result kinds.
NOTHING = "nothing"  # 204
RECORD = "record"  # one record of ``Op.record`` as a JSON object
RECORDS = "records"  # a JSON array of them
XML = "xml"  # text, application/xml
BYTES = "bytes"  # application/octet-stream
OBJECT = "object"  # a free-form JSON object
OBJECTS = "objects"  # a JSON array of free-form objects
NAMES = "names"  # a JSON array of strings
NUMBER = "number"  # a JSON integer

# Largest integer argument: sizes and offsets end up in off_t and SQLite's INTEGER.
MAX_INT = 2**63 - 1


@record(frozen=True)
class Arg:
    name: str  # the Connection method's parameter
    type: type = str  # str, int, float, bool, bytes, tuple (comma-separated strings), dict
    where: str = BODY
    required: bool = False
    default: Any = None
    wire: str = ""  # its name on the wire, when not ``name``
    minimum: int = 0  # for numbers
    fields: tuple[Arg, ...] = ()  # for a dict: its members, each required
    param: bool = True  # False: read by the server's handler, not passed to the method
    size: bool = False  # bytes: an integer, or a size string as virsh takes it ("10G")

    @property
    def key(self) -> str:
        return self.wire or self.name


@record(frozen=True)
class Op:
    name: str
    method: str
    path: str  # with {placeholders}, in the order of the PATH arguments
    summary: str
    args: tuple[Arg, ...] = ()
    access: str = READ
    result: str = NOTHING
    record: type | None = None  # for RECORD and RECORDS
    job: bool = False  # long-running: answers 202 with the started JobInfo
    created: bool = False  # answers 201
    select: str = ""  # on a route several operations share: the field that picks this one
    answer: tuple[str, str] = ("", "")  # the server answers with OP(result); the client
    # takes FIELD of it: a method that returns a name answers with the whole record
    wrap: str = ""  # the JSON answer is {wrap: result}
    pack: tuple[str, type] | None = None  # the method takes the arguments as one record
    xml_body: bool = False  # an application/xml body gives the 'xml' argument
    local: bool = False  # refused over TCP (it reads host directories the caller names)
    custom: bool = False  # the server has a hand-written handler (streams, long polls)
    call: bool = True  # False: the server's own route, no Connection method
    # The server answers with this Connection method's JSON text (same arguments), made
    # without a record per item.
    json_method: str = ""

    @property
    def status(self) -> int:
        if self.job:
            return 202
        if self.created:
            return 201
        return 204 if self.result == NOTHING else 200

    def where(self, *places: str) -> Iterator[Arg]:
        return (a for a in self.args if a.where in places)

    @property
    def body_required(self) -> bool:
        return any(a.required for a in self.where(BODY))

    @cached_property
    def path_args(self) -> tuple[Arg, ...]:
        return tuple(self.where(PATH))

    @cached_property
    def path_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.path_args)

    @cached_property
    def other_args(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if a.where != PATH)

    @cached_property
    def _template(self) -> str:
        parts = self.path.split("{")
        return "{}".join([parts[0], *(p.split("}", 1)[1] for p in parts[1:])])

    def url(self, names: Iterable[str]) -> str:
        """The path with ``names`` (percent-encoded) in its placeholders."""
        return self._template.format(*(quote(n, safe="") for n in names))


def _path(name: str, wire: str = "") -> Arg:
    return Arg(name, str, PATH, True, wire=wire)


def _q(name: str, type_: type = str, **kw: Any) -> Arg:
    return Arg(name, type_, QUERY, **kw)


def _b(name: str, type_: type = str, **kw: Any) -> Arg:
    return Arg(name, type_, BODY, **kw)


def _flag(name: str, where: str = BODY) -> Arg:
    return Arg(name, bool, where, default=False)


POOL = _path("name", "pool")  # a pool's own operations call it 'name'
IN_POOL = _path("pool")
VOL = (IN_POOL, _path("name", "volume"))
SNAP = (*VOL, _path("snapshot"))
SECRET_ID = _path("uuid")
JOB = _path("job_id", "job")
XML_ARG = _b("xml", required=True)
BANDWIDTH = _b("bandwidth", int)
_V = "/v1/pools/{pool}/volumes/{volume}"

OPS: tuple[Op, ...] = (
    Op("openapi", "GET", "/openapi.json", "This API's OpenAPI 3 document", result=OBJECT,
       call=False, custom=True),
    Op("version", "GET", "/v1/version", "Server version, API level and the caller's role",
       result=OBJECT, call=False, custom=True),
    Op("download_ticket", "POST", "/v1/tickets",
       "A ticket for one GET of a volume's download path within a minute, given as "
       "?ticket= instead of the Authorization header (a browser's link cannot send one)",
       (_b("path", required=True),), SECRET, OBJECT, call=False, custom=True),
    Op("pool_capabilities_xml", "GET", "/v1/capabilities",
       "Pool capabilities (libvirt's XML)", result=XML),
    Op("pool_type_features", "GET", "/v1/pool-types",
       "Per pool type: what works on this host", result=OBJECTS),
    Op("host_devices", "GET", "/v1/host/devices", "The host's block devices", result=OBJECTS),
    Op("find_pool_sources", "GET", "/v1/pool-sources",
       "Storage pool sources found on the host (libvirt's <sources> XML)",
       (_q("pool_type", wire="type", required=True), _q("source_xml", wire="source")),
       result=XML),
    Op("import_libvirt_pools", "POST", "/v1/import-libvirt",
       "Define the pools found in libvirt's configuration directory",
       (_b("config_dir", default="/etc/libvirt/storage"),), WRITE, NAMES, wrap="imported",
       local=True),
    # -- pools
    Op("list_pools", "GET", "/v1/pools",
       "List pools (filters active, persistent, autostart, type), or look one up by uuid "
       "or target_path",
       (_q("active", bool), _q("persistent", bool), _q("autostart", bool),
        _q("types", tuple, wire="type", default=())),
       result=RECORDS, record=PoolInfo, pack=("flt", PoolFilter)),
    Op("pool_lookup_by_uuid", "GET", "/v1/pools", "Look a pool up by UUID",
       (_q("uuid", required=True),), result=RECORD, record=PoolInfo, select="uuid",
       answer=("pool_info", "name")),
    Op("pool_lookup_by_target_path", "GET", "/v1/pools", "Look a pool up by target path",
       (_q("path", wire="target_path", required=True),), result=RECORD, record=PoolInfo,
       select="target_path", answer=("pool_info", "name")),
    Op("pool_define_xml", "POST", "/v1/pools",
       "Define a pool from XML (or create a transient one with transient=true)",
       (XML_ARG,), WRITE, RECORD, PoolInfo, created=True, answer=("pool_info", "name"),
       xml_body=True, custom=True),
    Op("pool_create_xml", "POST", "/v1/pools", "Create and start a transient pool",
       (XML_ARG, Arg("transient", bool, EITHER, default=True, param=False),
        _flag("build", EITHER), Arg("overwrite", bool, EITHER)),
       WRITE, RECORD, PoolInfo, created=True, answer=("pool_info", "name"), xml_body=True,
       select="transient", custom=True),
    Op("pool_redefine_xml", "PUT", "/v1/pools/{pool}",
       "Define (or redefine) the pool from XML; the name must match",
       (POOL, XML_ARG), WRITE, RECORD, PoolInfo, xml_body=True, custom=True, call=False),
    Op("pool_info", "GET", "/v1/pools/{pool}", "A pool's state and sizes", (POOL,),
       result=RECORD, record=PoolInfo),
    Op("pool_undefine", "DELETE", "/v1/pools/{pool}", "Undefine the pool", (POOL,), WRITE),
    Op("pool_xml", "GET", "/v1/pools/{pool}/xml", "The pool's XML (inactive=true: as defined)",
       (POOL, _flag("inactive", QUERY)), result=XML),
    Op("pool_start", "POST", "/v1/pools/{pool}/start", "Start the pool",
       (POOL, _flag("build"), _b("overwrite", bool)), WRITE),
    Op("pool_stop", "POST", "/v1/pools/{pool}/stop",
       "Stop the pool (a transient pool disappears)", (POOL,), WRITE),
    Op("pool_build", "POST", "/v1/pools/{pool}/build", "Build the pool's storage",
       (POOL, _b("overwrite", bool)), WRITE),
    Op("pool_delete", "POST", "/v1/pools/{pool}/delete", "Delete the pool's storage", (POOL,),
       WRITE),
    Op("pool_refresh", "POST", "/v1/pools/{pool}/refresh", "Rescan the pool's volumes",
       (POOL,), WRITE),
    Op("pool_set_autostart", "POST", "/v1/pools/{pool}/autostart",
       "Set autostart ({\"autostart\": true|false})",
       (POOL, _b("autostart", bool, required=True)), WRITE),
    # -- volumes
    Op("volume_lookup_by_key", "GET", "/v1/volumes", "Look a volume up by key",
       (_q("key", required=True),), result=RECORD, record=VolumeInfo, select="key"),
    Op("volume_lookup_by_path", "GET", "/v1/volumes", "Look a volume up by path",
       (_q("path", required=True),), result=RECORD, record=VolumeInfo, select="path"),
    Op("list_volumes", "GET", "/v1/pools/{pool}/volumes", "The pool's volumes, in name order",
       (IN_POOL,), result=RECORDS, record=VolumeInfo, json_method="list_volumes_json"),
    Op("list_volumes_page", "GET", "/v1/pools/{pool}/volumes",
       "A page of the pool's volumes (with limit): from offset, sorted by sort (name, type, "
       "format, capacity, allocation; '-' first: descending), names containing filter; "
       "and how many match",
       (IN_POOL, _q("offset", int, default=0), _q("limit", int, required=True, minimum=1),
        _q("sort", default="name"), _q("filter", default="")),
       result=RECORD, record=VolumePage, select="limit"),
    Op("volume_create", "POST", "/v1/pools/{pool}/volumes",
       "Create a volume: from XML, from arguments, or (with source) filled from another "
       "volume as a job",
       (IN_POOL, _b("name", required=True), _b("capacity", int, required=True, size=True),
        _b("allocation", int, size=True), _b("format"), _b("backing_vol"), _b("backing_vol_format"),
        _flag("prealloc_metadata", EITHER)),
       WRITE, RECORD, VolumeInfo, created=True, answer=("volume_info", "name"),
       pack=("args", VolumeCreateArgs)),
    Op("volume_create_from", "POST", "/v1/pools/{pool}/volumes",
       "Create a volume as the XML says, filled from another volume (a job)",
       (IN_POOL, XML_ARG,
        _b("source", dict, required=True, fields=(_b("src_pool", wire="pool"),
                                                  _b("src_name", wire="name"))),
        _flag("reflink"), _flag("prealloc_metadata", EITHER), BANDWIDTH),
       WRITE, RECORD, JobInfo, job=True, select="source"),
    Op("volume_create_xml", "POST", "/v1/pools/{pool}/volumes", "Create a volume from XML",
       (IN_POOL, XML_ARG, _flag("prealloc_metadata", EITHER)), WRITE, RECORD, VolumeInfo,
       created=True, answer=("volume_info", "name"), select="xml", xml_body=True),
    Op("volume_info", "GET", _V, "A volume's type and sizes", VOL, result=RECORD,
       record=VolumeInfo),
    Op("volume_delete", "DELETE", _V, "Delete the volume", VOL, WRITE),
    Op("volume_xml", "GET", _V + "/xml", "The volume's XML", VOL, result=XML),
    Op("volume_features", "GET", _V + "/features",
       "Per feature, whether this volume offers it now", VOL, result=OBJECT),
    Op("volume_df", "GET", _V + "/df",
       "The filesystems inside the volume with df's numbers (read, never mounted)", VOL,
       result=OBJECT),
    Op("pool_df", "GET", "/v1/pools/{pool}/df", "volume_df for every volume of the pool",
       (IN_POOL,), result=OBJECTS),
    Op("volume_inspect", "GET", _V + "/inspect",
       "The operating system on the volume, its fstab and its filesystems", VOL,
       result=OBJECT),
    Op("volume_boot_files", "POST", _V + "/boot-files",
       "The guest's default kernel, initrd and command line; with extract_dir, written "
       "into that directory of the storage host", (*VOL, _b("extract_dir")), WRITE,
       OBJECT, local=True),
    # Backups live in directories of the storage host: read-write, local callers only.
    Op("volume_backup", "POST", _V + "/backup",
       "Back the volume up into a directory of the storage host (a job)",
       (*VOL, _b("directory", required=True), _flag("incremental"), BANDWIDTH),
       WRITE, RECORD, JobInfo, job=True, local=True),
    Op("volume_restore", "POST", "/v1/pools/{pool}/restore",
       "A new volume from a backup directory of the storage host (a job)",
       (IN_POOL, _b("directory", required=True), _b("name", required=True), _b("format"),
        _b("point"), BANDWIDTH), WRITE, RECORD, JobInfo, job=True, local=True),
    Op("volume_import", "POST", "/v1/pools/{pool}/import",
       "A new volume from a file or block device of the storage host (a job)",
       (IN_POOL, _b("source", required=True), _b("name", required=True), _b("format"),
        BANDWIDTH), WRITE, RECORD, JobInfo, job=True, local=True),
    Op("volume_move", "POST", _V + "/move",
       "Copy the volume into another pool, check the copy, then delete the source (a job)",
       (*VOL, _b("to_pool", required=True), _b("new_name"), _b("format"), BANDWIDTH,
        _b("target")), WRITE, RECORD, JobInfo, job=True),
    Op("volume_receive_check", "POST", _V + "/receive-check",
       "Whether a volume so described can be received under this name: its format and "
       "the bytes it needs here, or the error",
       (*VOL, _b("capacity", int, required=True, size=True), _b("format"), _b("like"),
        _b("required", int, default=0, size=True)), result=OBJECT),
    Op("volume_receive", "PUT", _V + "/receive",
       "A new volume from the request body (the sparse framing), named only once the "
       "body ended whole; answers when done",
       (*VOL, Arg("source", bytes, RAW, True), _q("capacity", int, required=True, size=True),
        _q("format"), _q("like"), _q("required", int, default=0, size=True),
        _q("bandwidth", int)), WRITE, RECORD, JobInfo, custom=True),
    Op("volume_chunk_hashes", "GET", _V + "/chunk-hashes",
       "The SHA-256 of each 4 MiB chunk of the volume that holds data (from offset, "
       "length bytes)", (*VOL, _q("offset", int, default=0, size=True),
                         _q("length", int, size=True)), SECRET, OBJECT),
    Op("backup_verify", "POST", "/v1/backups/verify",
       "Re-read every chunk of a backup directory and check its chain (a job)",
       (_b("directory", required=True),), WRITE, RECORD, JobInfo, job=True, local=True),
    Op("backup_list", "GET", "/v1/backups", "The backups in a directory of the storage host",
       (_q("directory", required=True),), SECRET, OBJECTS, local=True),
    Op("volume_migrate_info", "GET", _V + "/migrate-info",
       "What another host needs to take the volume: its storage, format, measured size "
       "and features", VOL, result=OBJECT),
    Op("migrate_target_check", "POST", "/v1/migrate-check",
       "Whether this host can take a volume so described: the same storage, a pool with "
       "room and its format and features, or why not",
       (_b("storage", required=True), _b("format", required=True),
        _b("capacity", int, required=True), _b("required", int, required=True),
        _flag("backing"), _flag("encrypted"), _b("pool")), result=OBJECT),
    Op("cluster_status", "GET", "/v1/cluster",
       "The cluster: etcd endpoints and health, members, leases held", result=OBJECT),
    Op("volume_lease", "POST", _V + "/lease",
       "Take or renew the cluster-wide write lease on a volume of a shared pool",
       (*VOL, _b("holder"), _b("ttl", int, minimum=1)), WRITE, OBJECT),
    Op("volume_unlease", "DELETE", _V + "/lease", "End a write lease",
       (*VOL, _q("holder"), _flag("force", QUERY)), WRITE),
    Op("volume_lease_list", "GET", "/v1/leases", "The write leases held in the cluster",
       (_q("pool"),), result=OBJECTS),
    Op("pool_overrides", "GET", "/v1/pools/{pool}/overrides",
       "Each member's own values of a cluster-wide pool's host-local keys", (IN_POOL,),
       result=OBJECT),
    Op("pool_override", "POST", "/v1/pools/{pool}/overrides",
       "Set (value given) or unset one member's own value of a host-local key",
       (IN_POOL, _b("key", required=True), _b("value"), _b("member")), WRITE, OBJECT),
    Op("volume_device", "GET", _V + "/device",
       "A LUN volume's SCSI identity (vendor, product, revision, serial)", VOL,
       result=OBJECT),
    Op("volume_clone", "POST", _V + "/clone", "Clone the volume (a job)",
       (*VOL, _b("new_name", required=True), _b("target_pool"), _b("format"),
        _flag("reflink"), _flag("linked"), _flag("prealloc_metadata"), BANDWIDTH),
       WRITE, RECORD, JobInfo, job=True),
    Op("volume_resize", "POST", _V + "/resize", "Resize the volume (a job)",
       (*VOL, _b("capacity", int, required=True, size=True), _flag("delta"), _flag("shrink"),
        _flag("allocate")), WRITE, RECORD, JobInfo, job=True),
    Op("volume_wipe", "POST", _V + "/wipe", "Wipe the volume (a job)",
       (*VOL, _b("algorithm", default="zero"), BANDWIDTH), WRITE, RECORD, JobInfo, job=True),
    Op("volume_upload", "PUT", _V + "/upload",
       "Write the request body into the volume (at offset); answers when done",
       (*VOL, Arg("source", bytes, RAW, True), _q("offset", int, default=0, size=True),
        _q("length", int, size=True), _q("sparse", bool, default=True), _q("bandwidth", int)),
       WRITE, RECORD, JobInfo, custom=True),
    Op("volume_download", "GET", _V + "/download",
       "The volume's bytes (from offset, length bytes)",
       (*VOL, _q("offset", int, default=0, size=True), _q("length", int, size=True),
        _q("bandwidth", int)),
       SECRET, BYTES, custom=True),
    Op("volume_snapshot_list", "GET", _V + "/snapshots", "The volume's storage snapshots",
       VOL, result=RECORDS, record=SnapshotInfo),
    Op("volume_snapshot_create", "POST", _V + "/snapshots",
       "Take a storage snapshot ({\"name\": ..., \"external\": false})",
       (*VOL, _b("snapshot", wire="name", required=True), _flag("external")), WRITE,
       RECORD, SnapshotInfo, created=True),
    Op("volume_snapshot_revert", "POST", _V + "/snapshots/{snapshot}/revert",
       "Revert the volume to the snapshot", SNAP, WRITE),
    Op("volume_snapshot_delete", "DELETE", _V + "/snapshots/{snapshot}",
       "Delete the snapshot", SNAP, WRITE),
    # -- secrets
    Op("list_secrets", "GET", "/v1/secrets",
       "List secrets, or look one up by usage_type and usage_id", result=RECORDS,
       record=SecretInfo),
    Op("secret_lookup_by_usage", "GET", "/v1/secrets", "Look a secret up by its usage",
       (_q("usage_type", required=True), _q("usage_id", required=True)), result=RECORD,
       record=SecretInfo, select="usage_type", answer=("secret_info", "uuid")),
    Op("secret_define_xml", "POST", "/v1/secrets", "Define a secret from XML", (XML_ARG,),
       WRITE, RECORD, SecretInfo, created=True, answer=("secret_info", "uuid"),
       xml_body=True),
    Op("secret_info", "GET", "/v1/secrets/{uuid}", "A secret's usage and flags",
       (SECRET_ID,), result=RECORD, record=SecretInfo),
    Op("secret_undefine", "DELETE", "/v1/secrets/{uuid}", "Undefine the secret",
       (SECRET_ID,), WRITE),
    Op("secret_xml", "GET", "/v1/secrets/{uuid}/xml", "The secret's XML", (SECRET_ID,),
       result=XML),
    Op("secret_get_value", "GET", "/v1/secrets/{uuid}/value", "The secret's value (bytes)",
       (SECRET_ID,), SECRET, BYTES),
    Op("secret_set_value", "PUT", "/v1/secrets/{uuid}/value",
       "Set the secret's value (the request body's bytes)",
       (SECRET_ID, Arg("value", bytes, RAW, True)), WRITE),
    # -- jobs
    Op("list_jobs", "GET", "/v1/jobs", "Jobs (include_finished=false: running ones only)",
       (_q("include_finished", bool, default=True),), result=RECORDS, record=JobInfo),
    Op("job_info", "GET", "/v1/jobs/{job}", "A job's state and progress", (JOB,),
       result=RECORD, record=JobInfo),
    Op("job_cancel", "DELETE", "/v1/jobs/{job}", "Cancel the job", (JOB,), WRITE),
    Op("job_wait", "GET", "/v1/jobs/{job}/wait",
       "Wait for the job to finish (timeout seconds, at most 60); its state",
       (JOB, _q("timeout", float)), result=RECORD, record=JobInfo, custom=True),
    # -- events
    Op("latest_event_id", "GET", "/v1/events/latest", "The id of the latest event",
       result=NUMBER, wrap="id"),
    Op("events_since", "GET", "/v1/events",
       "Events after 'since' (JSON, waiting up to 'timeout'), or a Server-Sent Events "
       "stream with Accept: text/event-stream",
       (_q("last_id", int, wire="since", default=0, minimum=-1), _q("timeout", float),
        _q("limit", int, default=1000)), result=RECORDS, record=Event, custom=True),
)

BY_NAME: dict[str, Op] = {op.name: op for op in OPS}
