"""Cluster commands: the members and health of the etcd cluster this engine belongs to,
and the write leases on shared volumes (``vol-lease`` before a guest starts on one).

The embedded engine joins the cluster named by VIRTSTORE_CLUSTER (etcd endpoints,
comma-separated) as VIRTSTORE_CLUSTER_MEMBER (default the host name).
"""

from __future__ import annotations

from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.context import Context

CLUSTER_GROUP = "Host"
VOLUME_GROUP = "Storage Volume"

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
        ("Cluster leases", str(st["leases"]))]))
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


COMMANDS = (
    Command("cluster-status", CLUSTER_GROUP, "the cluster's members, health and leases",
            "Returns the etcd endpoints and their health, quorum, the members with their "
            "sessions and leases, and this member's counters.", (JSON,), cluster_status),
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
