"""job-* commands (list, inspect, wait for and cancel long operations) and ``event``.

Jobs live in the engine's shared store, so these work on jobs started by any other
process on the same state root: ``job-cancel`` from a second shell stops a clone the
first one is waiting for.
"""

from __future__ import annotations

from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.api import Event, JobInfo
    from virtstore.cli.context import Context

JOB_GROUP = "Job"
EVENT_GROUP = "Event"

JOB_ID = Opt("id", "job id", required=True)
JSON = Opt("json", "print a JSON document instead of text", flag=True)


def _where(pool: str | None, volume: str | None) -> str:
    if pool and volume:
        return f"{pool}/{volume}"
    return volume or pool or "-"


def _volumes(job: JobInfo) -> str:
    where = _where(job.pool, job.volume)
    if job.target_volume and (job.target_volume, job.target_pool) != (job.volume, job.pool):
        return f"{where} -> {_where(job.target_pool or job.pool, job.target_volume)}"
    return where


def _percent(job: JobInfo) -> str:
    if job.bytes_total > 0:
        return f"{min(100.0, 100.0 * job.bytes_done / job.bytes_total):.0f}%"
    return "100%" if job.state == "done" else "-"


def _rate(rate: float | int | None) -> str:
    from virtstore.cli.output import pretty_size

    return f"{pretty_size(int(rate))}/s" if rate else "-"


def _time(ts: float | None) -> str:
    import time

    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))


def job_list(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import table

    jobs = ctx.conn.list_jobs(include_finished=args.flag("all"))
    if args.flag("json"):
        ctx.json([j.to_dict() for j in jobs])
        return
    rows = [[j.id, j.kind, j.state, _volumes(j), _percent(j), _rate(j.rate)] for j in jobs]
    ctx.print(table(["Id", "Kind", "State", "Volume", "Progress", "Rate"], rows,
                    header=not ctx.quiet))


def job_info(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import info_block, pretty_size

    job = ctx.conn.job_info(args.req("id"))
    if args.flag("json"):
        ctx.json(job.to_dict())
        return
    pairs = [("Id", job.id), ("Kind", job.kind), ("State", job.state),
             ("Volume", _where(job.pool, job.volume))]
    if job.target_volume:
        pairs.append(("Target", _where(job.target_pool or job.pool, job.target_volume)))
    done = f"{pretty_size(job.bytes_done)}"
    if job.bytes_total:
        done += f" of {pretty_size(job.bytes_total)} ({_percent(job)})"
    pairs += [("Progress", done), ("Rate", _rate(job.rate)),
              ("Bandwidth", _rate(job.bandwidth) if job.bandwidth else "unlimited"),
              ("Started", _time(job.started)), ("Ended", _time(job.ended))]
    if job.started is not None and job.ended is not None:
        pairs.append(("Elapsed", f"{job.ended - job.started:.1f} s"))
    if job.error:
        pairs.append(("Error", job.error))
    ctx.print(info_block(pairs))


def job_wait(ctx: Context, args: Args) -> None:
    from virtstore.cli.progress import run_job

    job = ctx.conn.job_info(args.req("id"))
    job = run_job(ctx, job, json_lines=args.flag("json"))
    if not args.flag("json"):
        ctx.extra(f"Job {job.id} completed")


# How long job-cancel waits for the job to stop before saying the request is made.
CANCEL_WAIT = 10.0


def job_cancel(ctx: Context, args: Args) -> None:
    from virtstore.errors import OperationInvalid

    conn = ctx.conn
    job_id = args.req("id")
    conn.job_cancel(job_id)
    job = conn.job_wait(job_id, timeout=CANCEL_WAIT)
    if job.state == "cancelled":
        ctx.extra(f"Job {job_id} cancelled")
    elif not job.finished:
        ctx.extra(f"Job {job_id} cancel requested")
    else:
        raise OperationInvalid(f"Requested operation is not valid: job '{job_id}' is "
                               f"already {job.state}")


# -- events --------------------------------------------------------------------

# virsh's names for lifecycle events (virshPoolEventToString and friends).
_LIFECYCLE = {"defined": "Defined", "undefined": "Undefined", "started": "Started",
              "stopped": "Stopped", "created": "Created", "deleted": "Deleted"}
EVENT_TYPES = ("lifecycle", "refresh", "job")


def event_type(ev: Event) -> str:
    if ev.kind == "job":
        return "job"
    return "refresh" if ev.action == "refreshed" else "lifecycle"


def event_text(ev: Event) -> str:
    """One event as virsh prints pool events: ``event 'lifecycle' for storage pool p:
    Started``; volumes and jobs in the same shape."""
    etype = event_type(ev)
    if ev.kind == "job":
        job = ev.job
        subject = f"job {ev.name or (job.id if job else '?')}"
        if job is None:
            return f"event 'job' for {subject}: {ev.action}"
        subject += f" ({job.kind} {_volumes(job)})"
        if ev.action == "progress":
            return f"event 'job' for {subject}: progress {_percent(job)}"
        detail = f": {job.error}" if ev.action == "failed" and job.error else ""
        return f"event 'job' for {subject}: {ev.action.capitalize()}{detail}"
    if ev.kind == "volume":
        subject = f"storage vol {ev.name} in pool {ev.pool}"
    else:
        subject = f"storage pool {ev.name or ev.pool}"
    if etype == "refresh":
        return f"event 'refresh' for {subject}"
    return f"event 'lifecycle' for {subject}: {_LIFECYCLE.get(ev.action, ev.action)}"


def _pools_of(ev: Event) -> tuple[str | None, ...]:
    if ev.kind == "job" and ev.job is not None:
        return (ev.job.pool, ev.job.target_pool)
    return (ev.pool,)


def _stamp(ts: float) -> str:
    """virsh's --timestamp prefix: ``2024-01-31 12:00:00.123+0000: ``."""
    import time

    whole = int(ts)
    ms = int((ts - whole) * 1000)
    return (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole)) + f".{ms:03d}+0000: ")


def _timeout(args: Args) -> float | None:
    from virtstore.errors import InvalidArgument

    text = args.get("timeout")
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidArgument(f"Numeric value '{text}' for <timeout> option is malformed or "
                              "out of range")
    return float(value)


def event(ctx: Context, args: Args) -> int:
    return _event_loop(ctx, args, EVENT_TYPES)


def pool_event(ctx: Context, args: Args) -> int:
    """virsh's pool-event: pool lifecycle and refresh events only, and an event type
    (or --list) is required."""
    from virtstore.errors import InvalidArgument

    if not args.flag("list") and args.get("event") is None:
        raise InvalidArgument("either --list or --event <type> is required")
    return _event_loop(ctx, args, POOL_EVENT_TYPES, kinds=("pool",))


POOL_EVENT_TYPES = ("lifecycle", "refresh")


def _event_loop(ctx: Context, args: Args, types: tuple[str, ...],
                kinds: tuple[str, ...] = ("pool", "volume", "job")) -> int:
    import time

    from virtstore.errors import InvalidArgument

    if args.flag("list"):
        for name in types:
            ctx.print(name)
        return 0
    wanted = args.get("event")
    if wanted is not None and wanted not in types:
        raise InvalidArgument(f"unknown event type {wanted}")
    timeout = _timeout(args)
    loop = args.flag("loop")
    as_json = args.flag("json")
    conn = ctx.conn
    pool = args.get("pool")
    if pool is not None:
        from virtstore.cli.lookup import pool_name

        pool = pool_name(conn, pool)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = conn.latest_event_id()
    count = 0
    outcome = ""
    if as_json:
        ctx.trailer = False
    try:
        while True:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                outcome = "event loop timed out"
                break
            for ev in conn.events_since(last, timeout=min(wait, 1.0)):
                last = ev.id
                if ev.kind not in kinds:
                    continue
                if wanted is not None and event_type(ev) != wanted:
                    continue
                if pool is not None and pool not in _pools_of(ev):
                    continue
                count += 1
                if as_json:
                    import json

                    ctx.out.write(json.dumps(ev.to_dict()) + "\n")
                else:
                    stamp = _stamp(ev.time) if args.flag("timestamp") else ""
                    ctx.out.write(stamp + event_text(ev) + "\n")
                ctx.out.flush()
                if not loop:
                    break
            if count and not loop:
                break
    except KeyboardInterrupt:
        outcome = "event loop interrupted"
    if not as_json:
        if outcome:
            ctx.print(outcome)
        ctx.print(f"events received: {count}")
    # As virsh: success when at least one event came.
    return 0 if count else 1


def _event_opts(event_help: str) -> tuple[Opt, ...]:
    return (Opt("pool", "filter by storage pool name or uuid"), Opt("event", event_help),
            Opt("loop", "loop until timeout or interrupt, rather than one-shot", flag=True),
            Opt("timeout", "timeout seconds"), Opt("list", "list valid event types", flag=True),
            Opt("timestamp", "show timestamp for each printed event", flag=True))


COMMANDS = (
    Command("job-list", JOB_GROUP, "list jobs",
            "Returns the running jobs, or all the recorded ones with --all.",
            (Opt("all", "list finished jobs too", flag=True), JSON), job_list),
    Command("job-info", JOB_GROUP, "job information",
            "Returns the state and progress of a job.", (JOB_ID, JSON), job_info),
    Command("job-wait", JOB_GROUP, "wait for a job to finish",
            "Wait for a job, showing its progress; fails if the job fails. Ctrl-C cancels "
            "the job.",
            (JOB_ID, Opt("json", "print the job's progress as JSON lines", flag=True)),
            job_wait),
    Command("job-cancel", JOB_GROUP, "cancel a job",
            "Cancel a running job; what it was making is removed.", (JOB_ID,), job_cancel),
    Command("event", EVENT_GROUP, "Storage Events",
            "List event types, or wait for pool, volume and job events to occur",
            (*_event_opts("which event type to wait for (lifecycle, refresh, job)"),
             Opt("json", "print each event as a JSON object on one line", flag=True)), event),
    Command("pool-event", "Storage Pool", "Storage Pool Events",
            "List event types, or wait for storage pool events to occur",
            _event_opts("which event type to wait for"), pool_event),
)
