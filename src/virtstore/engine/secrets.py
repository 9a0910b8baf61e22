"""Secrets, as libvirt keeps them: XML definitions and base64 values, readable by root only.

Persistent secrets live in ``secrets/UUID.xml`` and ``secrets/UUID.base64`` (mode 0600 in
a 0700 directory). Ephemeral secrets never touch the disk: they live as long as the
Connection that defined them. Values never appear in XML, logs or error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import mmap
import os
import uuid as uuidlib

from virtstore.engine.names import check_uuid
from virtstore.engine.store import Store
from virtstore.errors import AlreadyExists, Forbidden, InternalError, NoSuchSecret
from virtstore.host.files import atomic_write, entries, read_bytes, remove_quietly
from virtstore.types import SecretInfo, record
from virtstore.xml import SecretDef, format_secret_xml, parse_secret_xml


@record
class Ephemeral:
    definition: SecretDef
    value: bytes | None = None


class EphemeralSecrets:
    """Ephemeral secrets, in this process's memory only. Changes are made under the
    store's write lock (SecretStore), reads at any time."""

    def __init__(self) -> None:
        self._items: dict[str, Ephemeral] = {}

    def load(self) -> dict[str, Ephemeral]:
        return dict(self._items)

    def put(self, uuid: str, item: Ephemeral) -> None:
        self._items[uuid] = item

    def drop(self, uuid: str) -> None:
        self._items.pop(uuid, None)


class SharedEphemeralSecrets(EphemeralSecrets):
    """The same in memory shared by a daemon's worker processes (made before they are
    forked), so that a secret defined through one worker is known to every one, for as
    long as the daemon runs."""

    SIZE = 8 << 20

    def __init__(self) -> None:
        from virtstore.engine.shared import SharedRegion

        super().__init__()
        self.region = SharedRegion(self.SIZE, "virtstore-secrets")

    @staticmethod
    def _read(mem: mmap.mmap) -> dict[str, Ephemeral]:
        size = int.from_bytes(mem[:8], "little")
        if not size:
            return {}
        items = json.loads(bytes(mem[8:8 + size]))
        return {u: Ephemeral(parse_secret_xml(x), None if v is None else base64.b64decode(v))
                for u, (x, v) in items.items()}

    def _write(self, mem: mmap.mmap, items: dict[str, Ephemeral]) -> None:
        data = json.dumps({u: [format_secret_xml(e.definition),
                               None if e.value is None else base64.b64encode(e.value).decode()]
                           for u, e in items.items()}).encode()
        if len(data) + 8 > self.SIZE:
            raise InternalError("no room left for ephemeral secrets")
        mem[8:8 + len(data)] = data
        mem[:8] = len(data).to_bytes(8, "little")

    def load(self) -> dict[str, Ephemeral]:
        with self.region.locked() as mem:
            return self._read(mem)

    def put(self, uuid: str, item: Ephemeral) -> None:
        with self.region.locked() as mem:
            items = self._read(mem)
            items[uuid] = item
            self._write(mem, items)

    def drop(self, uuid: str) -> None:
        with self.region.locked() as mem:
            items = self._read(mem)
            if items.pop(uuid, None) is not None:
                self._write(mem, items)


class SecretStore:
    def __init__(self, directory: str, store: Store,
                 ephemeral: EphemeralSecrets | None = None) -> None:
        self.dir = directory
        self.store = store  # its write lock serialises changes between processes
        self._ephemeral = ephemeral if ephemeral is not None else EphemeralSecrets()

    def _xml_path(self, uuid: str) -> str:
        return os.path.join(self.dir, uuid + ".xml")

    def _value_path(self, uuid: str) -> str:
        return os.path.join(self.dir, uuid + ".base64")

    def _persistent(self) -> dict[str, SecretDef]:
        out: dict[str, SecretDef] = {}
        for fn in sorted(entries(self.dir)):
            if not fn.endswith(".xml") or fn.startswith("."):
                continue
            data = read_bytes(os.path.join(self.dir, fn))
            if data is None:  # undefined meanwhile
                continue
            sdef = parse_secret_xml(data)
            if sdef.uuid:
                out[sdef.uuid] = sdef
        return out

    def _all(self) -> dict[str, SecretDef]:
        out = self._persistent()
        out.update({u: e.definition for u, e in self._ephemeral.load().items()})
        return out

    def _get(self, uuid: str) -> SecretDef:
        try:
            key = check_uuid(uuid)
        except Exception:
            key = uuid
        sdef = self._all().get(key)
        if sdef is None:
            raise NoSuchSecret(f"Secret not found: no secret with matching uuid '{uuid}'")
        return sdef

    def define(self, xml: str) -> str:
        sdef = parse_secret_xml(xml)
        sdef.uuid = check_uuid(sdef.uuid) if sdef.uuid else str(uuidlib.uuid4())
        with self.store.write():
            existing = self._all()
            for other in existing.values():
                if (other.uuid != sdef.uuid and sdef.usage_type
                        and other.usage_type == sdef.usage_type
                        and other.usage_id == sdef.usage_id):
                    raise AlreadyExists(f"operation failed: a secret with UUID {other.uuid} "
                                        f"already defined for use with {sdef.usage_id}")
            old = existing.get(sdef.uuid)
            if old is not None and old.ephemeral != sdef.ephemeral:
                raise AlreadyExists(f"operation failed: secret '{sdef.uuid}' is already "
                                    "defined with another ephemeral setting")
            if sdef.ephemeral:
                prev = self._ephemeral.load().get(sdef.uuid)
                self._ephemeral.put(sdef.uuid, Ephemeral(sdef, prev.value if prev else None))
            else:
                atomic_write(self._xml_path(sdef.uuid), format_secret_xml(sdef), 0o600)
        return sdef.uuid

    def list(self) -> list[SecretInfo]:
        return [self._to_info(s) for s in self._all().values()]

    def info(self, uuid: str) -> SecretInfo:
        return self._to_info(self._get(uuid))

    @staticmethod
    def _to_info(s: SecretDef) -> SecretInfo:
        return SecretInfo(uuid=s.uuid or "", usage_type=s.usage_type, usage_id=s.usage_id,
                          description=s.description, ephemeral=s.ephemeral, private=s.private)

    def xml(self, uuid: str) -> str:
        return format_secret_xml(self._get(uuid))

    def lookup_by_usage(self, usage_type: str, usage_id: str) -> str:
        for s in self._all().values():
            if s.usage_type == usage_type and s.usage_id == usage_id and s.uuid:
                return s.uuid
        raise NoSuchSecret(f"Secret not found: no secret with matching usage '{usage_id}'")

    def set_value(self, uuid: str, value: bytes) -> None:
        sdef = self._get(uuid)
        assert sdef.uuid is not None
        with self.store.write():
            if sdef.ephemeral:
                self._ephemeral.put(sdef.uuid, Ephemeral(sdef, bytes(value)))
            else:
                atomic_write(self._value_path(sdef.uuid), base64.b64encode(value), 0o600)

    def get_value(self, uuid: str, *, internal: bool = False) -> bytes:
        """The value; ``internal`` is for the engine's own use (LUKS, CHAP), private or not."""
        sdef = self._get(uuid)
        assert sdef.uuid is not None
        if sdef.private and not internal:
            raise Forbidden("operation forbidden: secret is private")
        if sdef.ephemeral:
            item = self._ephemeral.load().get(sdef.uuid)
            value = item.value if item is not None else None
        else:
            data = read_bytes(self._value_path(sdef.uuid))
            if data is None:
                value = None
            else:
                try:
                    value = base64.b64decode(data, validate=True)
                except binascii.Error as exc:
                    raise InternalError(f"secret '{sdef.uuid}' has a damaged value") from exc
        if value is None:
            raise NoSuchSecret(f"Secret not found: secret '{sdef.uuid}' does not have a value")
        return value

    def undefine(self, uuid: str) -> None:
        sdef = self._get(uuid)
        assert sdef.uuid is not None
        with self.store.write():
            if sdef.ephemeral:
                self._ephemeral.drop(sdef.uuid)
                return
            for path in (self._value_path(sdef.uuid), self._xml_path(sdef.uuid)):
                remove_quietly(path)
