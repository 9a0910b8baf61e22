"""``virtstore``: virsh's storage commands (pool-*, vol-*, secret-*) over a Connection.

Start-up time is part of every command's time, so this module and the command
tables import only the standard library's core; each command imports what it needs
(the engine, lxml, json) when it runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.parser import Command

PROG = "virtstore"

# Command groups in the order help lists them, with virsh's help keywords.
GROUPS = (("Storage Pool", "pool"), ("Storage Volume", "volume"), ("Secret", "secret"),
          ("Job", "job"), ("Event", "event"), ("Host", "host"))

USAGE = f"""\
{PROG} [options]... <command> [args...]

  options:
    -c | --connect=URI      connection URI (default: the embedded engine)
         --root=DIR         state directory of the embedded engine
                            (default: $VIRTSTORE_ROOT, /var/lib/virtstore as root,
                            the XDG data directory otherwise)
    -h | --help             this help
    -q | --quiet            quiet mode
         --json             the command's --json (listings, info, long operations)
    -v | --version          version
"""


# Which module holds each command, so that a command imports its own table only (the
# eleven tables together are a tenth of a one-row command's time). A test checks this
# against the modules' COMMANDS.
COMMAND_MODULES = {
    "pool_cmds": (
        "pool-list", "pool-info", "pool-dumpxml", "pool-define", "pool-define-as", "pool-create",
        "pool-create-as", "pool-build", "pool-start", "pool-destroy", "pool-delete",
        "pool-undefine", "pool-refresh", "pool-autostart", "pool-uuid", "pool-name",
        "pool-capabilities", "pool-import-libvirt",
    ),
    "vol_cmds": (
        "vol-list", "vol-info", "vol-dumpxml", "vol-create", "vol-create-as", "vol-delete",
        "vol-path", "vol-name", "vol-key", "vol-pool",
    ),
    "data_cmds": (
        "vol-clone", "vol-create-from", "vol-resize", "vol-wipe", "vol-upload", "vol-download",
        "vol-snapshot-create", "vol-snapshot-list", "vol-snapshot-revert", "vol-snapshot-delete",
    ),
    "guest_cmds": ("vol-disk-xml",),
    "secret_cmds": (
        "secret-define", "secret-dumpxml", "secret-set-value", "secret-get-value",
        "secret-undefine", "secret-list",
    ),
    "job_cmds": ("job-list", "job-info", "job-wait", "job-cancel", "event", "pool-event"),
    "host_cmds": ("host-list", "find-storage-pool-sources", "find-storage-pool-sources-as"),
    "nbd_cmds": ("nbd-export",),
    "inspect_cmds": ("vol-df", "pool-df", "vol-boot-files", "vol-inspect"),
    "backup_cmds": (
        "vol-backup", "vol-restore", "vol-import", "vol-move", "backup-verify", "backup-list",
        "guest-clone", "migrate-check", "guest-backup",
    ),
    "cluster_cmds": (
        "cluster-status", "pool-override", "vol-lease", "vol-unlease", "vol-lease-list",
    ),
}


def _table(module: str) -> tuple[Command, ...]:
    import importlib

    commands: tuple[Command, ...] = importlib.import_module(f"virtstore.cli.{module}").COMMANDS
    return commands


def find_command(name: str) -> Command | None:
    """One command, importing only the module that holds it."""
    module = next((m for m, names in COMMAND_MODULES.items() if name in names), None)
    if module is None:
        return None
    return next(c for c in _table(module) if c.name == name)


def commands() -> dict[str, Command]:
    """Every command, by name (help and usage list them all)."""
    return {cmd.name: cmd for module in COMMAND_MODULES for cmd in _table(module)}


def _group_listing(cmds: dict[str, Command], group: str, keyword: str, *,
                   colon: bool = True) -> str:
    lines = [f" {group} (help keyword '{keyword}'){':' if colon else ''}"]
    for cmd in sorted((c for c in cmds.values() if c.group == group), key=lambda c: c.name):
        lines.append(f"    {cmd.name:<30} {cmd.summary}")
    return "\n".join(lines) + "\n"


def help_all(cmds: dict[str, Command]) -> str:
    parts = ["Grouped commands:\n"]
    parts += [_group_listing(cmds, g, k) for g, k in GROUPS]
    parts.append(" Virtstore itself (help keyword 'virtstore'):\n"
                 f"    {'help':<30} print help\n")
    return "\n".join(parts)


def usage(cmds: dict[str, Command]) -> str:
    parts = [USAGE, "  commands (non interactive mode):\n"]
    parts += [_group_listing(cmds, g, k, colon=False) for g, k in GROUPS]
    return "\n".join(parts)


def help_command(cmds: dict[str, Command], topic: str | None) -> str:
    from virtstore.cli.parser import help_text
    from virtstore.errors import InvalidArgument

    if not topic:
        return help_all(cmds)
    if topic in cmds:
        return help_text(cmds[topic])
    for group, keyword in GROUPS:
        if topic in (group, keyword):
            return _group_listing(cmds, group, keyword)
    raise InvalidArgument(f"command or command group '{topic}' doesn't exist")


class _GlobalOptions:
    def __init__(self) -> None:
        self.uri: str | None = None
        self.root: str | None = None
        self.quiet = False
        self.help = False
        self.version = False
        self.json = False


def parse_global(argv: Sequence[str]) -> tuple[_GlobalOptions, list[str]]:
    """Options before the command name, as virsh takes them; the rest is the command."""
    from virtstore.errors import InvalidArgument

    opts = _GlobalOptions()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            if arg == "--":
                i += 1
            break
        i += 1
        if arg.startswith("--"):
            name, eq, inline = arg.partition("=")
        else:  # -cURI as well as -c URI
            name, inline = arg[:2], arg[2:]
            eq = "=" if inline else ""
        if name in ("-c", "--connect", "--root"):
            if eq:
                value = inline
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise InvalidArgument(f"option '{name}' requires an argument")
            if name == "--root":
                opts.root = value
            else:
                opts.uri = value
        elif arg in ("-q", "--quiet"):
            opts.quiet = True
        elif arg == "--json":  # the command's --json, given before its name
            opts.json = True
        elif arg in ("-h", "--help"):
            opts.help = True
        elif arg in ("-v", "-V", "--version", "--version=short", "--version=long"):
            opts.version = True
        else:
            raise InvalidArgument(f"unsupported option '{arg}'. See --help.")
    return opts, list(argv[i:])


def run(argv: Sequence[str]) -> int:
    """Run one command line; raises VirtstoreError for the caller to report."""
    from virtstore.cli.context import Context
    from virtstore.cli.parser import help_text, parse
    from virtstore.errors import InvalidArgument

    opts, rest = parse_global(argv)
    if opts.version:
        from virtstore import __version__

        sys.stdout.write(f"{__version__}\n")
        return 0
    if opts.help or not rest:
        sys.stdout.write(usage(commands()))
        return 0
    name, cmd_argv = rest[0], rest[1:]
    if name == "help":
        if len(cmd_argv) > 1:
            raise InvalidArgument(f"unexpected data '{cmd_argv[1]}'")
        sys.stdout.write(help_command(commands(), cmd_argv[0] if cmd_argv else None))
        if not opts.quiet:
            sys.stdout.write("\n")
        return 0
    cmd = find_command(name)
    if cmd is None:
        raise InvalidArgument(f"unknown command: '{name}'")
    if "--help" in cmd_argv[:cmd_argv.index("--") if "--" in cmd_argv else None]:
        sys.stdout.write(help_text(cmd) + ("" if opts.quiet else "\n"))
        return 0
    if opts.json:
        if not any(o.name == "json" for o in cmd.opts):
            raise InvalidArgument(f"command '{name}' doesn't support option --json")
        if "--json" not in cmd_argv:
            cmd_argv = ["--json", *cmd_argv]
    args = parse(cmd, cmd_argv)
    ctx = Context(uri=opts.uri, root=opts.root, quiet=opts.quiet)
    try:
        status = cmd.run(ctx, args) or 0
    finally:
        ctx.close()
    if ctx.trailer and not ctx.quiet:
        ctx.out.write("\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    from virtstore.cli.context import CommandFailed
    from virtstore.errors import VirtstoreError

    if argv is None:
        argv = sys.argv[1:]
    try:
        status = run(argv)
        sys.stdout.flush()
        return status
    except CommandFailed as err:
        sys.stdout.flush()
        sys.stderr.write(f"error: {err.what}\nerror: {err.cause}\n")
        return 1
    except VirtstoreError as err:
        sys.stdout.flush()
        sys.stderr.write(f"error: {err}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (``virtstore vol-list p | head``): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as err:
        # e.g. a state root the user may not write: one line, like every other failure.
        sys.stdout.flush()
        where = f": '{err.filename}'" if err.filename else ""
        sys.stderr.write(f"error: {err.strerror or err}{where}\n")
        return 1
    except Exception as err:
        if os.environ.get("VIRTSTORE_DEBUG"):
            raise
        sys.stdout.flush()
        detail = " ".join(str(err).split())
        sys.stderr.write(f"error: internal error: {type(err).__name__}: {detail} "
                         "(set VIRTSTORE_DEBUG=1 for the traceback)\n")
        return 1


# Commands that only read and print: nothing of theirs is left to flush or wait for when
# they return, so the ``virtstore`` command may end without the interpreter's teardown.
QUICK_EXIT = frozenset({
    "vol-info", "vol-path", "vol-key", "vol-name", "vol-pool", "vol-dumpxml", "vol-list",
    "pool-info", "pool-list", "pool-dumpxml", "pool-uuid", "pool-name", "help",
})


def entry() -> None:
    """The ``virtstore`` command: ``main()``, then, after a read-only command, the
    process ends at once. The interpreter's teardown (modules, objects, the garbage
    collector) is about a tenth of such a command's time and does nothing useful there;
    it still runs when a thread or an exit handler could be waiting for it."""
    from virtstore.errors import VirtstoreError

    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        opts, rest = parse_global(sys.argv[1:])
    except (OSError, ValueError, VirtstoreError):
        sys.exit(status)  # the usual way, which reports a closed pipe as Python does
    import atexit

    callbacks = getattr(atexit, "_ncallbacks", None)
    if ((opts.help or opts.version or not rest or rest[0] in QUICK_EXIT)
            and "threading" not in sys.modules and callbacks is not None
            and callbacks() == 0):
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
