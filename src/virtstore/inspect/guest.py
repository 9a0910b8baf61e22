"""The operating system on a disk (os-release, hostname, fstab) and its boot files
(grub2 with blscfg, extlinux/syslinux, or the newest /boot/vmlinuz-*)."""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from virtstore.inspect.files import FILE_TYPES, BtrfsFs, FsReader, GuestTree, open_reader
from virtstore.inspect.parts import Region
from virtstore.inspect.source import GuestDataError
from virtstore.inspect.superblocks import FsInfo

TEXT_LIMIT = 1 << 20  # a config file larger than this is not one
MAX_BLS_ENTRIES = 500


@dataclass
class Found:
    region: Region
    info: FsInfo
    error: str | None = None
    fs: FsReader | None = None
    mountpoint: str | None = None


@dataclass
class Guest:
    found: list[Found]
    root: Found | None = None
    os: dict[str, Any] = field(default_factory=dict)
    fstab: list[dict[str, str]] = field(default_factory=list)
    tree: GuestTree | None = None


def open_fs(item: Found) -> FsReader | None:
    if item.fs is None and item.error is None and item.info.type in FILE_TYPES:
        try:
            item.fs = open_reader(item.info.type, item.region.source)
        except GuestDataError as exc:
            item.error = str(exc)
    return item.fs


def _views(fs: FsReader) -> list[FsReader]:
    """Where an operating system may be on ``fs``: the filesystem, or for btrfs its
    default subvolume and then every subvolume (Fedora's ``root``, Ubuntu's ``@``)."""
    if not isinstance(fs, BtrfsFs):
        return [fs]
    try:
        return [fs, *fs.subvolumes()]
    except GuestDataError:
        return [fs]


def _mounted(target: Found, options: str) -> FsReader | None:
    """The filesystem as fstab mounts it: btrfs's ``subvol=``/``subvolid=`` pick a
    subvolume."""
    fs = open_fs(target)
    if not isinstance(fs, BtrfsFs):
        return fs
    opts = {}
    for option in options.split(","):
        key, _, value = option.partition("=")
        opts[key] = value
    try:
        if opts.get("subvolid", "").isdigit():
            return fs.subvolume(int(opts["subvolid"]))
        return fs.subvolume(opts.get("subvol") or None)
    except GuestDataError:
        return None


def text(fs: FsReader | GuestTree, path: str) -> str | None:
    try:
        if isinstance(fs, GuestTree):
            data = fs.read(path, limit=TEXT_LIMIT)
        else:
            data = fs.read_file(path, limit=TEXT_LIMIT)
    except (FileNotFoundError, GuestDataError):
        return None
    return data.decode("utf-8", "replace")


def parse_os_release(body: str) -> dict[str, str]:
    out = {}
    for line in body.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        out[key.strip()] = words[0] if words else ""
    return out


def parse_fstab(body: str) -> list[dict[str, str]]:
    out = []
    for line in body.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            out.append({"spec": fields[0], "mountpoint": fields[1].replace("\\040", " "),
                        "type": fields[2] if len(fields) > 2 else "auto",
                        "options": fields[3] if len(fields) > 3 else "defaults"})
    return out


def _match(spec: str, found: list[Found]) -> Found | None:
    key, _, value = spec.partition("=")
    if spec.startswith("/dev/disk/by-"):
        kind, _, value = spec[len("/dev/disk/by-"):].partition("/")
        key = {"uuid": "UUID", "label": "LABEL", "partuuid": "PARTUUID",
               "partlabel": "PARTLABEL"}.get(kind, "")
    for item in found:
        r, i = item.region, item.info
        if (key == "UUID" and i.uuid and i.uuid.lower() == value.lower()) or \
                (key == "LABEL" and i.label == value) or \
                (key == "PARTUUID" and r.part_uuid and r.part_uuid.lower() == value.lower()) or \
                (key == "PARTLABEL" and r.part_label == value):
            return item
    m = re.fullmatch(r"/dev/(?:[shv]d[a-z]|xvd[a-z])(\d+)|/dev/nvme\d+n\d+p(\d+)", spec)
    if m:
        number = int(m.group(1) or m.group(2))
        return next((f for f in found if f.region.partition == number), None)
    lv = re.fullmatch(r"/dev/mapper/(.+?)-(.+)|/dev/([^/]+)/([^/]+)", spec)
    if lv:
        vg = (lv.group(1) or lv.group(3) or "").replace("--", "-")
        name = (lv.group(2) or lv.group(4) or "").replace("--", "-")
        return next((f for f in found if f.region.device == f"/dev/{vg}/{name}"), None)
    return None


def inspect_guest(found: list[Found]) -> Guest:
    """Find the root filesystem and read what identifies the OS."""
    guest = Guest(found)
    for item in found:
        fs = open_fs(item)
        if fs is None:
            continue
        for view in _views(fs):
            alone = GuestTree({"/": view})  # follows /etc/os-release -> ../usr/lib/...
            body = text(alone, "/etc/os-release") or text(alone, "/usr/lib/os-release")
            if body is not None:
                guest.root, item.fs = item, view
                guest.os = _os_from_release(parse_os_release(body))
                break
        if guest.root is None and _is_windows(fs):
            from virtstore.inspect.windows import windows_info

            guest.root = item
            guest.os = windows_info(fs)
        if guest.root is not None:
            break
    if guest.root is None or guest.root.fs is None:
        return guest
    guest.root.mountpoint = "/"
    fs = guest.root.fs
    host = text(fs, "/etc/hostname")
    if host is not None and host.strip():
        guest.os["hostname"] = host.strip().splitlines()[0][:255]
    guest.os["root"] = guest.root.region.device
    body = text(fs, "/etc/fstab")
    guest.fstab = parse_fstab(body) if body else []
    mounts: dict[str, FsReader] = {"/": fs}
    for entry in guest.fstab:
        target = _match(entry["spec"], found)
        entry["device"] = target.region.device if target else ""
        mp = posixpath.normpath(entry["mountpoint"])
        if target is None or not mp.startswith("/"):
            continue
        if target.mountpoint is None:
            target.mountpoint = mp
        sub = _mounted(target, entry["options"]) if mp != "/" else None
        if sub is not None:
            mounts[mp] = sub
    guest.tree = GuestTree(mounts)
    return guest


def _is_windows(fs: FsReader) -> bool:
    try:
        return fs.kind("/Windows/System32") == "dir"
    except (FileNotFoundError, GuestDataError):
        return False


def _os_from_release(rel: dict[str, str]) -> dict[str, Any]:
    return {"type": "linux", "distro": rel.get("ID", "unknown"),
            "name": rel.get("PRETTY_NAME") or rel.get("NAME"),
            "version": rel.get("VERSION_ID"), "id_like": rel.get("ID_LIKE")}


# -- boot files --------------------------------------------------------------------
def version_key(text: str) -> list[tuple[int, int | str]]:
    """``sort -V``'s order, near enough: digit runs compare as numbers."""
    return [(0, int(p)) if p.isdigit() else (1, p)
            for p in re.findall(r"\d+|[^\d]+", text)]


@dataclass
class BootEntry:
    source: str  # which configuration named it
    title: str | None
    kernel: str
    initrd: str | None
    cmdline: str


def _boot_tree(guest: Guest) -> GuestTree:
    if guest.tree is not None:
        return guest.tree
    # No root filesystem recognised: a lone /boot filesystem still has the boot files.
    for item in guest.found:
        fs = open_fs(item)
        if fs is not None and any(_exists(fs, p) for p in (
                "/grub/grub.cfg", "/grub2/grub.cfg", "/loader/entries",
                "/extlinux/extlinux.conf")):
            return GuestTree({"/": fs, "/boot": fs})
    raise GuestDataError("no filesystem with an operating system or boot files was found")


def _exists(fs: FsReader, path: str) -> bool:
    try:
        fs.kind(path)
    except (FileNotFoundError, GuestDataError):
        return False
    return True


def find_boot(guest: Guest) -> BootEntry:
    tree = _boot_tree(guest)
    for cfg in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"):
        body = text(tree, cfg)
        if body is not None:
            entry = _grub(tree, cfg, body)
            if entry is not None:
                return entry
    for cfg in ("/boot/extlinux/extlinux.conf", "/boot/extlinux.conf",
                "/boot/syslinux/syslinux.cfg", "/extlinux.conf"):
        body = text(tree, cfg)
        if body is not None:
            entry = _extlinux(tree, cfg, body)
            if entry is not None:
                return entry
    return _plain(tree)


def _boot_path(tree: GuestTree, path: str) -> str:
    """A path as a boot loader names it (relative to the filesystem /boot is on) as a
    guest path."""
    path = re.sub(r"^\([^)]*\)", "", path)  # grub's (hd0,gpt2) device prefix
    path = posixpath.normpath("/" + path.lstrip("/"))
    for candidate in (path, "/boot" + path):
        if tree.exists(candidate) and tree.kind(candidate) == "file":
            return candidate
    raise GuestDataError(f"the boot configuration names {path}, which is not there")


def _grubenv(tree: GuestTree, cfg: str) -> dict[str, str]:
    body = text(tree, posixpath.join(posixpath.dirname(cfg), "grubenv")) or ""
    return dict(line.split("=", 1) for line in body.splitlines()
                if "=" in line and not line.startswith("#"))


def _grub(tree: GuestTree, cfg: str, body: str) -> BootEntry | None:
    env = _grubenv(tree, cfg)
    variables = dict(env)
    entries: list[BootEntry] = []
    ids: list[str] = []
    default = "0"
    current: dict[str, str] | None = None
    for raw in body.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if not words:
            continue
        cmd = words[0]
        if current is not None:
            if cmd == "}":
                if "linux" in current:
                    entries.append(BootEntry(cfg, current.get("title"), current["linux"],
                                             current.get("initrd"), current.get("cmdline", "")))
                    ids.append(current.get("id", ""))
                current = None
            elif cmd in ("linux", "linux16", "linuxefi") and len(words) > 1:
                current["linux"] = _subst(words[1], variables)
                current["cmdline"] = _subst(" ".join(words[2:]), variables)
            elif cmd in ("initrd", "initrd16", "initrdefi") and len(words) > 1:
                current["initrd"] = _subst(words[1], variables)
            continue
        if cmd == "menuentry" and line.endswith("{"):
            current = {"title": words[1] if len(words) > 1 else ""}
            if "$menuentry_id_option" in words:
                i = words.index("$menuentry_id_option")
                current["id"] = words[i + 1] if i + 1 < len(words) else ""
        elif cmd == "set" and len(words) > 1 and "=" in words[1]:
            key, _, value = words[1].partition("=")
            variables[key] = _subst(value, variables)
            if key == "default":
                default = variables[key]
        elif cmd == "blscfg":
            for entry, ident in _bls(tree, variables):
                entries.append(entry)
                ids.append(ident)
    if not entries:
        return None
    if default in ("saved", "${saved_entry}", "") or default.startswith("$"):
        default = env.get("saved_entry", "0") or "0"
    chosen = _pick(entries, ids, default)
    return BootEntry(chosen.source, chosen.title, _boot_path(tree, chosen.kernel),
                     _boot_path(tree, chosen.initrd) if chosen.initrd else None,
                     chosen.cmdline)


def _pick(entries: list[BootEntry], ids: list[str], default: str) -> BootEntry:
    if default.isdigit() and int(default) < len(entries):
        return entries[int(default)]
    for entry, ident in zip(entries, ids, strict=True):
        if default in (ident, entry.title):
            return entry
    return entries[0]


def _subst(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), ""), value).strip()


def _bls(tree: GuestTree, variables: dict[str, str]) -> list[tuple[BootEntry, str]]:
    """Boot Loader Specification entries as grub's blscfg reads them, newest first."""
    try:
        names = [n for n in tree.listdir("/boot/loader/entries") if n.endswith(".conf")]
    except (FileNotFoundError, GuestDataError):
        return []
    out = []
    for name in sorted(names, key=version_key, reverse=True)[:MAX_BLS_ENTRIES]:
        body = text(tree, f"/boot/loader/entries/{name}")
        if body is None:
            continue
        keys: dict[str, str] = {}
        for line in body.splitlines():
            k, _, v = line.strip().partition(" ")
            if k and not k.startswith("#"):
                keys.setdefault(k, v.strip())
        if "linux" not in keys:
            continue
        initrd = keys.get("initrd", "").split()
        out.append((BootEntry(f"/boot/loader/entries/{name}", keys.get("title"),
                              keys["linux"], initrd[0] if initrd else None,
                              _subst(keys.get("options", ""), variables)), name[:-5]))
    return out


def _extlinux(tree: GuestTree, cfg: str, body: str) -> BootEntry | None:
    labels: list[dict[str, str]] = []
    default = None
    for raw in body.splitlines():
        k, _, v = raw.strip().partition(" ")
        k, v = k.lower(), v.strip()
        if k == "default":
            default = v
        elif k == "label":
            labels.append({"label": v})
        elif labels and k in ("kernel", "linux"):
            labels[-1]["kernel"] = v
        elif labels and k in ("initrd",):
            labels[-1]["initrd"] = v
        elif labels and k == "append":
            labels[-1]["append"] = v
    labels = [lb for lb in labels if "kernel" in lb]
    if not labels:
        return None
    chosen = next((lb for lb in labels if lb["label"] == default), labels[0])
    args = chosen.get("append", "").split()
    initrd = chosen.get("initrd")
    for a in args:
        if a.startswith("initrd="):
            initrd = a[len("initrd="):].split(",")[0]
    cmdline = " ".join(a for a in args if not a.startswith("initrd="))
    base = posixpath.dirname(cfg)

    def where(p: str) -> str:
        return p if p.startswith("/") else posixpath.join(base, p)

    return BootEntry(cfg, chosen["label"], _boot_path(tree, where(chosen["kernel"])),
                     _boot_path(tree, where(initrd)) if initrd else None, cmdline)


def _plain(tree: GuestTree) -> BootEntry:
    try:
        names = tree.listdir("/boot")
    except (FileNotFoundError, GuestDataError):
        raise GuestDataError("the guest has no /boot directory") from None
    kernels = sorted((n for n in names if n.startswith("vmlinuz-")), key=version_key)
    if not kernels:
        raise GuestDataError("no boot configuration and no /boot/vmlinuz-* in the guest")
    kernel = kernels[-1]
    version = kernel[len("vmlinuz-"):]
    initrd = next((f"/boot/{n}" for n in (f"initrd.img-{version}", f"initramfs-{version}.img",
                                          f"initrd-{version}", f"initrd-{version}.img")
                   if n in names), None)
    return BootEntry("/boot", None, f"/boot/{kernel}", initrd, "")
