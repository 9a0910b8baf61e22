"""What the iscsi and iscsi-direct backends share: where the target is, and its CHAP login."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from virtstore.backends._net_utils import SecretLookup, auth_secret
from virtstore.errors import InvalidArgument
from virtstore.host.iscsi import Credentials, Portal
from virtstore.host.nbd import secret_object
from virtstore.xml import PoolDef

VOL_NAME_PREFIX = "unit:0:0:"  # libvirt's names for the LUNs of a target


def portal(pool: PoolDef) -> Portal:
    if not pool.source.hosts:
        raise InvalidArgument("missing source host for iSCSI pool")
    h = pool.source.hosts[0]
    return Portal(h.name, h.port or 3260)


def target(pool: PoolDef) -> str:
    if not pool.source.devices or not pool.source.devices[0].path:
        raise InvalidArgument("missing source device path (the target IQN) for iSCSI pool")
    return pool.source.devices[0].path


def initiator(pool: PoolDef) -> str:
    if pool.source.initiator_iqn:
        return pool.source.initiator_iqn
    if pool.type == "iscsi-direct":
        raise InvalidArgument("missing initiator IQN for iscsi-direct pool")
    return "iqn.2004-10.org.virtstore:initiator"


def credentials(pool: PoolDef, secrets: SecretLookup) -> Credentials | None:
    creds = auth_secret(pool, "chap", secrets)
    if creds is None:
        return None
    return Credentials(username=creds[0], password=creds[1])


def lun_of(name: str) -> int:
    if not name.startswith(VOL_NAME_PREFIX):
        raise InvalidArgument(f"'{name}' is not a LUN volume name (unit:0:0:N)")
    try:
        return int(name[len(VOL_NAME_PREFIX):])
    except ValueError:
        raise InvalidArgument(f"'{name}' is not a LUN volume name (unit:0:0:N)") from None


def volume_path(pool: PoolDef, lun: int) -> str:
    """libvirt's path and key of a LUN: ``ip-HOST:PORT-iscsi-IQN-lun-N``."""
    return f"ip-{portal(pool)}-iscsi-{target(pool)}-lun-{lun}"


@contextlib.contextmanager
def qemu_image_opts(pool: PoolDef, lun: int,
                    secrets: SecretLookup) -> Iterator[tuple[str, list[str]]]:
    """``--image-opts`` and ``--object`` arguments for qemu to open one LUN; the CHAP
    secret goes through a file readable by root only, removed afterwards."""
    p = portal(pool)
    opts = ["driver=raw", "file.driver=iscsi", "file.transport=tcp",
            f"file.portal={p}", f"file.target={target(pool)}", f"file.lun={lun}",
            f"file.initiator-name={initiator(pool)}"]
    objects: list[str] = []
    creds = credentials(pool, secrets)
    with contextlib.ExitStack() as stack:
        if creds is not None:
            objects.append(stack.enter_context(secret_object("chap0", creds.password, "raw")))
            opts += [f"file.user={creds.username}", "file.password-secret=chap0"]
        yield ",".join(opts), objects
