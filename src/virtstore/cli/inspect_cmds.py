"""vol-df, pool-df, vol-boot-files, vol-inspect: looking inside a guest's disks
(virt-df, virt-get-kernel / pygrub, virt-inspector) from the volume's bytes."""

from __future__ import annotations

from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from virtstore.cli.context import Context

GROUP = "Storage Volume"
POOL_GROUP = "Storage Pool"


def human(n: int) -> str:
    """virt-df -h's sizes: powers of 1024, three significant digits."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            if not unit:
                return f"{int(value)}"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return str(n)


def percent(used: int, avail: int) -> str:
    """df's Use%: used over used + available, rounded up."""
    total = used + avail
    return f"{-(-used * 100 // total)}%" if total else "-"


def df_rows(name: str, fss: list[dict[str, Any]], args: Args) -> list[list[str]]:
    rows = []
    for fs in fss:
        label = f"{name}:{fs['device']}"
        kind = str(fs.get("type") or "unknown")
        if fs.get("error"):
            kind += f" ({fs['error']})"
        if args.flag("inodes"):
            total, free = fs.get("inodes"), fs.get("inodes_free")
            if total is None or free is None:
                rows.append([label, "-", "-", "-", "-", kind])
                continue
            rows.append([label, str(total), str(total - free), str(free),
                         percent(total - free, free), kind])
            continue
        size, used, avail = fs.get("size"), fs.get("used"), fs.get("available")
        if size is None or used is None or avail is None:
            rows.append([label, "-", "-", "-", "-", kind])
            continue
        fmt = human if args.flag("human") else (lambda n: str(-(-n // 1024)))
        rows.append([label, fmt(size), fmt(used), fmt(avail), percent(used, avail), kind])
    return rows


def df_headers(args: Args) -> list[str]:
    if args.flag("inodes"):
        return ["Filesystem", "Inodes", "IUsed", "IFree", "IUse%", "Type"]
    if args.flag("human"):
        return ["Filesystem", "Size", "Used", "Available", "Use%", "Type"]
    return ["Filesystem", "1K-blocks", "Used", "Available", "Use%", "Type"]


def _ask(ctx: Context, args: Args,
         call: Callable[[str, str], dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """``call`` on the volume the arguments name: (its name, the answer), or None once the
    answer is printed as JSON (--json)."""
    from virtstore.cli.lookup import volume

    vol = volume(ctx.conn, args.req("vol"), args.get("pool"))
    found = call(vol.pool, vol.name)
    if args.flag("json"):
        ctx.json(found)
        return None
    return vol.name, found


def vol_df(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import table

    if (asked := _ask(ctx, args, ctx.conn.volume_df)) is not None:
        name, found = asked
        ctx.print(table(df_headers(args), df_rows(name, found["filesystems"], args),
                        header=not ctx.quiet))


def pool_df(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_name
    from virtstore.cli.output import table

    found = ctx.conn.pool_df(pool_name(ctx.conn, args.req("pool")))
    if args.flag("json"):
        ctx.json(found)
        return
    rows = []
    for vol in found:
        if "error" in vol:
            rows.append([vol["volume"], "-", "-", "-", "-", f"error: {vol['error']}"])
        else:
            rows += df_rows(vol["volume"], vol["filesystems"], args)
    ctx.print(table(df_headers(args), rows, header=not ctx.quiet))


def boot_files(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import info_block

    asked = _ask(ctx, args, lambda pool, name: ctx.conn.volume_boot_files(
        pool, name, extract_dir=args.get("extract")))
    if asked is None:
        return
    found = asked[1]
    pairs = [("Kernel", found["kernel"]), ("Initrd", found.get("initrd") or "-"),
             ("Command line", found.get("cmdline") or "-"),
             ("Found in", found.get("config") or "-")]
    if found.get("title"):
        pairs.append(("Entry", found["title"]))
    for item in found.get("extracted", []):
        pairs.append(("Extracted", f"{item['file']} ({item['size']} bytes)"))
    ctx.print(info_block(pairs))


def vol_inspect(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import info_block, table

    if (asked := _ask(ctx, args, ctx.conn.volume_inspect)) is None:
        return
    found = asked[1]
    os_ = found.get("os", {})
    ctx.print(info_block([("OS type", os_.get("type") or "unknown"),
                          ("Distribution", os_.get("distro") or "-"),
                          ("Product name", os_.get("name") or "-"),
                          ("Version", os_.get("version") or "-"),
                          ("Hostname", os_.get("hostname") or "-"),
                          ("Root", os_.get("root") or "-")]))
    ctx.print()
    rows = [[fs["device"], fs.get("type") or "-", fs.get("label") or "-",
             fs.get("uuid") or "-", fs.get("mountpoint") or "-"]
            for fs in found.get("filesystems", [])]
    ctx.print(table(["Device", "Type", "Label", "UUID", "Mount point"], rows,
                    header=not ctx.quiet))


_DF_OPTS = (Opt("human", "sizes in powers of 1024 (virt-df -h)", flag=True),
            Opt("inodes", "inode counts instead of blocks (virt-df -i)", flag=True),
            Opt("json", "print a JSON document (sizes in bytes)", flag=True))

COMMANDS = (
    Command("vol-df", GROUP, "show filesystem usage inside a volume",
            "Like virt-df: each filesystem in the volume (partitions, the whole disk, "
            "logical volumes of a PV inside it) with its size, used and available space. "
            "Read from the volume's bytes, never mounted.",
            (Opt("vol", "vol name, key or path", required=True),
             Opt("pool", "pool name or uuid"), *_DF_OPTS), vol_df),
    Command("pool-df", POOL_GROUP, "show filesystem usage inside every volume of a pool",
            "vol-df for each volume of the pool.",
            (Opt("pool", "pool name or uuid", required=True), *_DF_OPTS), pool_df),
    Command("vol-boot-files", GROUP, "find (and extract) a guest's kernel and initrd",
            "The default boot entry of grub2 (blscfg included), extlinux/syslinux, or the "
            "newest /boot/vmlinuz-*: kernel, initrd and command line. --extract DIR "
            "writes the kernel and initrd into DIR.",
            (Opt("vol", "vol name, key or path", required=True),
             Opt("pool", "pool name or uuid"),
             Opt("extract", "directory to write the kernel and initrd into",
                 positional=False),
             Opt("json", "print a JSON document", flag=True)), boot_files),
    Command("vol-inspect", GROUP, "identify the operating system in a volume",
            "Like virt-inspector: OS type, distribution, version (/etc/os-release), "
            "hostname, and the filesystems with their mount points from /etc/fstab.",
            (Opt("vol", "vol name, key or path", required=True),
             Opt("pool", "pool name or uuid"),
             Opt("json", "print a JSON document", flag=True)), vol_inspect),
)
