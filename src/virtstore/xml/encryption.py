"""<encryption> of a volume target (formatstorageencryption)."""

from __future__ import annotations

from virtstore.errors import XMLError
from virtstore.xml.auth import format_secret_ref, parse_secret_ref
from virtstore.xml.model import Encryption, EncryptionSecret
from virtstore.xml.values import parse_int, shown
from virtstore.xml.writer import Writer, esc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

ENCRYPTION_FORMATS = ("default", "qcow", "luks", "luks2")
ENCRYPTION_ENGINES = ("qemu", "librbd")
SECRET_TYPES = ("passphrase",)


def _one_of(node: etree._Element, attr: str, allowed: tuple[str, ...], what: str,
            bad: str) -> str:
    """``attr``, which must be given and one of ``allowed``, with libvirt's messages."""
    value = node.get(attr)
    if not value:
        raise XMLError(f"unknown volume encryption {what}")
    if value not in allowed:
        raise XMLError(f"unknown volume encryption {bad} {shown(value)}")
    return value


def _parse_secret(node: etree._Element) -> EncryptionSecret:
    kind = _one_of(node, "type", SECRET_TYPES, "secret type", "secret type")
    uuid, usage = parse_secret_ref(node)
    return EncryptionSecret(type=kind, uuid=uuid, usage=usage)


def _parse_cipher(node: etree._Element) -> dict[str, str]:
    name = node.get("name")
    if name is None:
        raise XMLError("cipher info missing 'name' attribute")
    size = node.get("size")
    if size is None:
        raise XMLError("Missing required attribute 'size' in element 'cipher'")
    value = parse_int(size)
    if value is None or not 0 <= value <= 2**32 - 1:
        raise XMLError(f"Invalid value for attribute 'size' in element 'cipher': "
                       f"'{shown(size)}'. Expected non-negative integer value")
    cipher = {"name": name, "size": str(value)}
    for attr in ("mode", "hash"):
        if node.get(attr) is not None:
            cipher[attr] = node.get(attr, "")
    return cipher


def parse_encryption(node: etree._Element) -> Encryption:
    fmt = _one_of(node, "format", ENCRYPTION_FORMATS, "format", "format type")
    engine = node.get("engine")
    if engine is not None and engine not in ENCRYPTION_ENGINES:
        raise XMLError(f"Invalid value for attribute 'engine' in element 'encryption': "
                       f"'{shown(engine)}'.")
    enc = Encryption(format=fmt, engine=engine,
                     secrets=[_parse_secret(s) for s in node.findall("secret")])
    if fmt == "luks":
        cipher = node.find("cipher")
        if cipher is not None:
            enc.cipher = _parse_cipher(cipher)
        ivgen = node.find("ivgen")
        if ivgen is not None:
            if enc.cipher is None:
                raise XMLError("ivgen element found, but cipher is missing")
            name = ivgen.get("name")
            if name is None:
                raise XMLError("missing ivgen info name string")
            enc.ivgen = {"name": name}
            if ivgen.get("hash") is not None:
                enc.ivgen["hash"] = ivgen.get("hash", "")
    return enc


def format_encryption(out: Writer, enc: Encryption) -> None:
    engine = f" engine='{esc(enc.engine)}'" if enc.engine else ""
    out.open(f"<encryption format='{esc(enc.format)}'{engine}>")
    for secret in enc.secrets:
        format_secret_ref(out, secret.type, secret.uuid, secret.usage)
    if enc.format == "luks" and enc.cipher is not None:
        line = f"<cipher name='{esc(enc.cipher.get('name', ''))}' " \
               f"size='{esc(enc.cipher.get('size', '0'))}'"
        for attr in ("mode", "hash"):
            if attr in enc.cipher:
                line += f" {attr}='{esc(enc.cipher[attr])}'"
        out.line(line + "/>")
        if enc.ivgen is not None:
            line = f"<ivgen name='{esc(enc.ivgen.get('name', ''))}'"
            if "hash" in enc.ivgen:
                line += f" hash='{esc(enc.ivgen['hash'])}'"
            out.line(line + "/>")
    out.close("</encryption>")
