"""nbd-export: serve a volume over NBD until interrupted (the embedded engine only: the
server runs on the storage host, beside the volume)."""

from __future__ import annotations

from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.context import Context

GROUP = "Storage Volume"


def nbd_export(ctx: Context, args: Args) -> None:
    import signal
    import threading

    from virtstore.cli.lookup import volume
    from virtstore.errors import InvalidArgument

    conn = ctx.conn
    vol = volume(conn, args.req("vol"), args.get("pool"))
    port = args.get("port")
    host = args.get("host")
    if port is not None and host is None:
        host = "127.0.0.1"
    try:
        port_no = int(port) if port is not None else None
    except ValueError:
        raise InvalidArgument(f"invalid port '{port}'") from None
    done = threading.Event()
    old = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with conn.volume_export_nbd(vol.pool, vol.name, socket_path=args.get("socket"),
                                    host=host, port=port_no, read_only=args.flag("read-only"),
                                    export_name=args.get("name")) as exp:
            ctx.print(exp.url)
            ctx.out.flush()
            while not done.wait(0.5):
                if not exp.running:
                    raise InvalidArgument("qemu-nbd stopped serving")
    finally:
        for s, h in old.items():
            signal.signal(s, h)


COMMANDS = (
    Command("nbd-export", GROUP, "export a volume over NBD",
            "Serve the volume's guest-visible content over NBD (qemu-nbd) until interrupted; "
            "prints the export's URL. A unix socket with --socket, else TCP on --host/--port "
            "(default 127.0.0.1, a free port). The volume stays locked while exported.",
            (Opt("vol", "vol name, key or path", required=True), Opt("pool", "pool name or uuid"),
             Opt("socket", "unix socket path to listen on", positional=False),
             Opt("host", "address to listen on (TCP)", positional=False),
             Opt("port", "TCP port to listen on", positional=False),
             Opt("name", "export name (default: the volume's name)", positional=False),
             Opt("read-only", "export read-only", flag=True)), nbd_export),
)
