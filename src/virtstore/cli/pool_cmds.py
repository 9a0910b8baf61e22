"""pool-* commands."""

from __future__ import annotations

from virtstore.cli.context import define_from_file, failing
from virtstore.cli.parser import XPATH_OPTS, Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from virtstore.api import PoolInfo
    from virtstore.cli.context import Context

GROUP = "Storage Pool"

# virsh's list (virStoragePoolType) without sheepdog, which libvirt 8.8 dropped.
POOL_TYPES = ("dir", "fs", "netfs", "logical", "disk", "iscsi", "iscsi-direct", "scsi",
              "mpath", "rbd", "gluster", "zfs", "vstorage")

POOL = Opt("pool", "pool name or uuid", required=True)
BUILD_OPTS = (Opt("build", "build the pool as normal", flag=True),
              Opt("no-overwrite", "do not overwrite any existing data", flag=True),
              Opt("overwrite", "overwrite any existing data", flag=True))
JSON = Opt("json", "print a JSON document (sizes in bytes) instead of text", flag=True)


def _build_flags(args: Args) -> tuple[bool, bool | None]:
    """(build, overwrite) from --build/--overwrite/--no-overwrite; either overwrite
    option implies a build, as in libvirt."""
    args.exclusive("overwrite", "no-overwrite")
    overwrite = True if args.flag("overwrite") else False if args.flag("no-overwrite") else None
    return args.flag("build") or overwrite is not None, overwrite


def _sizes_shown(info: PoolInfo) -> bool:
    return info.state in ("running", "degraded")


# -- listing and information ---------------------------------------------------------

def pool_list(ctx: Context, args: Args) -> None:
    from virtstore.api import PoolFilter
    from virtstore.cli.output import pretty_size, table, yes_no
    from virtstore.errors import InvalidArgument

    args.exclusive("details", "uuid")
    args.exclusive("details", "name")
    active = None if args.flag("all") else False if args.flag("inactive") else True
    persistent = (None if args.flag("persistent") == args.flag("transient")
                  else args.flag("persistent"))
    autostart = (None if args.flag("autostart") == args.flag("no-autostart")
                 else args.flag("autostart"))
    types: tuple[str, ...] = ()
    if args.get("type"):
        types = tuple(t for t in (args.req("type")).split(",") if t)
        for t in types:
            if t not in POOL_TYPES:
                raise InvalidArgument(f"Invalid pool type '{t}'")
    flt = PoolFilter(active=active, persistent=persistent, autostart=autostart, types=types)
    pools = sorted(ctx.conn.list_pools(flt), key=lambda p: p.name)

    if args.flag("json"):
        ctx.json([p.to_dict() for p in pools])
        return
    if args.flag("uuid") or args.flag("name"):
        for p in pools:
            if args.flag("uuid") and args.flag("name"):
                ctx.print(f"{p.uuid:<36} {p.name:<20}")
            elif args.flag("uuid"):
                ctx.print(f"{p.uuid:<36}")
            else:
                ctx.print(f"{p.name:<20}")
        return
    if args.flag("details"):
        headers = ["Name", "State", "Autostart", "Persistent", "Capacity", "Allocation",
                   "Available"]
        rows = []
        for p in pools:
            sizes = ([pretty_size(p.capacity), pretty_size(p.allocation),
                      pretty_size(p.available)] if _sizes_shown(p) else ["-", "-", "-"])
            rows.append([p.name, p.state, yes_no(p.autostart), yes_no(p.persistent),
                         *sizes])
    else:
        headers = ["Name", "State", "Autostart"]
        rows = [[p.name, "inactive" if p.state == "inactive" else "active",
                 yes_no(p.autostart)] for p in pools]
    ctx.print(table(headers, rows, header=not ctx.quiet))


def pool_info(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_info as lookup
    from virtstore.cli.output import info_block, pretty_size, yes_no

    info = lookup(ctx.conn, args.req("pool"))
    if args.flag("json"):
        ctx.json(info.to_dict())
        return
    pairs = [("Name", info.name), ("UUID", info.uuid), ("State", info.state),
             ("Persistent", yes_no(info.persistent)), ("Autostart", yes_no(info.autostart))]
    if _sizes_shown(info):
        size = str if args.flag("bytes") else pretty_size
        pairs += [("Capacity", size(info.capacity)), ("Allocation", size(info.allocation)),
                  ("Available", size(info.available))]
    # Beyond virsh, after its lines so that scripts reading them by position still work:
    # whether the pool's volumes are visible from other hosts.
    pairs.append(("Shared", yes_no(info.shared)))
    ctx.print(info_block(pairs))


def pool_dumpxml(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_name

    conn = ctx.conn
    xml = conn.pool_xml(pool_name(conn, args.req("pool")), inactive=args.flag("inactive"))
    ctx.dump_xml(xml, args)


def pool_uuid(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_info as lookup

    ctx.print(lookup(ctx.conn, args.req("pool")).uuid)


def pool_name(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_info as lookup

    ctx.print(lookup(ctx.conn, args.req("pool")).name)


def pool_capabilities(ctx: Context, args: Args) -> None:
    if args.flag("features") or args.flag("json"):
        _pool_features(ctx, args)
        return
    xml = ctx.conn.pool_capabilities_xml()
    ctx.out.write(xml if xml.endswith("\n") else xml + "\n")


def _pool_features(ctx: Context, args: Args) -> None:
    """Ours: per pool type, what works on this host, as a table or JSON."""
    features = ctx.conn.pool_type_features()
    if args.flag("json"):
        import json

        ctx.print(json.dumps(features, indent=2))
        return
    ops = ("build", "resize", "clone", "wipe", "upload")
    rows = []
    for f in features:
        snaps = "; ".join(f"{fmt}: {', '.join(kinds)}" for fmt, kinds in f["snapshots"].items())
        rows.append([f["type"], "yes" if f["supported"] else "no",
                     "yes" if f["shared"] else "no",
                     " ".join(op for op in ops if f[op]) or "-", snaps or "-",
                     f["reason"] or ""])
    from virtstore.cli.output import table

    ctx.print(table(["Type", "Supported", "Shared", "Operations", "Snapshots", "Why not"],
                    rows))


# -- definition ------------------------------------------------------------------------

def pool_define(ctx: Context, args: Args) -> None:
    name, path = define_from_file(args, "Failed to define pool from {}",
                                  ctx.conn.pool_define_xml)
    ctx.extra(f"Pool {name} defined from {path}")


def pool_create(ctx: Context, args: Args) -> None:
    build, overwrite = _build_flags(args)
    name, path = define_from_file(args, "Failed to create pool from {}", lambda xml:
                                  ctx.conn.pool_create_xml(xml, build=build,
                                                           overwrite=overwrite))
    ctx.extra(f"Pool {name} created from {path}")


AS_OPTS = (
    Opt("name", "name of the pool", required=True),
    Opt("type", "type of the pool", required=True),
    Opt("print-xml", "print XML document, but don't define/create", flag=True),
    Opt("source-host", "source-host for underlying storage"),
    Opt("source-path", "source path for underlying storage"),
    Opt("source-dev", "source device for underlying storage"),
    Opt("source-name", "source name for underlying storage"),
    Opt("target", "target for underlying storage"),
    Opt("source-format", "format for underlying storage"),
    Opt("auth-type", "auth type to be used for underlying storage"),
    Opt("auth-username", "auth username to be used for underlying storage"),
    Opt("secret-usage", "auth secret usage to be used for underlying storage"),
    Opt("secret-uuid", "auth secret UUID to be used for underlying storage"),
    Opt("adapter-name", "adapter name to be used for underlying storage"),
    Opt("adapter-wwnn", "adapter wwnn to be used for underlying storage"),
    Opt("adapter-wwpn", "adapter wwpn to be used for underlying storage"),
    Opt("adapter-parent", "adapter parent scsi_hostN to be used for underlying vHBA storage"),
    Opt("adapter-parent-wwnn",
        "adapter parent scsi_hostN wwnn to be used for underlying vHBA storage"),
    Opt("adapter-parent-wwpn",
        "adapter parent scsi_hostN wwpn to be used for underlying vHBA storage"),
    Opt("adapter-parent-fabric-wwn",
        "adapter parent scsi_hostN fabric_wwn to be used for underlying vHBA storage"),
    Opt("source-protocol-ver", "nfsvers value for NFS pool mount option"),
    Opt("source-initiator", "initiator iqn for underlying storage"),
)


def _xml_from_args(args: Args) -> tuple[str, str]:
    """(name, XML) of pool-define-as / pool-create-as."""
    from virtstore.cli.xmlbuild import pool_xml
    from virtstore.errors import InvalidArgument

    args.exclusive("secret-usage", "secret-uuid")
    kw = {o.name.replace("-", "_"): args.get(o.name) for o in AS_OPTS[3:]}
    name = args.req("name")
    try:
        return name, pool_xml(name, args.req("type"), **kw)
    except ValueError as err:  # lxml refuses control characters
        raise InvalidArgument(f"invalid character in argument: {err}") from None


def pool_define_as(ctx: Context, args: Args) -> None:
    name, xml = _xml_from_args(args)
    if args.flag("print-xml"):
        ctx.out.write(xml)
        return
    with failing(f"Failed to define pool {name}"):
        name = ctx.conn.pool_define_xml(xml)
    ctx.extra(f"Pool {name} defined")


def pool_create_as(ctx: Context, args: Args) -> None:
    build, overwrite = _build_flags(args)
    name, xml = _xml_from_args(args)
    if args.flag("print-xml"):
        ctx.out.write(xml)
        return
    with failing(f"Failed to create pool {name}"):
        name = ctx.conn.pool_create_xml(xml, build=build, overwrite=overwrite)
    ctx.extra(f"Pool {name} created")


def pool_undefine(ctx: Context, args: Args) -> None:
    _on_pool(ctx, args, "Failed to undefine pool {}", "Pool {} has been undefined",
             ctx.conn.pool_undefine)


def pool_import_libvirt(ctx: Context, args: Args) -> None:
    config_dir = args.get("config-dir") or "/etc/libvirt/storage"
    for name in ctx.conn.import_libvirt_pools(config_dir):
        ctx.extra(f"Pool {name} imported from {config_dir}")


# -- lifecycle ---------------------------------------------------------------------------

def _on_pool(ctx: Context, args: Args, failed: str, done: str,
             call: Callable[[str], object]) -> None:
    """Look up the pool, ``call`` it with its name, and report as virsh does (``{}`` in
    the messages is the name)."""
    from virtstore.cli.lookup import pool_name as lookup

    name = lookup(ctx.conn, args.req("pool"))
    with failing(failed.format(name)):
        call(name)
    ctx.extra(done.format(name))


def pool_build(ctx: Context, args: Args) -> None:
    overwrite = _build_flags(args)[1]
    _on_pool(ctx, args, "Failed to build pool {}", "Pool {} built",
             lambda name: ctx.conn.pool_build(name, overwrite=overwrite))


def pool_start(ctx: Context, args: Args) -> None:
    build, overwrite = _build_flags(args)
    _on_pool(ctx, args, "Failed to start pool {}", "Pool {} started",
             lambda name: ctx.conn.pool_start(name, build=build, overwrite=overwrite))


def pool_destroy(ctx: Context, args: Args) -> None:
    _on_pool(ctx, args, "Failed to destroy pool {}", "Pool {} destroyed",
             ctx.conn.pool_stop)


def pool_delete(ctx: Context, args: Args) -> None:
    _on_pool(ctx, args, "Failed to delete pool {}", "Pool {} deleted",
             ctx.conn.pool_delete)


def pool_refresh(ctx: Context, args: Args) -> None:
    _on_pool(ctx, args, "Failed to refresh pool {}", "Pool {} refreshed",
             ctx.conn.pool_refresh)


def pool_autostart(ctx: Context, args: Args) -> None:
    enable = not args.flag("disable")
    how = "mark" if enable else "unmark"
    _on_pool(ctx, args, f"failed to {how} pool {{}} as autostarted",
             f"Pool {{}} {how}ed as autostarted",
             lambda name: ctx.conn.pool_set_autostart(name, enable))


COMMANDS = (
    Command("pool-list", GROUP, "list pools", "Returns list of pools.", (
        Opt("inactive", "list inactive pools", flag=True),
        Opt("all", "list inactive & active pools", flag=True),
        Opt("transient", "list transient pools", flag=True),
        Opt("persistent", "list persistent pools", flag=True),
        Opt("autostart", "list pools with autostart enabled", flag=True),
        Opt("no-autostart", "list pools with autostart disabled", flag=True),
        Opt("type", "only list pool of specified type(s) (if supported)"),
        Opt("details", "display extended details for pools", flag=True),
        Opt("uuid", "list UUID of active pools only", flag=True),
        Opt("name", "list name of active pools only", flag=True),
        JSON), pool_list),
    Command("pool-info", GROUP, "storage pool information",
            "Returns basic information about the storage pool.",
            (POOL, Opt("bytes", "Return pool info in bytes", flag=True), JSON), pool_info),
    Command("pool-dumpxml", GROUP, "pool information in XML",
            "Output the pool information as an XML dump to stdout.",
            (POOL, Opt("inactive", "show inactive defined XML", flag=True), *XPATH_OPTS),
            pool_dumpxml),
    Command("pool-define", GROUP,
            "define an inactive persistent storage pool or modify an existing persistent "
            "one from an XML file", "Define or modify a persistent storage pool.",
            (Opt("file", "file containing an XML pool description", required=True),),
            pool_define),
    Command("pool-define-as", GROUP, "define a pool from a set of args", "Define a pool.",
            AS_OPTS, pool_define_as),
    Command("pool-create", GROUP, "create a pool from an XML file", "Create a pool.",
            (Opt("file", "file containing an XML pool description", required=True),
             *BUILD_OPTS), pool_create),
    Command("pool-create-as", GROUP, "create a pool from a set of args", "Create a pool.",
            (*AS_OPTS, *BUILD_OPTS), pool_create_as),
    Command("pool-build", GROUP, "build a pool", "Build a given pool.",
            (POOL, *BUILD_OPTS[1:]), pool_build),
    Command("pool-start", GROUP, "start a (previously defined) inactive pool",
            "Start a pool.", (POOL, *BUILD_OPTS), pool_start),
    Command("pool-destroy", GROUP, "destroy (stop) a pool",
            "Forcefully stop a given pool. Raw data in the pool is untouched",
            (POOL,), pool_destroy),
    Command("pool-delete", GROUP, "delete a pool", "Delete a given pool.", (POOL,),
            pool_delete),
    Command("pool-undefine", GROUP, "undefine an inactive pool",
            "Undefine the configuration for an inactive pool.", (POOL,), pool_undefine),
    Command("pool-refresh", GROUP, "refresh a pool", "Refresh a given pool.", (POOL,),
            pool_refresh),
    Command("pool-autostart", GROUP, "autostart a pool",
            "Configure a pool to be automatically started at boot.",
            (POOL, Opt("disable", "disable autostarting", flag=True)), pool_autostart),
    Command("pool-uuid", GROUP, "convert a pool name to pool UUID", "", (POOL,), pool_uuid),
    Command("pool-name", GROUP, "convert a pool UUID to pool name", "", (POOL,), pool_name),
    Command("pool-capabilities", GROUP, "storage pool capabilities",
            "Returns capabilities of storage pool support.",
            (Opt("features", "per pool type: what works on this host (ours)", flag=True),
             Opt("json", "the same features as JSON", flag=True)), pool_capabilities),
    Command("pool-import-libvirt", GROUP,
            "import libvirt's pool definitions and autostart marks",
            "Define every pool found in libvirt's storage configuration directory, with "
            "its autostart mark.",
            (Opt("config-dir", "libvirt's storage configuration directory "
                 "(default /etc/libvirt/storage)"),), pool_import_libvirt),
)
