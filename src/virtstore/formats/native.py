"""Create a volume without qemu-img when nothing asked for needs it."""

from __future__ import annotations

import os

from virtstore.formats.qcow2 import create_qcow2
from virtstore.formats.qemuimg import ImageOptions, effective_compat, validate
from virtstore.formats.raw import create_raw, set_nocow

DEFAULT_CLUSTER_SIZE = 65536


def can_create_natively(opts: ImageOptions) -> bool:
    """True for sparse or fallocated raw/iso files and empty qcow2 images without
    encryption, preallocation, extended L2 or extra options."""
    if opts.encryption is not None or opts.extra or opts.capacity is None:
        return False
    if opts.format in ("raw", "iso"):
        return opts.preallocation in (None, "off", "falloc")
    if opts.format == "qcow2":
        return opts.preallocation in (None, "off") and not opts.extended_l2
    return False


def create_natively(target: str | int, opts: ImageOptions) -> bool:
    """Write the image into ``target`` (an existing empty file's path, or an open
    writable descriptor) and return True; return False, writing nothing, when
    qemu-img is needed (``qemuimg.create``). Same validation as ``qemuimg.create``."""
    validate(opts)
    if not can_create_natively(opts):
        return False
    assert opts.capacity is not None
    if opts.format in ("raw", "iso"):
        allocation = opts.capacity if opts.preallocation == "falloc" else 0
        create_raw(target, opts.capacity, allocation, nocow=opts.nocow)
        return True
    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC) if isinstance(target, str) else target
    try:
        if opts.nocow:
            set_nocow(fd)
        create_qcow2(fd, opts.capacity, cluster_size=opts.cluster_size or DEFAULT_CLUSTER_SIZE,
                     compat=effective_compat(opts) or "1.1",
                     lazy_refcounts=opts.lazy_refcounts, backing_file=opts.backing_file,
                     backing_format=opts.backing_format)
    finally:
        if isinstance(target, str):
            os.close(fd)
    return True
