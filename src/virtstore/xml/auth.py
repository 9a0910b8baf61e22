"""<auth> of iscsi/rbd pool sources and the <secret uuid|usage> reference it holds."""

from __future__ import annotations

from virtstore.errors import XMLError
from virtstore.xml.model import Auth, AuthSecret
from virtstore.xml.values import parse_uuid, shown
from virtstore.xml.writer import Writer, esc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

AUTH_TYPES = ("chap", "ceph")


def parse_secret_ref(node: etree._Element) -> tuple[str | None, str | None]:
    """(uuid, usage) of a secret reference: exactly one of them is set."""
    uuid = node.get("uuid")
    usage = node.get("usage")
    if uuid is None and usage is None:
        raise XMLError("missing secret uuid or usage attribute")
    if uuid is not None and usage is not None:
        raise XMLError("either secret uuid or usage expected")
    if uuid is not None:
        canonical = parse_uuid(uuid)
        if canonical is None:
            raise XMLError(f"invalid secret uuid '{shown(uuid)}'")
        return canonical, None
    return None, usage


def format_secret_ref(out: Writer, kind: str | None, uuid: str | None,
                      usage: str | None) -> None:
    attrs = f" type='{esc(kind)}'" if kind is not None else ""
    if uuid is not None:
        attrs += f" uuid='{esc(uuid)}'"
    elif usage is not None:
        attrs += f" usage='{esc(usage)}'"
    out.line(f"<secret{attrs}/>")


def parse_auth(node: etree._Element) -> Auth:
    username = node.get("username")
    if not username:
        raise XMLError("missing username for auth")
    kind = node.get("type")
    if kind is None or kind == "":
        raise XMLError("storage pool missing auth type")
    if kind not in AUTH_TYPES:
        raise XMLError(f"unknown auth type '{shown(kind)}'")
    secret = node.find("secret")
    if secret is None:
        raise XMLError("Missing <secret> element in auth")
    uuid, usage = parse_secret_ref(secret)
    return Auth(type=kind, username=username,
                secret=AuthSecret(uuid=uuid, usage=usage, type=secret.get("type")))


def format_auth(out: Writer, auth: Auth) -> None:
    out.open(f"<auth type='{esc(auth.type)}' username='{esc(auth.username)}'>")
    format_secret_ref(out, auth.secret.type, auth.secret.uuid, auth.secret.usage)
    out.close("</auth>")
