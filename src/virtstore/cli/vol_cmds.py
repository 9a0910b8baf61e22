"""vol-* commands."""

from __future__ import annotations

from virtstore.cli.context import failing
from virtstore.cli.parser import XPATH_OPTS, Args, Command, Opt
from virtstore.errors import Unsupported

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from virtstore.api import VolumeInfo
    from virtstore.cli.context import Context

GROUP = "Storage Volume"

POOL_ARG = Opt("pool", "pool name or uuid", required=True)
POOL_OPT = Opt("pool", "pool name or uuid")
VOL = Opt("vol", "vol name, key or path", required=True)
JSON = Opt("json", "print a JSON document (sizes in bytes) instead of text", flag=True)


def _vol(ctx: Context, args: Args, *, pool_option: str | None = "pool") -> VolumeInfo:
    from virtstore.cli.lookup import volume

    return volume(ctx.conn, args.req("vol"), args.get("pool"), pool_option=pool_option)


def vol_list(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_name
    from virtstore.cli.output import pretty_size, table

    conn = ctx.conn
    vols = conn.list_volumes(pool_name(conn, args.req("pool")))
    if args.flag("json"):
        ctx.json([v.to_dict() for v in vols])
        return
    if args.flag("details"):
        headers = ["Name", "Path", "Type", "Capacity", "Allocation"]
        rows = [[v.name, v.path, v.type, pretty_size(v.capacity), pretty_size(v.allocation)]
                for v in vols]
    else:
        headers = ["Name", "Path"]
        rows = [[v.name, v.path] for v in vols]
    ctx.print(table(headers, rows, header=not ctx.quiet))


def vol_info(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import info_block, pretty_size

    vol = _vol(ctx, args)
    device = _lun_identity(ctx, vol)
    if args.flag("json"):
        ctx.json({**vol.to_dict(), **({"device": device} if device else {})})
        return

    def size(n: int) -> str:
        return f"{n} bytes" if args.flag("bytes") else pretty_size(n)

    last = (("Physical", size(vol.physical)) if args.flag("physical")
            else ("Allocation", size(vol.allocation)))
    pairs = [("Name", vol.name), ("Type", vol.type), ("Capacity", size(vol.capacity)), last]
    if device:  # beyond virsh, after its lines: what the LUN says it is
        pairs += [(label, str(device.get(key) or "-")) for label, key in
                  (("Vendor", "vendor"), ("Product", "product"), ("Revision", "revision"),
                   ("Serial", "serial"))]
    ctx.print(info_block(pairs))


def _lun_identity(ctx: Context, vol: VolumeInfo) -> dict[str, Any] | None:
    """A network LUN's SCSI identity (iscsi-direct), or None for any other volume."""
    if vol.type != "network":
        return None
    try:
        return ctx.conn.volume_device(vol.pool, vol.name)
    except Unsupported:
        return None


def vol_dumpxml(ctx: Context, args: Args) -> None:
    vol = _vol(ctx, args)
    ctx.dump_xml(ctx.conn.volume_xml(vol.pool, vol.name), args)


def vol_create(ctx: Context, args: Args) -> None:
    from virtstore.cli.context import define_from_file
    from virtstore.cli.lookup import pool_name

    conn = ctx.conn
    pool = pool_name(conn, args.req("pool"))
    prealloc = args.flag("prealloc-metadata")
    name, path = define_from_file(args, "Failed to create vol from {}", lambda xml:
                                  conn.volume_create_xml(pool, xml, prealloc_metadata=prealloc))
    ctx.extra(f"Vol {name} created from {path}")


def vol_create_as(ctx: Context, args: Args) -> None:
    from virtstore.api import VolumeCreateArgs
    from virtstore.cli.lookup import pool_name
    from virtstore.cli.output import parse_scaled

    capacity = parse_scaled(args.req("capacity"))
    allocation = args.get("allocation")
    alloc = parse_scaled(allocation) if allocation is not None else None
    name = args.req("name")
    if args.flag("print-xml"):
        from virtstore.cli.lookup import volume
        from virtstore.cli.xmlbuild import volume_xml

        backing_path = None
        backing = args.get("backing-vol")
        if backing is not None:
            backing_path = volume(ctx.conn, backing, args.req("pool")).path
        ctx.out.write(volume_xml(name, capacity, allocation=alloc, fmt=args.get("format"),
                                 backing_path=backing_path,
                                 backing_format=args.get("backing-vol-format")))
        return
    conn = ctx.conn
    pool = pool_name(conn, args.req("pool"))
    with failing(f"Failed to create vol {name}"):
        made = conn.volume_create(pool, VolumeCreateArgs(
            name=name, capacity=capacity, allocation=alloc, format=args.get("format"),
            backing_vol=args.get("backing-vol"),
            backing_vol_format=args.get("backing-vol-format"),
            prealloc_metadata=args.flag("prealloc-metadata")))
    ctx.extra(f"Vol {made} created")


def vol_delete(ctx: Context, args: Args) -> None:
    vol = _vol(ctx, args)
    with failing(f"Failed to delete vol {args.req('vol')}"):
        ctx.conn.volume_delete(vol.pool, vol.name)
    ctx.extra(f"Vol {args.req('vol')} deleted")


def vol_path(ctx: Context, args: Args) -> None:
    ctx.print(_vol(ctx, args).path)


def vol_name(ctx: Context, args: Args) -> None:
    ctx.print(_vol(ctx, args, pool_option=None).name)  # no --pool to suggest


def vol_key(ctx: Context, args: Args) -> None:
    ctx.print(_vol(ctx, args).key)


def vol_pool(ctx: Context, args: Args) -> None:
    vol = _vol(ctx, args, pool_option=None)
    ctx.print(ctx.conn.pool_info(vol.pool).uuid if args.flag("uuid") else vol.pool)


COMMANDS = (
    Command("vol-list", GROUP, "list vols", "Returns list of vols by pool.",
            (POOL_ARG, Opt("details", "display extended details for volumes", flag=True),
             JSON), vol_list),
    Command("vol-info", GROUP, "storage vol information",
            "Returns basic information about the storage vol.",
            (VOL, POOL_OPT,
             Opt("bytes", "sizes are represented in bytes rather than pretty units",
                 flag=True),
             Opt("physical", "return the physical size of the volume in allocation field",
                 flag=True), JSON), vol_info),
    Command("vol-dumpxml", GROUP, "vol information in XML",
            "Output the vol information as an XML dump to stdout.",
            (VOL, POOL_OPT, *XPATH_OPTS), vol_dumpxml),
    Command("vol-create", GROUP, "create a vol from an XML file", "Create a vol.",
            (Opt("pool", "pool name", required=True),
             Opt("file", "file containing an XML vol description", required=True),
             Opt("prealloc-metadata",
                 "preallocate metadata (for qcow2 instead of full allocation)", flag=True)),
            vol_create),
    Command("vol-create-as", GROUP, "create a volume from a set of args", "Create a vol.",
            (Opt("pool", "pool name", required=True),
             Opt("name", "name of the volume", required=True),
             Opt("capacity", "size of the vol, as scaled integer (default bytes)",
                 required=True),
             Opt("allocation", "initial allocation size, as scaled integer (default bytes)"),
             Opt("format", "file format type raw,bochs,qcow,qcow2,qed,vmdk"),
             Opt("backing-vol", "the backing volume if taking a snapshot"),
             Opt("backing-vol-format", "format of backing volume if taking a snapshot"),
             Opt("prealloc-metadata",
                 "preallocate metadata (for qcow2 instead of full allocation)", flag=True),
             Opt("print-xml", "print XML document, but don't define/create", flag=True)),
            vol_create_as),
    Command("vol-delete", GROUP, "delete a vol", "Delete a given vol.", (VOL, POOL_OPT),
            vol_delete),
    Command("vol-path", GROUP, "returns the volume path for a given volume name or key", "",
            (Opt("vol", "volume name or key", required=True), POOL_OPT), vol_path),
    Command("vol-name", GROUP, "returns the volume name for a given volume key or path", "",
            (Opt("vol", "volume key or path", required=True),), vol_name),
    Command("vol-key", GROUP, "returns the volume key for a given volume name or path", "",
            (Opt("vol", "volume name or path", required=True), POOL_OPT), vol_key),
    Command("vol-pool", GROUP, "returns the storage pool for a given volume key or path", "",
            (Opt("vol", "volume key or path", required=True),
             Opt("uuid", "return the pool uuid rather than pool name", flag=True)),
            vol_pool),
)
