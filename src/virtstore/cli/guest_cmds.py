"""Commands that help put volumes into guests: vol-disk-xml."""

from __future__ import annotations

from virtstore.cli.parser import Args, Command, Opt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.cli.context import Context

GROUP = "Storage Volume"


def vol_disk_xml(ctx: Context, args: Args) -> None:
    from virtstore.cli.lookup import volume

    vol = volume(ctx.conn, args.req("vol"), args.get("pool"))
    xml = ctx.conn.volume_disk_xml(vol.pool, vol.name, target_dev=args.get("target") or "vda",
                                   bus=args.get("bus") or "virtio",
                                   source=args.get("source") or "path")
    ctx.out.write(xml if xml.endswith("\n") else xml + "\n")


COMMANDS = (
    Command("vol-disk-xml", GROUP, "a guest's <disk> element for a vol",
            "Output the domain XML <disk> element that attaches the vol to a guest.",
            (Opt("vol", "vol name, key or path", required=True),
             Opt("pool", "pool name or uuid"),
             Opt("target", "target device name in the guest (default vda)", positional=False),
             Opt("bus", "target bus: virtio, scsi, sata, ide, usb, ... (default virtio)",
                 positional=False),
             Opt("source", "path (the vol's file or device, the default) or volume "
                 "(<source pool=... volume=.../>)", positional=False)),
            vol_disk_xml),
)
