"""secret-* commands."""

from __future__ import annotations

import sys

from virtstore.cli.context import define_from_file, failing
from virtstore.cli.parser import XPATH_OPTS, Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.context import Context

GROUP = "Secret"

SECRET = Opt("secret", "secret UUID", required=True)


def _secret(ctx: Context, args: Args) -> str:
    """The secret's UUID, after virsh's lookup (and its message when there is none)."""
    uuid = args.req("secret")
    with failing(f"failed to get secret '{uuid}'"):
        ctx.conn.secret_info(uuid)
    return uuid


def secret_define(ctx: Context, args: Args) -> None:
    uuid = define_from_file(args, "Failed to set attributes from {}",
                            ctx.conn.secret_define_xml)[0]
    ctx.extra(f"Secret {uuid} created")


def secret_dumpxml(ctx: Context, args: Args) -> None:
    ctx.dump_xml(ctx.conn.secret_xml(_secret(ctx, args)), args)


def secret_undefine(ctx: Context, args: Args) -> None:
    uuid = _secret(ctx, args)
    with failing(f"Failed to delete secret {uuid}"):
        ctx.conn.secret_undefine(uuid)
    ctx.extra(f"Secret {uuid} deleted")


def secret_list(ctx: Context, args: Args) -> None:
    from virtstore.cli.output import table

    ephemeral = (None if args.flag("ephemeral") == args.flag("no-ephemeral")
                 else args.flag("ephemeral"))
    private = None if args.flag("private") == args.flag("no-private") else args.flag("private")
    secrets = [s for s in ctx.conn.list_secrets()
               if (ephemeral is None or s.ephemeral == ephemeral)
               and (private is None or s.private == private)]
    secrets.sort(key=lambda s: s.uuid)
    if args.flag("json"):
        ctx.json([s.to_dict() for s in secrets])
        return
    rows = [[s.uuid, f"{s.usage_type} {s.usage_id or ''}".rstrip() if s.usage_type
             else "Unused"] for s in secrets]
    ctx.print(table(["UUID", "Usage"], rows, header=not ctx.quiet))


def secret_set_value(ctx: Context, args: Args) -> None:
    import base64
    import binascii

    from virtstore.errors import InvalidArgument

    args.exclusive("file", "base64", "interactive")
    uuid = _secret(ctx, args)
    plain = args.flag("plain")
    data: bytes | None = None
    if args.get("file") is not None:
        path = args.req("file")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise InvalidArgument(f"Failed to open file '{path}': {err.strerror}") from None
    elif args.get("base64") is not None:
        data = args.req("base64").encode()
    elif args.flag("interactive") or sys.stdin.isatty():
        import getpass

        data = getpass.getpass("Enter new value for secret:").encode()
        plain = True
    if data is None:
        raise InvalidArgument("Input secret value is missing")
    if not plain:
        try:
            data = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("Invalid base64 data in secret value") from None
    if args.get("base64") is not None:
        ctx.warn("Passing secret value as command-line argument is insecure!")
    with failing("Failed to set secret value"):
        ctx.conn.secret_set_value(uuid, data)
    ctx.extra("Secret value set")


def secret_get_value(ctx: Context, args: Args) -> None:
    import base64

    value = ctx.conn.secret_get_value(_secret(ctx, args))
    if args.flag("plain"):
        # The bytes as they are; virsh's closing empty line (unless -q) follows them.
        ctx.out.flush()
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
        return
    ctx.print(base64.b64encode(value).decode())
    ctx.trailer = False


COMMANDS = (
    Command("secret-define", GROUP,
            "define or modify a secret from an XML file", "Define or modify a secret.",
            (Opt("file", "file containing secret attributes in XML", required=True),),
            secret_define),
    Command("secret-dumpxml", GROUP, "secret attributes in XML",
            "Output attributes of a secret as an XML dump to stdout.",
            (SECRET, *XPATH_OPTS), secret_dumpxml),
    Command("secret-set-value", GROUP, "set a secret value", "Set a secret value.",
            (SECRET, Opt("file", "read secret from file"),
             Opt("plain", "read the secret from file without converting from base64",
                 flag=True),
             Opt("interactive", "read the secret from the terminal", flag=True),
             Opt("base64", "base64-encoded secret value")), secret_set_value),
    Command("secret-get-value", GROUP, "Output a secret value",
            "Output a secret value to stdout.",
            (SECRET, Opt("plain", "get value without converting to base64", flag=True)),
            secret_get_value),
    Command("secret-undefine", GROUP, "undefine a secret", "Undefine a secret.", (SECRET,),
            secret_undefine),
    Command("secret-list", GROUP, "list secrets", "Returns a list of secrets", (
        Opt("ephemeral", "list ephemeral secrets", flag=True),
        Opt("no-ephemeral", "list non-ephemeral secrets", flag=True),
        Opt("private", "list private secrets", flag=True),
        Opt("no-private", "list non-private secrets", flag=True),
        Opt("json", "print a JSON document instead of text", flag=True)), secret_list),
)
