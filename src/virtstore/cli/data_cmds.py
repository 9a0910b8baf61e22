"""Long volume operations (vol-clone, vol-create-from, vol-resize, vol-wipe, vol-upload,
vol-download) and storage snapshots (vol-snapshot-*).

Each long operation starts a job through the Connection and waits for it here, with a
progress bar on a terminal, JSON lines with ``--json``, and Ctrl-C to cancel it.
"""

from __future__ import annotations

from virtstore.cli.context import failing
from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from virtstore.api import JobInfo, VolumeInfo
    from virtstore.cli.context import Context

GROUP = "Storage Volume"

VOL = Opt("vol", "vol name, key or path", required=True)
POOL_OPT = Opt("pool", "pool name or uuid")
PREALLOC = Opt("prealloc-metadata",
               "preallocate metadata (for qcow2 instead of full allocation)", flag=True)
REFLINK = Opt("reflink", "use btrfs COW lightweight copy", flag=True)
BANDWIDTH = Opt("bandwidth", "limit the rate, as scaled integer per second (e.g. 100M)",
                positional=False)
JSON = Opt("json", "print the job's progress as JSON lines instead of a bar and a message",
           flag=True)

# virsh's vol-wipe algorithms (virStorageVolWipeAlgorithm).
WIPE_ALGORITHMS = ("zero", "nnsa", "dod", "bsi", "gutmann", "schneier", "pfitzner7",
                   "pfitzner33", "random", "trim")


def _vol(ctx: Context, args: Args) -> VolumeInfo:
    from virtstore.cli.lookup import volume

    return volume(ctx.conn, args.req("vol"), args.get("pool"))


def _bandwidth(args: Args) -> int | None:
    from virtstore.cli.output import parse_scaled
    from virtstore.errors import InvalidArgument

    text = args.get("bandwidth")
    if text is None:
        return None
    value = parse_scaled(text[:-2] if text.lower().endswith("/s") else text, "bandwidth")
    if value <= 0:
        raise InvalidArgument(f"Malformed bandwidth {text}: it must be more than 0")
    return value


def _number(args: Args, name: str) -> int | None:
    """A byte count option as virsh checks it (``--offset``, ``--length``); scaled
    integers (``1M``) are accepted too."""
    from virtstore.cli.output import parse_scaled
    from virtstore.errors import InvalidArgument

    text = args.get(name)
    if text is None:
        return None
    try:
        return parse_scaled(text)
    except InvalidArgument:
        raise InvalidArgument(f"Numeric value '{text}' for <{name}> option is malformed "
                              "or out of range") from None


def _wait(ctx: Context, args: Args, job: JobInfo, label: str) -> JobInfo:
    from virtstore.cli.progress import run_job

    return run_job(ctx, job, json_lines=args.flag("json"), label=label)


def _done(ctx: Context, args: Args, message: str) -> None:
    """The success message, unless stdout carries JSON lines."""
    if not args.flag("json"):
        ctx.extra(message)


def clone_xml(xml: str, new_name: str) -> str:
    """virsh's ``vol-clone --print-xml``: the source's XML with the new name, printed as
    libxml2 prints a node (double quotes, no declaration, no final newline)."""
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    root = etree.fromstring(xml.encode(), parser)
    name = root.find("name")
    if name is not None:
        name.text = new_name
    return str(etree.tostring(root, encoding="unicode"))


def vol_clone(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_name

    src = _vol(ctx, args)
    conn = ctx.conn
    target = args.get("target-pool")
    new_name = args.req("newname")
    if args.flag("print-xml"):
        ctx.out.write(clone_xml(conn.volume_xml(src.pool, src.name), new_name))
        return
    target_name = pool_name(conn, target) if target else None
    bandwidth = _bandwidth(args)
    with failing(f"Failed to clone vol from {src.name}"):
        job = conn.volume_clone(src.pool, src.name, new_name, target_pool=target_name,
                                format=args.get("format"), reflink=args.flag("reflink"),
                                linked=args.flag("linked"),
                                prealloc_metadata=args.flag("prealloc-metadata"),
                                bandwidth=bandwidth)
        _wait(ctx, args, job, f"clone {src.name}")
    _done(ctx, args, f"Vol {new_name} cloned from {src.name}")


def vol_create_from(ctx: Context, args: Args) -> None:
    from virtstore.cli.context import read_text_file
    from virtstore.cli.lookup import pool_name, volume

    conn = ctx.conn
    pool = pool_name(conn, args.req("pool"))
    path = args.req("file")
    xml = read_text_file(path)
    src = volume(conn, args.req("vol"), args.get("inputpool"), pool_option="inputpool")
    bandwidth = _bandwidth(args)
    with failing(f"Failed to create vol from {path}"):
        job = conn.volume_create_from(pool, xml, src.pool, src.name,
                                      reflink=args.flag("reflink"),
                                      prealloc_metadata=args.flag("prealloc-metadata"),
                                      bandwidth=bandwidth)
        job = _wait(ctx, args, job, f"create from {src.name}")
    _done(ctx, args, f"Vol {job.target_volume} created from input vol {src.name}")


def vol_resize(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import parse_scaled
    from virtstore.errors import InvalidArgument

    text = args.req("capacity").lstrip()
    delta, shrink = args.flag("delta"), args.flag("shrink")
    if text.startswith("-"):
        # virsh: a negative size is a delta, and only with --shrink.
        text = text[1:]
        delta = True
        if not shrink:
            raise InvalidArgument("negative size requires --shrink")
    # A leading '+' is allowed, as virsh's strtoull allows it: '+512M' is 512M (a
    # delta only with --delta, as in virsh).
    capacity = parse_scaled(text[1:] if text.startswith("+") else text)
    vol = _vol(ctx, args)
    change = f"{'by' if delta else 'to'} {text}"
    with failing(f"Failed to change size of volume '{vol.name}' {change}"):
        job = ctx.conn.volume_resize(vol.pool, vol.name, capacity, delta=delta,
                                     shrink=shrink, allocate=args.flag("allocate"))
        _wait(ctx, args, job, f"resize {vol.name}")
    _done(ctx, args, f"Size of volume '{vol.name}' successfully changed {change}")


def vol_wipe(ctx: Context, args: Args) -> None:
    from virtstore.errors import InvalidArgument

    algorithm = args.get("algorithm") or "zero"
    vol = _vol(ctx, args)
    if algorithm not in WIPE_ALGORITHMS:
        raise InvalidArgument(f"Unsupported algorithm '{algorithm}'")
    bandwidth = _bandwidth(args)
    with failing(f"Failed to wipe vol {args.req('vol')}"):
        job = ctx.conn.volume_wipe(vol.pool, vol.name, algorithm, bandwidth=bandwidth)
        _wait(ctx, args, job, f"wipe {vol.name}")
    _done(ctx, args, f"Vol {args.req('vol')} wiped")


def _transfer(ctx: Context, args: Args) -> tuple[VolumeInfo, str, dict[str, Any]]:
    """vol-upload's and vol-download's volume, file, and keywords of the transfer."""
    kw = {"offset": _number(args, "offset") or 0, "length": _number(args, "length"),
          "sparse": True, "bandwidth": _bandwidth(args)}
    return _vol(ctx, args), args.req("file"), kw


def vol_upload(ctx: Context, args: Args) -> None:
    from virtstore.errors import InvalidArgument

    vol, path, kw = _transfer(ctx, args)
    try:
        source = open(path, "rb")
    except OSError:
        raise InvalidArgument(f"cannot read {path}") from None
    with source, failing(f"cannot upload to volume {args.req('vol')}"):
        job = ctx.conn.volume_upload(vol.pool, vol.name, source, **kw)
        _wait(ctx, args, job, f"upload {vol.name}")


def vol_download(ctx: Context, args: Args) -> None:
    import os

    from virtstore.errors import InvalidArgument

    vol, path, kw = _transfer(ctx, args)
    # As virsh: create the file, or truncate an existing one; a file this command
    # created is removed again if the download fails.
    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError:
            raise InvalidArgument(f"cannot create {path}") from None
    except OSError:
        raise InvalidArgument(f"cannot create {path}") from None
    ok = False
    try:
        with os.fdopen(fd, "wb") as sink, \
                failing(f"cannot download from volume {args.req('vol')}"):
            job = ctx.conn.volume_download(vol.pool, vol.name, sink, **kw)
            _wait(ctx, args, job, f"download {vol.name}")
        ok = True
    finally:
        if not ok and created:
            try:
                os.unlink(path)
            except OSError:
                pass


# -- storage snapshots ---------------------------------------------------------

def _time(ts: float) -> str:
    """virsh's snapshot time: ``2024-01-31 12:00:00 +0100``."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))


def vol_snapshot_create(ctx: Context, args: Args) -> None:
    vol = _vol(ctx, args)
    snap = ctx.conn.volume_snapshot_create(vol.pool, vol.name, args.req("snapshot"),
                                           external=args.flag("external"))
    ctx.extra(f"Volume snapshot {snap.name} created")


def vol_snapshot_list(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import pretty_size, table

    vol = _vol(ctx, args)
    snaps = ctx.conn.volume_snapshot_list(vol.pool, vol.name)
    if args.flag("json"):
        ctx.json([s.to_dict() for s in snaps])
        return
    rows = [[s.name, s.kind, _time(s.created), pretty_size(s.size)] for s in snaps]
    ctx.print(table(["Name", "Kind", "Created", "Size"], rows, header=not ctx.quiet))


def vol_snapshot_revert(ctx: Context, args: Args) -> None:
    vol = _vol(ctx, args)
    snap = args.req("snapshot")
    ctx.conn.volume_snapshot_revert(vol.pool, vol.name, snap)
    ctx.extra(f"Vol {args.req('vol')} reverted to snapshot {snap}")


def vol_snapshot_delete(ctx: Context, args: Args) -> None:
    vol = _vol(ctx, args)
    snap = args.req("snapshot")
    ctx.conn.volume_snapshot_delete(vol.pool, vol.name, snap)
    ctx.extra(f"Volume snapshot {snap} deleted")


SNAP = Opt("snapshot", "snapshot name", required=True)

def _transfer_opts(verb: str, to: str) -> tuple[Opt, ...]:
    return (VOL, Opt("file", "file", required=True), POOL_OPT,
            Opt("offset", f"volume offset to {verb} {to}", positional=False),
            Opt("length", f"amount of data to {verb}", positional=False),
            Opt("sparse", "preserve sparseness of volume (always done)", flag=True),
            BANDWIDTH, JSON)


COMMANDS = (
    Command("vol-clone", GROUP, "clone a volume.",
            "Clone an existing volume within the parent pool, or into --target-pool.",
            (VOL, Opt("newname", "clone name", required=True), POOL_OPT, PREALLOC, REFLINK,
             Opt("print-xml", "print XML document rather than clone the volume", flag=True),
             Opt("target-pool", "pool name or uuid to create the clone in", positional=False),
             Opt("format", "format of the clone (default: the source's)", positional=False),
             Opt("linked", "make a qcow2 overlay backed by the volume instead of a copy",
                 flag=True),
             BANDWIDTH, JSON), vol_clone),
    Command("vol-create-from", GROUP, "create a vol, using another volume as input",
            "Create a vol from an existing volume.",
            (Opt("pool", "pool name or uuid", required=True),
             Opt("file", "file containing an XML vol description", required=True),
             Opt("vol", "vol name, key or path", required=True),
             Opt("inputpool", "pool name or uuid of the input volume's pool"),
             PREALLOC, REFLINK, BANDWIDTH, JSON), vol_create_from),
    Command("vol-resize", GROUP, "resize a vol",
            "Resizes a storage volume. This is safe only for storage volumes not in use by "
            "an active guest.",
            (VOL, Opt("capacity", "new capacity for the vol, as scaled integer (default bytes)",
                      required=True), POOL_OPT,
             Opt("allocate", "allocate the new capacity, rather than leaving it sparse",
                 flag=True),
             Opt("delta", "use capacity as a delta to current size, rather than the new size",
                 flag=True),
             Opt("shrink", "allow the resize to shrink the volume", flag=True), JSON),
            vol_resize),
    Command("vol-wipe", GROUP, "wipe a vol",
            "Ensure data previously on a volume is not accessible to future reads",
            (VOL, POOL_OPT, Opt("algorithm", "perform selected wiping algorithm"), BANDWIDTH,
             JSON), vol_wipe),
    Command("vol-upload", GROUP, "upload file contents to a volume",
            "Upload file contents to a volume",
            _transfer_opts("upload", "to"), vol_upload),
    Command("vol-download", GROUP, "download volume contents to a file",
            "Download volume contents to a file",
            _transfer_opts("download", "from"), vol_download),
    Command("vol-snapshot-create", GROUP, "create a storage snapshot of a volume",
            "Snapshot a volume: internal for qcow2, an overlay with --external, a reflink "
            "copy for raw volumes on xfs or btrfs.",
            (VOL, SNAP, POOL_OPT,
             Opt("external", "keep the current image as the snapshot and put a new qcow2 "
                 "overlay under the volume's name", flag=True)), vol_snapshot_create),
    Command("vol-snapshot-list", GROUP, "list the storage snapshots of a volume", "",
            (VOL, POOL_OPT,
             Opt("json", "print a JSON document (sizes in bytes) instead of text", flag=True)),
            vol_snapshot_list),
    Command("vol-snapshot-revert", GROUP, "revert a volume to a storage snapshot",
            "Bring the volume back to the snapshot's contents; later changes are lost.",
            (VOL, SNAP, POOL_OPT), vol_snapshot_revert),
    Command("vol-snapshot-delete", GROUP, "delete a storage snapshot of a volume", "",
            (VOL, SNAP, POOL_OPT), vol_snapshot_delete),
)
