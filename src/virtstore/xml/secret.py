"""libvirt's secret XML (<secret>), referenced by pool auth and volume encryption."""

from __future__ import annotations

from virtstore.errors import XMLError
from virtstore.xml.model import SecretDef
from virtstore.xml.safe import parse_document
from virtstore.xml.values import parse_uuid, shown, text_of
from virtstore.xml.writer import Writer, esc

# usage type -> (element holding the usage id, what libvirt calls it in errors)
USAGE_ELEMENTS: dict[str, tuple[str, str]] = {
    "volume": ("volume", "volume usage specified, but volume path is missing"),
    "ceph": ("name", "Ceph usage specified, but name is missing"),
    "iscsi": ("target", "iSCSI usage specified, but target is missing"),
    "tls": ("name", "TLS usage specified, but name is missing"),
    "vtpm": ("name", "vTPM usage specified, but name is missing"),
}
USAGE_TYPES = ("none", *USAGE_ELEMENTS)


def _yes_no_attr(value: str | None, attr: str) -> bool:
    if not value:
        return False
    if value not in ("yes", "no"):
        raise XMLError(f"invalid value of '{attr}'")
    return value == "yes"


def parse_secret_xml(text: str | bytes) -> SecretDef:
    """Parse a <secret> as libvirt's virSecretDefParseString; the uuid stays None when
    absent (the caller generates one when it defines the secret)."""
    root = parse_document(text, "secret", "(definition_of_secret)")
    secret = SecretDef(ephemeral=_yes_no_attr(root.get("ephemeral"), "ephemeral"),
                       private=_yes_no_attr(root.get("private"), "private"))
    raw_uuid = text_of(root, "uuid")
    if raw_uuid is not None:
        secret.uuid = parse_uuid(raw_uuid)
        if secret.uuid is None:
            raise XMLError("malformed uuid element")
    secret.description = text_of(root, "description")
    usage = root.find("usage")
    if usage is not None:
        kind = usage.get("type")
        if not kind:
            raise XMLError("unknown secret usage type")
        if kind not in USAGE_TYPES:
            raise XMLError(f"unknown secret usage type {shown(kind)}")
        secret.usage_type = kind
        if kind in USAGE_ELEMENTS:
            element, missing = USAGE_ELEMENTS[kind]
            secret.usage_id = text_of(usage, element)
            if secret.usage_id is None:
                raise XMLError(missing)
    return secret


def format_secret_xml(secret: SecretDef) -> str:
    """Print a secret as libvirt's virSecretDefFormat."""
    out = Writer()
    out.open(f"<secret ephemeral='{'yes' if secret.ephemeral else 'no'}' "
             f"private='{'yes' if secret.private else 'no'}'>")
    if secret.uuid is not None:
        out.line(f"<uuid>{esc(secret.uuid)}</uuid>")
    if secret.description is not None:
        out.line(f"<description>{esc(secret.description)}</description>")
    kind = secret.usage_type
    if kind is not None and kind != "none":
        if kind not in USAGE_ELEMENTS:
            raise XMLError(f"unexpected secret usage type {shown(kind)}")
        out.open(f"<usage type='{kind}'>")
        if secret.usage_id is not None:
            element = USAGE_ELEMENTS[kind][0]
            out.line(f"<{element}>{esc(secret.usage_id)}</{element}>")
        out.close("</usage>")
    out.close("</secret>")
    return out.text()
