"""Backups and whole guests: vol-backup, vol-restore, vol-import, backup-verify,
backup-list, vol-move, guest-clone, guest-backup, migrate-check (docs/backup.md)."""

from __future__ import annotations

import os

from virtstore.cli.data_cmds import BANDWIDTH, JSON, POOL_OPT, VOL, _bandwidth, _done, _wait
from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from virtstore.api import JobInfo
    from virtstore.cli.context import Context

GROUP = "Storage Volume"

DIR = Opt("dir", "backup directory (on the host that runs the engine)", required=True)


def _dir(args: Args) -> str:
    return os.path.abspath(args.req("dir"))


def _newest(ctx: Context, directory: str, job: JobInfo) -> dict[str, Any] | None:
    for m in reversed(ctx.conn.backup_list(directory)):
        if m.get("job") == job.id:
            found: dict[str, Any] = m
            return found
    return None


def _report(ctx: Context, args: Args, directory: str, job: JobInfo, label: str) -> None:
    m = _newest(ctx, directory, job)
    if m is None:
        return
    for w in m.get("warnings") or ():
        ctx.warn(f"{label}: {w}")
    stats = m.get("stats") or {}
    if args.flag("json"):
        return
    from virtstore.cli.output import pretty_size

    ctx.extra(f"Backup {m['id']} of {label}: {m['kind']} ({m['tracking']}), "
              f"{stats.get('chunks_read', 0)} chunks read, {stats.get('chunks_written', 0)} "
              f"written ({pretty_size(int(stats.get('bytes_written', 0)))})")


def vol_backup(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import volume

    vol = volume(ctx.conn, args.req("vol"), args.get("pool"))
    directory = _dir(args)
    job = ctx.conn.volume_backup(vol.pool, vol.name, directory,
                                 incremental=args.flag("incremental"),
                                 bandwidth=_bandwidth(args))
    job = _wait(ctx, args, job, f"backup {vol.name}")
    _report(ctx, args, directory, job, f"vol {vol.name}")


def vol_restore(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_name

    pool = pool_name(ctx.conn, args.req("pool"))
    name = args.req("name")
    job = ctx.conn.volume_restore(_dir(args), pool, name, format=args.get("format"),
                                  point=args.get("point"), bandwidth=_bandwidth(args))
    _wait(ctx, args, job, f"restore {name}")
    _done(ctx, args, f"Vol {name} restored in pool {pool}")


def vol_import(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_name

    pool = pool_name(ctx.conn, args.req("pool"))
    name = args.req("name")
    source = args.req("source")
    if "://" not in source:
        source = os.path.abspath(source)
    job = ctx.conn.volume_import(source, pool, name, format=args.get("format"),
                                 bandwidth=_bandwidth(args))
    _wait(ctx, args, job, f"import {name}")
    _done(ctx, args, f"Vol {name} imported from {source} into pool {pool}")


def vol_move(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import pool_name, volume

    vol = volume(ctx.conn, args.req("vol"), args.get("pool"))
    target = args.get("target")
    # The target host's pools are its own: the name is passed on as it is.
    to_pool = args.req("to-pool") if target else pool_name(ctx.conn, args.req("to-pool"))
    new = args.get("name") or vol.name
    job = ctx.conn.volume_move(vol.pool, vol.name, to_pool, new_name=args.get("name"),
                               format=args.get("format"), bandwidth=_bandwidth(args),
                               target=target)
    _wait(ctx, args, job, f"move {vol.name}")
    where = f"pool {to_pool} of {target}" if target else f"pool {to_pool}"
    _done(ctx, args, f"Vol {vol.name} moved from pool {vol.pool} to {where} as {new}")


def backup_verify(ctx: Context, args: Args) -> None:
    directory = _dir(args)
    _wait(ctx, args, ctx.conn.backup_verify(directory), "verify")
    n = len(ctx.conn.backup_list(directory))
    _done(ctx, args, f"Backup directory {directory} verified: {n} backup(s), every chunk "
                     "matches its hash")


def backup_list(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import pretty_size, table

    items = ctx.conn.backup_list(_dir(args))
    if args.flag("json"):
        ctx.json(items)
        return
    rows = [(m["id"], m["created"], m["kind"], m["tracking"], m.get("parent") or "-",
             pretty_size(int(m["capacity"])),
             pretty_size(int((m.get("stats") or {}).get("bytes_written", 0))),
             str(len(m.get("warnings") or ()))) for m in items]
    ctx.print(table(("Id", "Created", "Kind", "Tracking", "Parent", "Capacity", "Written",
                     "Warnings"), rows))


def _waiter(ctx: Context) -> Any:
    import sys

    from virtstore.cli.progress import follow

    return lambda job, label: follow(ctx.conn, job, out=sys.stderr, label=label)


def guest_clone(ctx: Context, args: Args) -> None:
    from virtstore.api.guests import guest_clone as clone
    from virtstore.cli.context import read_text_file

    xml = read_text_file(args.req("file"))
    new_xml, made = clone(ctx.conn, xml, args.req("name"), linked=args.flag("linked"),
                          wait=_waiter(ctx))
    for vol in made:
        ctx.extra(f"Vol {vol.name} created in pool {vol.pool}")
    out = args.get("output")
    if out:
        from virtstore.host.files import atomic_write

        atomic_write(out, new_xml, 0o644)
    else:
        ctx.out.write(new_xml)


def guest_backup(ctx: Context, args: Args) -> None:
    from virtstore.api.guests import guest_backup as backup
    from virtstore.cli.context import read_text_file

    xml = read_text_file(args.req("file"))
    directory = _dir(args)
    for d in backup(ctx.conn, xml, directory, incremental=args.flag("incremental"),
                    wait=_waiter(ctx)):
        _report(ctx, args, d.directory, d.job, f"disk {d.target} ({d.pool}/{d.volume})")


def migrate_check(ctx: Context, args: Args) -> None:
    import virtstore
    from virtstore.api.guests import migrate_check as check
    from virtstore.cli.context import read_text_file
    from virtstore.cli.output import pretty_size, table
    from virtstore.errors import OperationInvalid

    xml = read_text_file(args.req("file"))
    uri = args.req("target")
    target = virtstore.connect(uri)
    try:
        overall, disks = check(ctx.conn, xml, target, pool=args.get("pool"))
    finally:
        target.close()
    if args.flag("json"):
        ctx.json({"verdict": overall, "disks": [d.to_dict() for d in disks]})
    else:
        ctx.print(table(("Disk", "Source", "Verdict", "Target pool", "Needed", "Reason"),
                        [(d.target, d.source, d.verdict, d.pool or "-",
                          pretty_size(d.required), d.reason) for d in disks]))
        ctx.extra(f"Migration to {uri}: {overall}")
    if overall == "no":
        bad = ", ".join(d.target for d in disks if d.verdict == "no")
        raise OperationInvalid(f"the guest cannot move to {uri}: no place there for "
                               f"disk(s) {bad}")
    for d in disks:
        if d.verdict == "unknown":
            ctx.warn(f"disk {d.target} ({d.source}) is in no pool here: not checked")


INCREMENTAL = Opt("incremental", "only what changed since the newest backup in the "
                  "directory (a full backup, with a warning, when that cannot be trusted)",
                  flag=True)
DOMAIN_FILE = Opt("file", "libvirt domain XML of the guest", required=True)

COMMANDS = (
    Command("vol-backup", GROUP, "back up a vol into a directory",
            "Back up the vol into DIR: chunked, sparse, each chunk stored once by its "
            "SHA-256, a manifest per backup. One directory holds the chain of one vol.",
            (VOL, DIR, POOL_OPT, INCREMENTAL, BANDWIDTH, JSON), vol_backup),
    Command("vol-restore", GROUP, "restore a backup into a new vol",
            "Make a new vol NAME in POOL with the content of a backup in DIR (the newest, "
            "or --point ID), in the backup's format or --format. A failed restore leaves "
            "no vol.",
            (DIR, Opt("name", "name of the new vol", required=True),
             Opt("pool", "pool name or uuid", required=True),
             Opt("format", "format of the new vol (raw, qcow2, ...)", positional=False),
             Opt("point", "id of the backup to restore (default: the newest)",
                 positional=False), BANDWIDTH, JSON), vol_restore),
    Command("vol-import", GROUP, "import a file or block device as a new vol",
            "Copy the bytes of SOURCE (a file or block device, read as raw, or an NBD "
            "export) into a new vol NAME in POOL, sparse, in --format (the pool's default "
            "format otherwise). A failed import leaves no vol; run again, an import from an "
            "NBD export goes on from the last chunk it checked instead of reading the "
            "export again.",
            (Opt("source", "file or block device on the host that runs the engine, or "
                 "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
                 required=True),
             Opt("name", "name of the new vol", required=True),
             Opt("pool", "pool name or uuid", required=True),
             Opt("format", "format of the new vol (raw, qcow2, ...)", positional=False),
             BANDWIDTH, JSON), vol_import),
    Command("vol-move", GROUP, "move a vol to another pool or host",
            "Copy the vol into --to-pool (any pool type; in its format where that pool "
            "makes it, else the pool's default, or --format), of this host or, with "
            "--target, of another host's virtstored, read the copy back and compare it "
            "with the source, then delete the source. If any step fails the source stays "
            "and no copy is left.",
            (VOL, POOL_OPT, Opt("to-pool", "pool to move the vol to", required=True,
                                positional=False),
             Opt("target", "URI of the other host's virtstored (the engine that holds "
                 "the vol connects to it)", positional=False),
             Opt("name", "name in the new pool (default: the same)", positional=False),
             Opt("format", "format of the moved vol (raw, qcow2, ...)", positional=False),
             BANDWIDTH, JSON), vol_move),
    Command("backup-verify", GROUP, "check every chunk and manifest of a backup directory",
            "Read every chunk of DIR and check it against its hash; check that every "
            "manifest's chunks are there and its chain is whole.", (DIR, JSON),
            backup_verify),
    Command("backup-list", GROUP, "list the backups in a directory",
            "List the backups in DIR, oldest first.",
            (DIR, Opt("json", "print JSON", flag=True)), backup_list),
    Command("guest-clone", GROUP, "clone a guest's disks and print its new domain XML",
            "Clone every writable disk of the guest that is a pool vol (read-only and "
            "shareable disks stay shared, as virt-clone does) and print the domain XML "
            "with the new name, a new UUID, no MAC addresses and the new disks. All "
            "disks or none.",
            (DOMAIN_FILE, Opt("name", "name of the new guest", required=True),
             Opt("linked", "linked clones (qcow2 overlays or the pool's own clones)",
                 flag=True),
             Opt("output", "write the XML to this file instead of stdout", positional=False)),
            guest_clone),
    Command("migrate-check", GROUP, "check that another host can take a guest's disks",
            "Per disk of the guest: whether the host of --target sees the same storage "
            "(the same RBD pool, NFS export, iSCSI target...), or which of its pools "
            "(--pool, or the first that fits) has room for a copy (qemu-img measure) and "
            "holds its format, backing chain and encryption, or why none can; then the "
            "verdict. Fails when a disk has no place there.",
            (DOMAIN_FILE, Opt("target", "URI of the target host's virtstored",
                              required=True, positional=False),
             Opt("pool", "the target pool copies would go to", positional=False),
             Opt("json", "print JSON", flag=True)),
            migrate_check),
    Command("guest-backup", GROUP, "back up every disk of a guest",
            "vol-backup of each writable pool disk of the guest into DIR/TARGET.",
            (DOMAIN_FILE, DIR, INCREMENTAL), guest_backup),
)
