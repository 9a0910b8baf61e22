"""A guest disk from a remote virtstored, end to end.

    python examples/remote_guest.py https://HOST:8443 --token TOKEN --ca ca.crt --pool POOL

Through virtstored's HTTPS API (a bearer token, the server's certificate checked
against ``--ca``): list the pools, make a small raw base image in ``--pool``, make a
linked qcow2 clone of it, ask for the clone's ``<disk>`` element and put it in a
minimal domain document, which is checked against libvirt's domain schema. Then, on
this machine (the volumes' paths must be visible here, which holds when the client
runs on the virtualization host itself): ``qemu-img info`` must show the base as the
clone's backing file, and a QEMU with that disk must start (paused, TCG) and answer
on its QMP socket, where the drive must show the same backing chain. QEMU is stopped
and, unless ``--keep``, both volumes deleted.

Prints one JSON object with what it found; exits 1 with a message on the first
check that fails.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from lxml import etree

import virtstore
from virtstore.api import Connection, VolumeCreateArgs
from virtstore.errors import VirtstoreError

DOMAIN_SCHEMA = "/usr/share/libvirt/schemas/domain.rng"
BASE_SIZE = 16 * 1024 * 1024
MARKER = b"virtstore remote guest example\n"


class CheckFailed(Exception):
    """One step did not give what it should."""


def domain_document(name: str, disk_xml: str) -> etree._Element:
    """The smallest domain libvirt accepts for a QEMU guest with this disk."""
    dom = etree.Element("domain", type="qemu")
    etree.SubElement(dom, "name").text = name
    etree.SubElement(dom, "uuid").text = str(uuid.uuid4())
    etree.SubElement(dom, "memory", unit="MiB").text = "64"
    os_ = etree.SubElement(dom, "os")
    etree.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    devices = etree.SubElement(dom, "devices")
    devices.append(etree.fromstring(disk_xml))
    return dom


def validate_domain(dom: etree._Element, schema: str = DOMAIN_SCHEMA) -> None:
    """Raise CheckFailed unless ``dom`` is valid for libvirt's domain RelaxNG schema."""
    if not os.path.exists(schema):
        raise CheckFailed(f"libvirt's domain schema {schema} is missing (Debian: libvirt0)")
    rng = etree.RelaxNG(etree.parse(schema))
    if not rng.validate(dom):
        errors = "; ".join(f"line {e.line}: {e.message}" for e in rng.error_log)
        raise CheckFailed(f"the domain document is not valid: {errors}")


def disk_source(dom: etree._Element) -> tuple[str, str]:
    """The disk's file and driver type, as a hypervisor would take them from the XML."""
    disk = dom.find("devices/disk")
    assert disk is not None
    if disk.get("type") != "file":
        raise CheckFailed(f"expected a file disk, got type '{disk.get('type')}'")
    path = disk.find("source").get("file")  # type: ignore[union-attr]
    fmt = disk.find("driver").get("type")  # type: ignore[union-attr]
    if not path or not fmt:
        raise CheckFailed("the disk has no source file or no driver type")
    return path, fmt


def qemu_img_info(path: str) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


class QMP:
    """Just enough of the QEMU Machine Protocol: one command, one answer."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise CheckFailed(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise CheckFailed("QEMU closed its QMP socket")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:  # events come unasked; skip them
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise CheckFailed(f"QMP {command}: {reply['error'].get('desc', reply)}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise CheckFailed(f"QEMU exited with {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            raise CheckFailed("QEMU did not open its QMP socket")
        time.sleep(0.05)


def run_guest(path: str, fmt: str) -> dict[str, Any]:
    """Start a paused TCG guest on the disk, query it over QMP, read the disk's first
    bytes as the guest's drive sees them (qemu-io through the monitor), stop it."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise CheckFailed("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
    qdir = tempfile.mkdtemp(prefix="vs-qmp-")
    qmp_path = os.path.join(qdir, "qmp.sock")
    argv = [qemu, "-machine", "pc,accel=tcg", "-nographic", "-nodefaults", "-display", "none",
            "-m", "64", "-S", "-drive", f"file={path},format={fmt},if=virtio,id=vda",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    out_path = os.path.join(qdir, "stdout")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.PIPE)
    qmp = None
    try:
        _wait_for(qmp_path, proc, 30.0)
        qmp = QMP(qmp_path)
        status = qmp.execute("query-status")
        blocks = qmp.execute("query-block")
        drive = next((b for b in blocks if b.get("device") == "vda"), None)
        if drive is None or "inserted" not in drive:
            raise CheckFailed(f"QEMU has no drive vda: {blocks}")
        image = drive["inserted"]["image"]
        # qemu-io prints on QEMU's stdout (some versions answer with it instead).
        said = qmp.execute("human-monitor-command",
                           **{"command-line": f'qemu-io vda "read -v 0 {len(MARKER)}"'})
        qmp.execute("quit")
        proc.wait(10)
        with open(out_path, encoding="utf-8", errors="replace") as fh:
            dump = f"{said or ''}{fh.read()}"
        return {"pid": proc.pid, "status": status["status"],
                "image": image["filename"], "format": image["format"],
                "backing": image.get("backing-image", {}).get("filename"),
                "reads_base": MARKER.hex() in _hex_dump_bytes(dump)}
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(qdir, ignore_errors=True)


def _hex_dump_bytes(dump: str) -> str:
    """The bytes of qemu-io's ``read -v`` dump (``OFFSET:  hh hh ...  ascii``), as hex."""
    out: list[str] = []
    for line in dump.splitlines():
        head, sep, rest = line.partition(":  ")
        if not sep or not all(c in "0123456789abcdef" for c in head):
            continue
        out.extend(w for w in rest.split("  ", 1)[0].split() if len(w) == 2)
    return "".join(out)


def make_guest_disk(conn: Connection, pool: str, prefix: str,
                    made: list[str]) -> dict[str, Any]:
    """The remote part: pools, a base image, a linked clone, its <disk> element; the
    names of the volumes it makes go into ``made`` as they are made."""
    pools = {p.name: p for p in conn.list_pools()}
    if pool not in pools:
        raise CheckFailed(f"no pool '{pool}' among {sorted(pools)}")
    if pools[pool].state != "running":
        raise CheckFailed(f"pool '{pool}' is {pools[pool].state}, not running")
    base, clone = f"{prefix}-base.img", f"{prefix}-clone.qcow2"
    conn.volume_create(pool, VolumeCreateArgs(base, BASE_SIZE, format="raw"))
    made.insert(0, base)
    # Something the guest's disk will read through the overlay.
    job = conn.volume_upload(pool, base, io.BytesIO(MARKER), length=len(MARKER))
    if not job.finished:
        job = conn.job_wait(job.id)
    job = conn.volume_clone(pool, base, clone, linked=True)
    made.insert(0, clone)
    if not job.finished:
        job = conn.job_wait(job.id, timeout=120)
    if job.state != "done":
        raise CheckFailed(f"linked clone {job.state}: {job.error}")
    info = conn.volume_info(pool, clone)
    if info.format != "qcow2":
        raise CheckFailed(f"the linked clone is {info.format}, not qcow2")
    return {"pools": sorted(pools), "base": conn.volume_info(pool, base).path,
            "base_name": base, "clone": info.path, "clone_name": clone,
            "disk": conn.volume_disk_xml(pool, clone)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="https://HOST:PORT of virtstored")
    ap.add_argument("--token", default=os.environ.get("VIRTSTORE_TOKEN"),
                    help="a read-write bearer token (default: $VIRTSTORE_TOKEN)")
    ap.add_argument("--ca", default=os.environ.get("VIRTSTORE_CA"),
                    help="CA certificate that signed the server's (default: $VIRTSTORE_CA)")
    ap.add_argument("--pool", default="default", help="an active pool (default: default)")
    ap.add_argument("--prefix", default=f"guest-{os.getpid()}",
                    help="volume name prefix (default: guest-PID)")
    ap.add_argument("--keep", action="store_true", help="leave the volumes in the pool")
    opts = ap.parse_args(argv)
    report: dict[str, Any] = {"url": opts.url}
    conn = virtstore.connect(opts.url, token=opts.token, ca=opts.ca)
    made: list[str] = []
    try:
        got = make_guest_disk(conn, opts.pool, opts.prefix, made)
        report.update(got)
        dom = domain_document(opts.prefix, got["disk"])
        validate_domain(dom)
        report["domain"] = etree.tostring(dom, encoding="unicode")
        path, fmt = disk_source(dom)
        img = qemu_img_info(path)
        report["qemu_img"] = {"format": img.get("format"),
                              "backing": img.get("full-backing-filename")}
        if img.get("format") != "qcow2" or img.get("full-backing-filename") != got["base"]:
            raise CheckFailed(f"qemu-img info {path}: format {img.get('format')}, backing "
                              f"{img.get('full-backing-filename')}, expected qcow2 backed "
                              f"by {got['base']}")
        guest = run_guest(path, fmt)
        report["qemu"] = guest
        if guest["status"] != "prelaunch" or guest["backing"] != got["base"]:
            raise CheckFailed(f"QEMU: status {guest['status']}, drive backed by "
                              f"{guest['backing']}, expected prelaunch and {got['base']}")
        if not guest["reads_base"]:
            raise CheckFailed("the guest's drive does not read the base's bytes through "
                              "the clone")
    except (CheckFailed, VirtstoreError, OSError,
            subprocess.CalledProcessError) as exc:
        report["error"] = str(exc)
        print(json.dumps(report, indent=2))
        print(f"remote_guest: {exc}", file=sys.stderr)
        return 1
    finally:
        if not opts.keep:
            for name in made:
                try:
                    conn.volume_delete(opts.pool, name)
                except VirtstoreError as exc:
                    print(f"remote_guest: deleting {name}: {exc}", file=sys.stderr)
        conn.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
