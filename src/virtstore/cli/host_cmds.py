"""host-list and find-storage-pool-sources[-as]: what local storage the host has."""

from __future__ import annotations

from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.context import Context

HOST_GROUP = "Host"
POOL_GROUP = "Storage Pool"


def host_list(ctx: Context, args: Args) -> None:
    devs = ctx.conn.host_devices()
    if args.flag("json"):
        ctx.json(devs)
        return
    from virtstore.cli.output import pretty_size, table

    rows = []
    for d in devs:
        content = d.get("fs_type") or (f"{d['partition_table']} table"
                                       if d.get("partition_table") else "-")
        rows.append([str(d["path"]), str(d.get("type") or "-"), pretty_size(int(d["size"])),
                     str(d.get("transport") or "-"), content,
                     ",".join(d.get("mount_points") or []) or "-"])
    ctx.print(table(["Path", "Type", "Size", "Transport", "Content", "Mounted on"], rows,
                    header=not ctx.quiet).rstrip("\n"))


def find_sources(ctx: Context, args: Args) -> None:
    from virtstore.cli.context import read_text_file

    spec = args.get("srcSpec")
    xml = read_text_file(spec) if spec else None
    ctx.print(ctx.conn.find_pool_sources(args.req("type"), xml).rstrip("\n"))


def find_sources_as(ctx: Context, args: Args) -> None:
    from virtstore.xml.writer import esc

    host = args.get("host")
    xml = None
    if host:
        port = args.get("port")
        port_attr = f" port='{esc(port)}'" if port else ""
        initiator = args.get("initiator")
        init = (f"<initiator><iqn name='{esc(initiator)}'/></initiator>" if initiator
                else "")
        xml = f"<source><host name='{esc(host)}'{port_attr}/>{init}</source>"
    ctx.print(ctx.conn.find_pool_sources(args.req("type"), xml).rstrip("\n"))


COMMANDS = (
    Command("host-list", HOST_GROUP, "list the host's block devices",
            "Lists block devices with their size, transport and contents; --json adds "
            "sector sizes, model, vendor, serial, WWN, partitions, UUIDs, labels and "
            "holders.", (
                Opt("json", "print a JSON document (sizes in bytes)", flag=True),
            ), host_list),
    Command("find-storage-pool-sources", POOL_GROUP, "discover potential storage pool sources",
            "Returns XML <sources> document.", (
                Opt("type", "type of storage pool sources to find", required=True),
                Opt("srcSpec", "optional file of source xml to query for pools"),
            ), find_sources),
    Command("find-storage-pool-sources-as", POOL_GROUP, "find potential storage pool sources",
            "Returns XML <sources> document.", (
                Opt("type", "type of storage pool sources to find", required=True),
                Opt("host", "optional host to query"),
                Opt("port", "optional port to query"),
                Opt("initiator", "optional initiator IQN to use for query",
                    positional=False),
            ), find_sources_as),
)
