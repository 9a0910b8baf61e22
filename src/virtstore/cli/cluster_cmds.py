"""Cluster commands: the members and health of the etcd cluster this engine belongs to,
and the write leases on shared volumes (``vol-lease`` before a guest starts on one).

The embedded engine joins the cluster named by VIRTSTORE_CLUSTER (etcd endpoints,
comma-separated) as VIRTSTORE_CLUSTER_MEMBER (default the host name).
"""

from __future__ import annotations

from virtstore.cli.parser import Args, Command, Opt
from virtstore.errors import InvalidArgument

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.context import Context

CLUSTER_GROUP = "Host"
VOLUME_GROUP = "Storage Volume"
POOL_GROUP = "Storage Pool"

JSON = Opt("json", "print a JSON document instead of text", flag=True)
POOL = Opt("pool", "pool name", required=True)
VOL = Opt("vol", "volume name", required=True)
HOLDER = Opt("holder", "who holds the lease (e.g. the guest's name)", positional=False)


def cluster_status(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import info_block, table, yes_no

    st = ctx.conn.cluster_status()
    if args.flag("json"):
        ctx.json(st)
        return
    if not st.get("clustered"):
        ctx.print("Not a cluster member (set VIRTSTORE_CLUSTER to the etcd endpoints)")
        return
    me = st["this_member"]
    ctx.print(info_block([
        ("Member", str(me["member"])), ("Quorum", yes_no(bool(st["quorum"]))),
        ("Session", "live" if me["session_live"] else "none"),
        ("Cut off", yes_no(bool(me["cut_off"]))), ("Leases held", str(me["held"])),
        ("Leases lost", str(me["leases_lost"])),
        ("Refused", f"{me['refused_busy']} busy, {me['refused_unavailable']} unavailable"),
        ("Cluster leases", str(st["leases"])),
        ("Cluster pools", ", ".join(st["pools"]["cluster_pools"]) or "-")]))
    for pool, why in sorted(st["pools"]["not_applied"].items()):
        ctx.print(f"Pool {pool} not taken in here: {why}")
    for pool, why in sorted(st["pools"].get("not_started", {}).items()):
        ctx.print(f"Pool {pool} inactive here, its autostart failed: {why}")
    ctx.print()
    ctx.print(table(["Endpoint", "Health", "Leader", "Version"],
                    [[e["endpoint"], "healthy" if e["healthy"] else e.get("error", "down"),
                      yes_no(bool(e.get("is_leader"))), str(e.get("version") or "-")]
                     for e in st["endpoints"]], header=not ctx.quiet))
    ctx.print()
    ctx.print(table(["Member", "Sessions", "Leases"],
                    [[str(m["member"]), str(m["sessions"]), str(m["leases"])]
                     for m in st["members"]], header=not ctx.quiet))


def vol_lease(ctx: Context, args: Args) -> None:
    ttl = args.get("ttl")
    out = ctx.conn.volume_lease(args.req("pool"), args.req("vol"), holder=args.get("holder"),
                                ttl=int(ttl) if ttl else None)
    if args.flag("json"):
        ctx.json(out)
        return
    ctx.extra(f"Vol {out['volume']} leased to {out['holder']} on {out['member']} for "
              f"{out['ttl']} s (repeat to renew)")


def vol_unlease(ctx: Context, args: Args) -> None:
    ctx.conn.volume_unlease(args.req("pool"), args.req("vol"), holder=args.get("holder"),
                            force=args.flag("force"))
    ctx.extra(f"Vol {args.req('vol')} lease ended")


def vol_lease_list(ctx: Context, args: Args) -> None:
    import time

    from virtstore.cli.output import table

    leases = ctx.conn.volume_lease_list(args.get("pool"))
    if args.flag("json"):
        ctx.json(leases)
        return
    rows = [[str(x["volume"]), str(x["pool"]), str(x["member"]), str(x["holder"]),
             str(x["op"]), time.strftime("%H:%M:%S", time.localtime(x["since"]))
             if x.get("since") else "-"] for x in leases]
    ctx.print(table(["Volume", "Pool", "Member", "Holder", "Operation", "Since"], rows,
                    header=not ctx.quiet))


def pool_override(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import table

    pool, key, value = args.req("pool"), args.get("key"), args.get("value")
    if key is None:
        if args.get("member") or args.flag("unset") or value is not None:
            raise InvalidArgument("give the KEY to set or unset")
        every = ctx.conn.pool_overrides(pool)
        if args.flag("json"):
            ctx.json(every)
            return
        ctx.print(table(["Member", "Key", "Value"],
                        [[m, k, v] for m, vals in sorted(every.items())
                         for k, v in sorted(vals.items())], header=not ctx.quiet))
        return
    if args.flag("unset") == (value is not None):
        raise InvalidArgument("give either a VALUE or --unset")
    now = ctx.conn.pool_override(pool, key, value, member=args.get("member"))
    if args.flag("json"):
        ctx.json(now)
        return
    who = args.get("member") or "this member"
    ctx.extra(f"Pool {pool}: {key} {'unset' if value is None else 'set'} for {who}")


COMMANDS = (
    Command("cluster-status", CLUSTER_GROUP, "the cluster's members, health and leases",
            "Returns the etcd endpoints and their health, quorum, the members with their "
            "sessions and leases, and this member's counters.", (JSON,), cluster_status),
    Command("pool-override", POOL_GROUP, "a cluster pool's per-member values",
            "Without KEY, lists each member's own values of the cluster-wide pool's "
            "host-local keys. With KEY and VALUE, sets a member's own value (this member's "
            "unless --member), with --unset removes it: that member's definition is the "
            "cluster's with its own values put in. Keys: target.path, source.device, "
            "source.host (comma-separated lists for the last two), source.initiator, and "
            "autostart (yes or no: whether that member starts the pool, whatever the "
            "cluster's mark).",
            (Opt("pool", "pool name", required=True), Opt("key", "the key"),
             Opt("value", "its value on that member"),
             Opt("member", "the member (default: this one)", positional=False),
             Opt("unset", "remove the member's own value", flag=True), JSON),
            pool_override),
    Command("vol-lease", VOLUME_GROUP, "take or renew a volume's cluster write lease",
            "Takes the cluster-wide write lease on a volume of a shared pool (or renews it "
            "for the same holder on this member), e.g. before a guest starts on it. It "
            "lasts --ttl seconds after the last renewal.",
            (POOL, VOL, HOLDER, Opt("ttl", "seconds the lease lasts unrenewed",
                                    positional=False), JSON), vol_lease),
    Command("vol-unlease", VOLUME_GROUP, "end a volume's cluster write lease",
            "Ends this member's lease on the volume; --force ends another member's (only "
            "when its holder is known to be dead).",
            (POOL, VOL, HOLDER, Opt("force", "end another member's lease", flag=True)),
            vol_unlease),
    Command("vol-lease-list", VOLUME_GROUP, "list the cluster's write leases",
            "Returns the write leases held in the cluster, of one pool's storage if given.",
            (Opt("pool", "pool name"), JSON), vol_lease_list),
)
