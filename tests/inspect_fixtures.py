"""Real guest disks for the inspection tests and the benchmark: each filesystem made by
its own mkfs in an image file, filled by mounting it (the test may mount; the product
never does), measured with statvfs while mounted read-only, and copied into a GPT disk
at its partition's offset."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
LUKS_PASSPHRASE = "not a real secret"  # the GPT disk's LUKS partition
BLS_ID = "0123456789abcdef"


def sh(*argv: str, **kw: object) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True,
                          **kw).stdout  # type: ignore[call-overload, no-any-return]


def mount(*argv: str) -> None:
    """mount, tried again when a loop device it picked was taken by another process in
    the meantime (loop devices are shared by everything on the host)."""
    for attempt in range(4):
        try:
            sh("mount", *argv)
            return
        except subprocess.CalledProcessError:
            if attempt == 3:
                raise
            time.sleep(1 + attempt)


def blkid(path: Path, tag: str) -> str:
    return sh("blkid", "-o", "value", "-s", tag, str(path)).strip()


@dataclass
class Part:
    number: int
    kind: str
    size_mib: int
    label: str | None = None
    image: Path | None = None
    uuid: str = ""
    statvfs: tuple[int, int, int, int, int] | None = None  # size, used, avail, files, ffree


@dataclass
class GuestDisk:
    raw: Path
    parts: dict[int, Part]
    files: dict[str, bytes] = field(default_factory=dict)  # guest path -> content
    hostname: str = "testguest"


def _mkfs(kind: str, path: Path, label: str | None) -> None:
    lab = label or ""
    if kind == "ext4":
        sh("mkfs.ext4", "-q", "-F", "-L", lab, str(path))
    elif kind == "xfs":
        sh("mkfs.xfs", "-q", "-f", "-L", lab, str(path))
    elif kind == "btrfs":
        sh("mkfs.btrfs", "-q", "-f", "-L", lab, str(path))
    elif kind == "vfat":
        sh("mkfs.vfat", "-F", "32", "-n", lab, str(path))
    elif kind == "ntfs":
        sh("mkntfs", "-q", "-F", "-f", "-L", lab, str(path))
    elif kind == "swap":
        sh("mkswap", "-L", lab, str(path))
    elif kind == "luks":
        key = path.with_suffix(".key")
        key.write_bytes(LUKS_PASSPHRASE.encode())
        sh("cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
           "--pbkdf-force-iterations", "1000", "--label", lab, str(path), str(key))
    elif kind == "garbage":
        path.write_bytes(os.urandom(4 * MiB))
    else:
        raise ValueError(kind)


def _fill_fat(part: Part, write: dict[str, bytes]) -> None:
    """This host's kernel has no vfat: mtools writes the files, and mdir's free count
    (the FAT's zero entries, as the kernel counts them) stands for statvfs."""
    assert part.image is not None
    img = str(part.image)
    for rel, data in write.items():
        parts = rel.strip("/").split("/")
        for i in range(1, len(parts)):
            subprocess.run(["mmd", "-D", "s", "-i", img, "::/" + "/".join(parts[:i])],
                           capture_output=True, check=False)
        src = part.image.with_suffix(".tmp")
        src.write_bytes(data)
        sh("mcopy", "-o", "-i", img, str(src), "::/" + "/".join(parts))
        src.unlink()
    import re

    m = re.search(r"([\d ,]+) bytes free", sh("mdir", "-i", img, "::/"))
    assert m is not None
    free = int(re.sub(r"[ ,]", "", m.group(1)))
    part.statvfs = (0, 0, free, 0, 0)


def _fill(part: Part, mnt: Path, write: dict[str, bytes], links: dict[str, str]) -> None:
    """Mount, write files and links, remount read-only and take statvfs."""
    assert part.image is not None
    if part.kind == "vfat":
        _fill_fat(part, write)
        return
    opts = ["-t", "ntfs-3g"] if part.kind == "ntfs" else []
    mount(*opts, "-o", "loop", str(part.image), str(mnt))
    try:
        _write_tree(mnt, write, links)
        os.sync()
    finally:
        sh("umount", str(mnt))
    # btrfs mounted read-only leaves its data block groups' free space out of statfs;
    # a guest mounts it read-write, and that is the answer to compare with.
    mount(*opts, "-o", "loop" if part.kind == "btrfs" else "loop,ro", str(part.image),
       str(mnt))
    try:
        st = os.statvfs(mnt)
        part.statvfs = (st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize,
                        st.f_bavail * st.f_frsize, st.f_files, st.f_ffree)
    finally:
        sh("umount", str(mnt))


def build_guest(work: Path) -> GuestDisk:
    """A GPT disk: 1 EFI vfat, 2 /boot ext4 (grub2 + BLS), 3 / ext4, 4 xfs, 5 btrfs,
    6 swap, 7 LUKS, 8 ntfs, 9 random bytes."""
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    layout = [Part(1, "vfat", 64, "EFI"), Part(2, "ext4", 64, "boot"),
              Part(3, "ext4", 128, "root"), Part(4, "xfs", 300, "data"),
              Part(5, "btrfs", 160, "var"), Part(6, "swap", 16, "swap0"),
              Part(7, "luks", 20, "vault"), Part(8, "ntfs", 32, "winfs"),
              Part(9, "garbage", 4)]
    parts = {p.number: p for p in layout}
    for p in layout:
        p.image = work / f"p{p.number}.img"
        with open(p.image, "wb") as fh:
            fh.truncate(p.size_mib * MiB)
        _mkfs(p.kind, p.image, p.label)
        if p.kind != "garbage":
            p.uuid = blkid(p.image, "UUID")
    kernel = os.urandom(3 * MiB + 123)
    initrd = os.urandom(2 * MiB + 77)
    old_kernel = os.urandom(64 << 10)
    files = {"/boot/vmlinuz-6.1.0-1": kernel, "/boot/initramfs-6.1.0-1.img": initrd,
             "/boot/vmlinuz-6.2.0-1": old_kernel}
    boot_cfg = (
        'set default="${saved_entry}"\n'
        "load_env\n"
        "insmod blscfg\n"
        "blscfg\n"
        "menuentry 'Recovery' --class os {\n"
        "  linux /vmlinuz-6.2.0-1 root=LABEL=root single\n"
        "}\n")
    bls = {f"/loader/entries/{BLS_ID}-6.1.0-1.conf": (
               "title Test Linux (6.1.0-1)\nversion 6.1.0-1\nlinux /vmlinuz-6.1.0-1\n"
               f"initrd /initramfs-6.1.0-1.img\noptions root=UUID={parts[3].uuid} ro "
               "$tuned_params\n"),
           f"/loader/entries/{BLS_ID}-6.2.0-1.conf": (
               "title Test Linux (6.2.0-1)\nversion 6.2.0-1\nlinux /vmlinuz-6.2.0-1\n"
               "options root=/dev/sda3 ro\n")}
    grubenv = (f"# GRUB Environment Block\nsaved_entry={BLS_ID}-6.1.0-1\n"
               "tuned_params=quiet splash\n").ljust(1024, "#")
    _fill(parts[1], mnt, {"/EFI/debian/grub.cfg": b"configfile /grub/grub.cfg\n"}, {})
    _fill(parts[2], mnt, {
        "/vmlinuz-6.1.0-1": kernel, "/initramfs-6.1.0-1.img": initrd,
        "/vmlinuz-6.2.0-1": old_kernel, "/grub/grub.cfg": boot_cfg.encode(), "/efi/": b"",
        "/grub/grubenv": grubenv.encode(), **{k: v.encode() for k, v in bls.items()}}, {})
    os_release = ('PRETTY_NAME="Test Linux 12 (bookworm)"\nNAME="Test Linux"\n'
                  'VERSION_ID="12"\nID=testlinux\nID_LIKE=debian\n')
    fstab = (f"# /etc/fstab\nUUID={parts[3].uuid} / ext4 errors=remount-ro 0 1\n"
             f"UUID={parts[2].uuid} /boot ext4 defaults 0 2\n"
             "LABEL=EFI /boot/efi vfat umask=0077 0 1\n"
             "LABEL=data /srv xfs defaults 0 0\n"
             f"/dev/disk/by-uuid/{parts[5].uuid} /var/lib btrfs defaults 0 0\n"
             f"UUID={parts[6].uuid} none swap sw 0 0\n")
    # /bin and /usr/bin: libguestfs's inspection (the benchmark's other side) wants them,
    # and a directory for each mount point, which it mounts before looking in /boot.
    _fill(parts[3], mnt, {"/etc/os-release": os_release.encode(), "/etc/fstab": fstab.encode(),
                          "/etc/hostname": b"testguest\n", "/srv/.keep": b"",
                          "/boot/": b"", "/var/lib/": b"", "/usr/bin/sh": b""},
          {"/vmlinuz": "boot/vmlinuz-6.1.0-1", "/bin": "usr/bin"})
    _fill(parts[4], mnt, {"/big.bin": os.urandom(20 * MiB)}, {})
    _fill(parts[5], mnt, {"/big.bin": os.urandom(10 * MiB)}, {})
    _fill(parts[8], mnt, {"/Users/data.bin": os.urandom(5 * MiB)}, {})
    raw = work / "guest.raw"
    _gpt_disk(raw, [p.image for p in layout if p.image is not None],
              names=[f"part{p.number}" for p in layout])
    return GuestDisk(raw, parts, files)


def build_plain(work: Path) -> tuple[Path, bytes, bytes]:
    """A whole-disk ext4 without a partition table or boot loader configuration:
    /boot/vmlinuz-5.9.0, /boot/vmlinuz-5.10.0 (an absolute symlink into /kernels) and
    its initrd."""
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    img = work / "plain.raw"
    with open(img, "wb") as fh:
        fh.truncate(48 * MiB)
    part = Part(0, "ext4", 48, "plain", img)
    _mkfs("ext4", img, "plain")
    kernel, initrd = os.urandom(1 * MiB + 5), os.urandom(300 << 10)
    _fill(part, mnt, {"/kernels/vmlinuz-5.10.0": kernel, "/boot/vmlinuz-5.9.0": b"old",
                      "/boot/initrd.img-5.10.0": initrd,
                      "/etc/os-release": b"ID=plain\nVERSION_ID=1\n"},
          {"/boot/vmlinuz-5.10.0": "/kernels/../kernels/vmlinuz-5.10.0"})
    return img, kernel, initrd


@contextmanager
def qcow2_pool(root: Path, where: Path, pool: str,
               disks: dict[str, Path]) -> Iterator[Any]:
    """An embedded Connection with dir pool ``pool`` in ``where`` holding each raw disk
    as a qcow2 volume of the given name."""
    from conftest import dir_pool_xml
    from virtstore.api.embedded import EmbeddedConnection

    where.mkdir(parents=True, exist_ok=True)
    for name, raw in disks.items():
        sh("qemu-img", "convert", "-O", "qcow2", str(raw), str(where / name))
    c = EmbeddedConnection(str(root))
    try:
        c.pool_define_xml(dir_pool_xml(pool, where))
        c.pool_start(pool)
        yield c
    finally:
        c.close()


def can_build() -> str | None:
    """Why this machine cannot build the disks, or None."""
    if os.geteuid() != 0:
        return "building guest disks mounts loop devices: needs root"
    for tool in ("sgdisk", "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs", "mkfs.vfat", "mkswap",
                 "cryptsetup", "mkntfs", "ntfs-3g", "mcopy", "qemu-img", "qemu-nbd", "lvm",
                 "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def new_uuid() -> str:
    return str(uuidlib.uuid4())


FEDORA_ID = "5f3e2a1b9c8d4e7f"
FEDORA_KERNEL = "6.8.5-301.fc40.x86_64"


@dataclass
class FedoraDisk:
    raw: Path
    boot_uuid: str
    root_uuid: str
    files: dict[str, bytes]  # guest path -> content


def _compressible(size: int) -> bytes:
    """Bytes that zstd shrinks (so btrfs stores compressed extents) but not to nothing."""
    chunk = os.urandom(4096)
    out = bytearray()
    while len(out) < size:
        out += chunk + bytes(12288) + os.urandom(64)
    return bytes(out[:size])


def _gpt_disk(raw: Path, images: list[Path], names: list[str] | None = None) -> None:
    """A GPT disk holding each image as a partition, in order, 1 MiB aligned, with
    partition ``names`` if given."""
    total = 2 + sum(-(-p.stat().st_size // MiB) for p in images)
    with open(raw, "wb") as fh:
        fh.truncate(total * MiB)
    args = ["sgdisk", "-Z"]
    start = 2048
    for n, img in enumerate(images, start=1):
        end = start + -(-img.stat().st_size // MiB) * 2048 - 1
        args += [f"-n{n}:{start}:{end}"] + ([f"-c{n}:{names[n - 1]}"] if names else [])
        start = end + 1
    sh(*args, str(raw))
    for n, img in enumerate(images, start=1):
        offset = int(sh("sgdisk", "-i", str(n), str(raw)).split("First sector: ")[1]
                     .split()[0])
        sh("dd", f"if={img}", f"of={raw}", "bs=1M", f"seek={offset * 512}",
           "oflag=seek_bytes", "conv=notrunc,sparse", "status=none")


def _write_tree(mnt: Path, write: dict[str, bytes], links: dict[str, str]) -> None:
    """Files (a name ending in / is an empty directory) and symlinks."""
    for rel, data in write.items():
        p = mnt / rel.lstrip("/")
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for rel, target in links.items():
        p = mnt / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)


def build_fedora(work: Path) -> FedoraDisk:
    """A disk laid out as Fedora installs one: GPT, 1 xfs /boot (grub2 with blscfg, the
    kernel and initramfs), 2 btrfs with subvolumes ``root`` (/) and ``home`` (/home),
    zstd-compressed, /etc/os-release a relative symlink into /usr/lib; 3 swap."""
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    boot, root, swap = work / "boot.img", work / "root.img", work / "swap.img"
    for img, mib in ((boot, 300), (root, 200), (swap, 16)):
        with open(img, "wb") as fh:
            fh.truncate(mib * MiB)
    _mkfs("xfs", boot, "boot")
    _mkfs("btrfs", root, "fedora")
    _mkfs("swap", swap, None)
    boot_uuid, root_uuid = blkid(boot, "UUID"), blkid(root, "UUID")
    kernel, initrd = os.urandom(2 * MiB + 11), os.urandom(MiB + 3)
    entry = (f"title Fedora Linux ({FEDORA_KERNEL}) 40 (Cloud Edition)\n"
             f"version {FEDORA_KERNEL}\nlinux /vmlinuz-{FEDORA_KERNEL}\n"
             f"initrd /initramfs-{FEDORA_KERNEL}.img\n"
             "options root=UUID=" + root_uuid + " ro rootflags=subvol=root $kernelopts\n"
             "grub_users $grub_users\ngrub_arg --unrestricted\ngrub_class fedora\n")
    grub_cfg = ("set default=\"${saved_entry}\"\nload_env\ninsmod blscfg\nblscfg\n"
                "menuentry 'UEFI Firmware Settings' $menuentry_id_option 'uefi' {\n"
                "  fwsetup\n}\n")
    grubenv = (f"# GRUB Environment Block\nsaved_entry={FEDORA_ID}-{FEDORA_KERNEL}\n"
               "kernelopts=console=ttyS0 no_timer_check\n").ljust(1024, "#")
    mount("-o", "loop", str(boot), str(mnt))
    try:
        _write_tree(mnt, {
            f"/vmlinuz-{FEDORA_KERNEL}": kernel, f"/initramfs-{FEDORA_KERNEL}.img": initrd,
            "/vmlinuz-0-rescue-" + FEDORA_ID: os.urandom(4096),
            "/grub2/grub.cfg": grub_cfg.encode(), "/grub2/grubenv": grubenv.encode(),
            f"/loader/entries/{FEDORA_ID}-{FEDORA_KERNEL}.conf": entry.encode(),
            f"/loader/entries/{FEDORA_ID}-0-rescue.conf": (
                "title Fedora Linux (0-rescue)\nversion 0-rescue\n"
                f"linux /vmlinuz-0-rescue-{FEDORA_ID}\noptions ro\n").encode()},
            {"/symvers-current": f"vmlinuz-{FEDORA_KERNEL}"})
        os.sync()
    finally:
        sh("umount", str(mnt))
    os_release = ('NAME="Fedora Linux"\nVERSION="40 (Cloud Edition)"\nID=fedora\n'
                  'VERSION_ID=40\nPRETTY_NAME="Fedora Linux 40 (Cloud Edition)"\n'
                  + "# padding so that zstd has something to compress\n" * 200)
    fstab = (f"UUID={root_uuid} / btrfs subvol=root,compress=zstd:1 0 0\n"
             f"UUID={boot_uuid} /boot xfs defaults 0 0\n"
             f"UUID={root_uuid} /home btrfs subvol=home,compress=zstd:1 0 0\n")
    big = _compressible(3 * MiB)
    mount("-o", "loop,compress-force=zstd:1", str(root), str(mnt))
    try:
        sh("btrfs", "subvolume", "create", str(mnt / "root"))
        sh("btrfs", "subvolume", "create", str(mnt / "home"))
        _write_tree(mnt / "root", {
            "/usr/lib/os-release": os_release.encode(), "/etc/fstab": fstab.encode(),
            "/etc/hostname": b"fedora-guest\n", "/usr/share/big.bin": big,
            "/usr/bin/sh": b"", "/boot/": b"", "/home/": b""}, {
            "/etc/os-release": "../usr/lib/os-release", "/bin": "usr/bin"})
        _write_tree(mnt / "home", {"/fedora/notes.txt": b"hello\n"}, {})
        os.sync()
    finally:
        sh("umount", str(mnt))
    raw = work / "fedora.raw"
    _gpt_disk(raw, [boot, root, swap])
    files = {f"/boot/vmlinuz-{FEDORA_KERNEL}": kernel,
             f"/boot/initramfs-{FEDORA_KERNEL}.img": initrd,
             "/usr/lib/os-release": os_release.encode(), "/usr/share/big.bin": big}
    return FedoraDisk(raw, boot_uuid, root_uuid, files)


def build_btrfs_plain(work: Path) -> tuple[Path, bytes, bytes]:
    """A whole-disk btrfs as Ubuntu and openSUSE lay one out: the system in subvolume
    ``@`` made the default, /boot inside it with a zstd-compressed kernel and initrd and
    no boot loader configuration."""
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    img = work / "btrfs.raw"
    with open(img, "wb") as fh:
        fh.truncate(160 * MiB)
    _mkfs("btrfs", img, "ubuntu")
    kernel, initrd = _compressible(2 * MiB + 5), _compressible(MiB + 7)
    mount("-o", "loop,compress-force=zstd", str(img), str(mnt))
    try:
        sh("btrfs", "subvolume", "create", str(mnt / "@"))
        _write_tree(mnt / "@", {
            "/boot/vmlinuz-6.8.0-31-generic": kernel,
            "/boot/initrd.img-6.8.0-31-generic": initrd,
            "/boot/vmlinuz-6.5.0-9-generic": b"old",
            "/etc/os-release": b'ID=ubuntu\nVERSION_ID="24.04"\nNAME="Ubuntu"\n'}, {})
        subvol_id = sh("btrfs", "inspect-internal", "rootid", str(mnt / "@")).strip()
        sh("btrfs", "subvolume", "set-default", subvol_id, str(mnt))
        os.sync()
    finally:
        sh("umount", str(mnt))
    return img, kernel, initrd


@dataclass
class LvmDisk:
    raw: Path
    vg: str
    lvs: dict[str, Part]  # LV name -> its filesystem, with statvfs
    boot_uuid: str
    files: dict[str, bytes]


def _lvm(*args: str, device: str) -> str:
    # Activation off: LVM writes its metadata without device-mapper (this host has
    # none), and --devices keeps it from looking at anyone else's disks.
    return sh("lvm", args[0], "--devices", device, "--config", "global{activation=0}",
              *args[1:])


def build_lvm(work: Path) -> LvmDisk:
    """A GPT disk: 1 ext4 /boot booted by extlinux, 2 an LVM PV whose VG has LVs
    ``root`` (ext4 /), ``srv-data`` (ext4 /srv, named in fstab through /dev/mapper)
    and ``swap``. The LVs' filesystems are made in files and copied to their extents."""
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    vg = "vgguest" + uuidlib.uuid4().hex[:8]
    pv = work / "pv.img"
    with open(pv, "wb") as fh:
        fh.truncate(64 * MiB)
    loop = sh("losetup", "-f", "--show", str(pv)).strip()
    try:
        _lvm("pvcreate", "-q", loop, device=loop)
        _lvm("vgcreate", "-q", vg, loop, device=loop)
        for name, mib in (("root", 24), ("srv-data", 12), ("swap", 8)):
            _lvm("lvcreate", "-q", "-an", "-Zn", "-L", f"{mib}M", "-n", name, vg, device=loop)
        pe_start = int(_lvm("pvs", "--noheadings", "--nosuffix", "--units", "b", "-o",
                            "pe_start", device=loop))
        extent = int(_lvm("vgs", "--noheadings", "--nosuffix", "--units", "b", "-o",
                          "vg_extent_size", device=loop))
        ranges = dict(line.split() for line in _lvm(
            "lvs", "--noheadings", "-o", "lv_name,seg_pe_ranges", device=loop).splitlines())
    finally:
        sh("losetup", "-d", loop)
    boot = Part(1, "ext4", 32, "boot", work / "boot.img")
    lvs = {"root": Part(0, "ext4", 24, "root"), "srv-data": Part(0, "ext4", 12, "srvdata"),
           "swap": Part(0, "swap", 8, "lvswap")}
    for p in (boot, *lvs.values()):
        if p.image is None:
            p.image = work / f"lv-{p.label}.img"
        with open(p.image, "wb") as fh:
            fh.truncate(p.size_mib * MiB)
        _mkfs(p.kind, p.image, p.label)
        p.uuid = blkid(p.image, "UUID")
    kernel, initrd = os.urandom(MiB + 17), os.urandom(512 << 10)
    extlinux = ("DEFAULT debian\nTIMEOUT 30\n\nLABEL rescue\n  KERNEL /vmlinuz-rescue\n\n"
                "LABEL debian\n  MENU LABEL Debian GNU/Linux\n"
                "  LINUX ../vmlinuz-6.1.0-18-amd64\n"
                f"  APPEND root=/dev/mapper/{vg}-root ro quiet "
                "initrd=/initrd.img-6.1.0-18-amd64\n")
    _fill(boot, mnt, {"/vmlinuz-6.1.0-18-amd64": kernel,
                      "/initrd.img-6.1.0-18-amd64": initrd, "/vmlinuz-rescue": b"rescue",
                      "/extlinux/extlinux.conf": extlinux.encode()}, {})
    fstab = (f"/dev/mapper/{vg}-root / ext4 errors=remount-ro 0 1\n"
             f"UUID={boot.uuid} /boot ext4 defaults 0 2\n"
             f"/dev/mapper/{vg}-srv--data /srv ext4 defaults 0 2\n"
             f"/dev/{vg}/swap none swap sw 0 0\n")
    _fill(lvs["root"], mnt, {"/etc/os-release": b'ID=debian\nVERSION_ID="12"\n',
                             "/etc/fstab": fstab.encode(), "/etc/hostname": b"lvmguest\n",
                             "/srv/.keep": b""}, {})
    _fill(lvs["srv-data"], mnt, {"/data.bin": os.urandom(3 * MiB)}, {})
    for name, p in lvs.items():
        first = int(ranges[name].split(":")[1].split("-")[0])
        sh("dd", f"if={p.image}", f"of={pv}", "bs=1M", f"seek={pe_start + first * extent}",
           "oflag=seek_bytes", "conv=notrunc", "status=none")
    raw = work / "lvm.raw"
    assert boot.image is not None
    _gpt_disk(raw, [boot.image, pv])
    return LvmDisk(raw, vg, lvs, boot.uuid, {"/boot/vmlinuz-6.1.0-18-amd64": kernel,
                                            "/boot/initrd.img-6.1.0-18-amd64": initrd})


def minimal_hive() -> bytes:
    """An empty registry hive: the regf header, one hbin with the root key, its security
    cell and one free cell. hivex edits it from there."""
    import struct

    hbin = bytearray(0x1000)
    hbin[0:32] = struct.pack("<4sIIQQI", b"hbin", 0, 0x1000, 0, 0, 0)
    name = b"ROOT"
    nk = struct.pack("<2sHQIIIIIIIIIIIIIIIHH", b"nk", 0x2C, 0, 0, 0, 0, 0, 0xFFFFFFFF,
                     0xFFFFFFFF, 0, 0xFFFFFFFF, 0x80, 0xFFFFFFFF, 0, 0, 0, 0, 0,
                     len(name), 0) + name
    hbin[0x20:0x24 + len(nk)] = struct.pack("<i", -96) + nk
    sd = struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)  # self-relative, empty
    sk = struct.pack("<2sHIIII", b"sk", 0, 0x80, 0x80, 1, len(sd)) + sd
    hbin[0x80:0x84 + len(sk)] = struct.pack("<i", -48) + sk
    struct.pack_into("<i", hbin, 0xB0, 0x1000 - 0xB0)
    head = bytearray(0x1000)
    struct.pack_into("<4sIIQIIIIII", head, 0, b"regf", 1, 1, 0, 1, 5, 0, 1, 0x20, 0x1000)
    struct.pack_into("<I", head, 0x2C, 1)
    checksum = 0
    for (word,) in struct.iter_unpack("<I", head[:0x1FC]):
        checksum ^= word
    struct.pack_into("<I", head, 0x1FC, checksum)
    return bytes(head + hbin)


def make_hive(path: Path, keys: dict[str, dict[str, str | int]]) -> None:
    """A hive at ``path`` with ``keys`` (backslash paths) holding REG_SZ / REG_DWORD
    values, written by hivex."""
    import struct

    import hivex  # type: ignore[import-not-found, unused-ignore]

    path.write_bytes(minimal_hive())
    h = hivex.Hivex(str(path), write=True)
    for key, values in keys.items():
        node = h.root()
        for name in key.split("\\"):
            child = h.node_get_child(node, name)
            if child is None:
                h.node_add_child(node, name)
                child = h.node_get_child(node, name)
            node = child
        h.node_set_values(node, [
            {"key": k, "t": 4, "value": struct.pack("<I", v)} if isinstance(v, int) else
            {"key": k, "t": 1, "value": (v + "\0").encode("utf-16-le")}
            for k, v in values.items()])
    h.commit(str(path))


def build_windows(work: Path) -> Path:
    """A GPT disk with one NTFS partition laid out as Windows Server 2022's: its
    SOFTWARE and SYSTEM hives (made by hivex) under /Windows/System32/config."""
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    software, system = work / "SOFTWARE", work / "SYSTEM"
    make_hive(software, {"Microsoft\\Windows NT\\CurrentVersion": {
        "ProductName": "Windows Server 2022 Datacenter", "CurrentMajorVersionNumber": 10,
        "CurrentMinorVersionNumber": 0, "CurrentVersion": "6.3",
        "CurrentBuildNumber": "20348", "EditionID": "ServerDatacenter",
        "InstallationType": "Server"}})
    make_hive(system, {"Select": {"Current": 2, "Default": 2},
                       "ControlSet001\\Control\\ComputerName\\ComputerName": {
                           "ComputerName": "OLD-NAME"},
                       "ControlSet002\\Control\\ComputerName\\ComputerName": {
                           "ComputerName": "WIN-TEST01"}})
    part = Part(1, "ntfs", 48, "Windows", work / "c.img")
    assert part.image is not None
    with open(part.image, "wb") as fh:
        fh.truncate(part.size_mib * MiB)
    _mkfs("ntfs", part.image, part.label)
    _fill(part, mnt, {"/Windows/System32/config/SOFTWARE": software.read_bytes(),
                      "/Windows/System32/config/SYSTEM": system.read_bytes(),
                      "/Windows/System32/config/SAM": minimal_hive(),
                      "/Windows/System32/ntoskrnl.exe": os.urandom(4096)}, {})
    raw = work / "windows.raw"
    _gpt_disk(raw, [part.image])
    return raw
