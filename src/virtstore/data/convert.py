"""Converting images: raw to raw in process, everything else through qemu-img.

raw→raw (no encryption, no preallocation or other options) is a sparse copy (see
``copy``), optionally a reflink. Every other pair runs ``qemu-img convert -p``: its
"(NN.NN/100%)" progress becomes monitor bytes (a share of the source's virtual size),
a bandwidth limit becomes ``-r``, and a cancel kills it. The output is sparse
(qemu-img's default: zero clusters are not written). Options and LUKS secrets are
turned into qemu-img arguments by ``virtstore.formats.qemuimg``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

from virtstore.data.copy import copy_file
from virtstore.data.monitor import Monitor
from virtstore.errors import CommandFailed, InvalidArgument
from virtstore.formats import probe_image, qemuimg
from virtstore.formats.qemuimg import FLAKY_PBKDF, Encryption, ImageOptions
from virtstore.host.runner import stream

_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
RAW_FORMATS = frozenset({"raw", "iso"})


def _plain(opts: ImageOptions | None) -> bool:
    """True when ``opts`` asks for nothing a byte copy would not give."""
    return opts is None or (opts.encryption is None and opts.preallocation in (None, "off")
                            and not opts.extra and not opts.nocow and not opts.backing_file)


def convert(src: str, src_fmt: str, dst: str, dst_fmt: str, opts: ImageOptions | None = None,
            *, monitor: Monitor, src_secret: bytes | None = None,
            dst_secret: bytes | None = None, target_exists: bool = False,
            reflink: str = "never") -> None:
    """Convert the image ``src`` (format ``src_fmt``) into ``dst`` in ``dst_fmt``.

    ``opts`` are the target's creation options (its capacity is ignored: the target
    gets the source's size). ``target_exists``: the caller made ``dst`` (a
    block device, a pre-created image) and qemu-img writes into it (``-n``); else
    qemu-img creates it. ``src_secret``/``dst_secret`` are LUKS passphrases of an
    encrypted source/target (they go to qemu-img in 0600 files, never on its command
    line). ``reflink`` ("never", "auto", "always") applies to raw→raw copies.
    """
    if src_fmt in RAW_FORMATS and dst_fmt in RAW_FORMATS and src_secret is None \
            and dst_secret is None and _plain(opts):
        copy_file(src, dst, reflink=reflink, monitor=monitor, keep_target=target_exists)
        return
    if reflink == "always":
        raise InvalidArgument("a reflink copy is only possible between raw images")
    opts = dataclasses.replace(opts) if opts is not None else ImageOptions(format=dst_fmt)
    opts.format = dst_fmt
    if dst_secret is not None:
        enc = opts.encryption or Encryption()
        opts.encryption = dataclasses.replace(enc, secret=dst_secret, secret_file=None)
    src_enc = Encryption(secret=src_secret) if src_secret is not None else None
    size = _virtual_size(src, src_fmt, encrypted=src_enc is not None)
    if not monitor.total:
        monitor.set_total(size)
    monitor.check()
    with contextlib.ExitStack() as stack:
        argv = _argv(src, src_fmt, dst, dst_fmt, opts, src_enc, size, target_exists,
                     monitor, stack)
        _run_with_progress(argv, monitor)


def _virtual_size(src: str, src_fmt: str, *, encrypted: bool) -> int:
    info = probe_image(src)
    if not info.corrupt and (info.format == src_fmt or encrypted):
        return info.virtual_size
    size = qemuimg.info(src, src_fmt).get("virtual-size")
    if not isinstance(size, int):
        raise InvalidArgument(f"cannot tell the size of '{src}'")
    return size


def _argv(src: str, src_fmt: str, dst: str, dst_fmt: str, opts: ImageOptions,
          src_enc: Encryption | None, size: int, target_exists: bool, monitor: Monitor,
          stack: contextlib.ExitStack) -> list[str]:
    argv = [qemuimg.QEMU_IMG, "convert", "-p"]
    if monitor.bandwidth is not None:
        argv += ["-r", str(monitor.bandwidth)]
    dst_driver = qemuimg.effective_format(opts)
    if src_enc is None and opts.encryption is None:
        argv += ["-f", src_fmt, "-O", dst_driver]
        if target_exists:
            argv.append("-n")
        else:
            qemuimg.validate(dataclasses.replace(opts, capacity=size))
            options = qemuimg.create_options(opts)
            if options:
                argv += ["-o", ",".join(options)]
        return [*argv, os.path.abspath(src), os.path.abspath(dst)]
    # Encrypted source or target: as libvirt, create the target first and give both
    # sides as --image-opts with their secrets.
    if not target_exists:
        qemuimg.create(dst, dataclasses.replace(opts, capacity=size))
    argv += ["--image-opts", "-n", "--target-image-opts"]
    src_driver = "luks" if src_enc is not None and src_fmt in RAW_FORMATS else src_fmt
    if opts.encryption is not None:
        argv += stack.enter_context(qemuimg._secret_object(opts.encryption, "dst_encrypt0"))
    if src_enc is not None:
        argv += stack.enter_context(qemuimg._secret_object(src_enc, "src_encrypt0"))
    argv.append(qemuimg._image_opts(src, src_driver, src_enc, "src_encrypt0"))
    argv.append(qemuimg._image_opts(dst, dst_driver, opts.encryption, "dst_encrypt0"))
    return argv


_PBKDF_RETRIES = 50


def _run_with_progress(argv: list[str], monitor: Monitor) -> None:
    base = monitor.done
    span = max(0, monitor.total - base)

    def on_line(line: str) -> None:
        m = _PROGRESS.search(line)
        if m is not None:
            # qemu-img itself keeps to the bandwidth (-r): count, don't sleep.
            monitor.advance_to(base + int(span * float(m.group(1)) / 100), metered=False)

    for attempt in range(_PBKDF_RETRIES):
        try:
            stream(argv, on_line, should_stop=monitor.cancelled, timeout=None)
            break
        except CommandFailed as exc:
            # qemu 7.2's LUKS key-derivation benchmark fails at random before any data is
            # written (see formats.qemuimg); the same command is simply run again.
            if FLAKY_PBKDF not in exc.stderr or attempt == _PBKDF_RETRIES - 1:
                raise
    monitor.advance_to(base + span, metered=False)
