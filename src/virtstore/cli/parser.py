"""virsh's command-line grammar: option tables, parsing and per-command help.

virsh does not follow getopt conventions, and scripts written for it rely on its rules:

* ``--opt value`` and ``--opt=value`` both work; only a token starting with ``--`` is an
  option, so ``-5G`` is data (and gets a size error, not an "unknown option" one);
* a bare word fills the next string option that is still unset, in the order the
  command declares them (``vol-info a.img p1`` means ``--vol a.img --pool p1``;
  ``pool-define-as q dir HOST PATH`` fills ``--source-host`` and ``--source-path``);
* ``--`` ends options: everything after it is data.

argparse cannot express the second rule, so this module does it, with virsh's wording
for the errors. It imports nothing beyond the standard library's core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from virtstore.errors import InvalidArgument

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.context import Context

Value = str | bool | None


class Opt:
    """One option of a command. ``flag`` options are booleans, the others take a string."""

    # A plain class, not a NamedTuple: the typing module is a fifth of a command's
    # start-up, and every command table builds these.
    __slots__ = ("flag", "help", "name", "positional", "required")

    def __init__(self, name: str, help: str, flag: bool = False, required: bool = False,
                 positional: bool = True) -> None:
        self.name = name
        self.help = help
        self.flag = flag
        self.required = required
        self.positional = positional  # string options only: may be given as a bare word


class Command:
    __slots__ = ("description", "group", "name", "opts", "run", "summary")

    def __init__(self, name: str, group: str, summary: str, description: str,
                 opts: tuple[Opt, ...], run: Callable[[Context, Args], int | None]) -> None:
        self.name = name
        self.group = group
        self.summary = summary
        self.description = description
        self.opts = opts
        self.run = run


XPATH_OPTS = (
    Opt("xpath", "xpath expression to filter the XML document", positional=False),
    Opt("wrap", "wrap xpath results in an common root element", flag=True),
)


class Args:
    """Parsed options of one command: strings, booleans and None for "not given"."""

    def __init__(self, command: Command, values: dict[str, Value]) -> None:
        self.command = command
        self.values = values

    def get(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is None or isinstance(value, bool):
            return None
        return value

    def req(self, name: str) -> str:
        value = self.get(name)
        if value is None:  # guarded by the parser for required options
            raise InvalidArgument(f"command '{self.command.name}' requires <{name}> option")
        return value

    def flag(self, name: str) -> bool:
        return self.values.get(name) is True

    def exclusive(self, *names: str) -> None:
        """virsh's VSH_EXCLUSIVE_OPTIONS: at most one of the named options."""
        given = [n for n in names if self.values.get(n) not in (None, False)]
        if len(given) > 1:
            raise InvalidArgument(
                f"Options --{given[0]} and --{given[1]} are mutually exclusive")


def parse(command: Command, argv: Sequence[str]) -> Args:
    by_name = {o.name: o for o in command.opts}
    values: dict[str, Value] = {}
    only_data = False
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not only_data and token == "--":
            only_data = True
            continue
        if not only_data and token.startswith("--") and len(token) > 2:
            name, eq, inline = token[2:].partition("=")
            opt = by_name.get(name)
            if opt is None:
                raise InvalidArgument(
                    f"command '{command.name}' doesn't support option --{name}")
            if name in values:
                raise InvalidArgument(f"option --{name} already seen")
            if opt.flag:
                if eq:
                    raise InvalidArgument(f"option --{name} does not take a value")
                values[name] = True
                continue
            if eq:
                values[name] = inline
            elif i < len(argv):
                values[name] = argv[i]
                i += 1
            else:
                raise InvalidArgument(f"expected syntax: --{name} <string>")
            continue
        slot = next((o for o in command.opts
                     if not o.flag and o.positional and o.name not in values), None)
        if slot is None:
            raise InvalidArgument(f"unexpected data '{token}'")
        values[slot.name] = token
    for opt in command.opts:
        if opt.required and opt.name not in values:
            raise InvalidArgument(f"command '{command.name}' requires <{opt.name}> option")
    return Args(command, values)


def synopsis(command: Command) -> str:
    parts = [command.name]
    for opt in command.opts:
        if opt.flag:
            parts.append(f"[--{opt.name}]")
        elif opt.required:
            parts.append(f"<{opt.name}>")
        else:
            parts.append(f"[--{opt.name} <string>]")
    return " ".join(parts)


def help_text(command: Command) -> str:
    """Per-command help laid out as ``virsh help COMMAND`` prints it."""
    lines = ["  NAME", f"    {command.name} - {command.summary}", "",
             "  SYNOPSIS", f"    {synopsis(command)}", ""]
    if command.description:
        lines += ["  DESCRIPTION", f"    {command.description}", ""]
    if command.opts:
        lines.append("  OPTIONS")
        for opt in command.opts:
            if opt.flag:
                left = f"--{opt.name}"
            elif opt.required:
                left = f"[--{opt.name}] <string>"
            else:
                left = f"--{opt.name} <string>"
            lines.append(f"    {left:<15}  {opt.help}")
        lines.append("")
    return "\n".join(lines) + "\n"
