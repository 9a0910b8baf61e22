"""qemu-img for what we do not do ourselves: create with options, convert, info, check, resize.

Everything runs through ``virtstore.host.runner.run``. Options follow libvirt's
storage driver (storagevolxml2argv): the same ``-o`` names, the same refusals, and
LUKS secrets passed as ``--object secret,id=...,file=...`` pointing at a 0600 file,
never on the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtstore.errors import CommandFailed, InvalidArgument, Unsupported
from virtstore.formats.qcow2 import LAZY_NEEDS_V3, compat_version
from virtstore.host.files import secret_file
from virtstore.host.runner import Result, run

QEMU_IMG = "qemu-img"

# Formats we can create, and the preallocation modes each accepts. "iso" is created
# as a raw file (libvirt does the same: an empty ISO volume is raw space a tool
# fills later); copying an ISO is a raw copy.
SUPPORTED_CREATE_FORMATS: Mapping[str, frozenset[str]] = {
    "raw": frozenset({"off", "falloc", "full"}),
    "iso": frozenset({"off", "falloc", "full"}),
    "qcow2": frozenset({"off", "metadata", "falloc", "full"}),
    "qed": frozenset({"off"}),
    "vmdk": frozenset({"off"}),
    "vdi": frozenset({"off"}),
    "vpc": frozenset({"off"}),
    "luks": frozenset({"off", "falloc", "full"}),
}
READ_ONLY_FORMATS = frozenset({"bochs", "cloop", "dmg", "cow", "qcow", "vhdx", "ploop"})
ENCRYPTABLE = frozenset({"raw", "luks", "qcow2"})
PREALLOCATION_MODES = frozenset({"off", "metadata", "falloc", "full"})
QCOW2_ONLY = ("compat, lazy refcounts and extended L2 need format qcow2; "
              "a cluster size needs qcow2 or qed")
# Debian 12's qemu 7.2 carries a PBKDF benchmark that fails at random on fast CPUs
# (getrusage reports 0 ms for its first, short round: upstream fixed it in 2025).
# It fails within ~10 ms and about every other run here, so retry it a few times.
FLAKY_PBKDF = "Unable to get accurate CPU usage"
# Under load it can fail many times in a row; each try costs ~10 ms.
_RETRIES = 50


@dataclass
class Encryption:
    """libvirt's <encryption format='luks'>: a secret plus optional cipher and ivgen."""

    format: str = "luks"
    secret: bytes | None = None  # the passphrase; written to a 0600 file, never argv
    secret_file: str | None = None  # or a file that already holds it
    cipher: Mapping[str, str | int] | None = None  # name, size, mode, hash
    ivgen: Mapping[str, str] | None = None  # name, hash


@dataclass
class ImageOptions:
    format: str = "raw"
    capacity: int | None = None  # bytes; None only with a backing file (its size)
    compat: str | None = None  # qcow2; None: "1.1" with features, else "0.10" (libvirt)
    cluster_size: int | None = None
    lazy_refcounts: bool = False
    extended_l2: bool = False
    nocow: bool = False
    preallocation: str | None = None  # None, "off", "metadata", "falloc", "full"
    backing_file: str | None = None
    backing_format: str | None = None
    encryption: Encryption | None = None
    extra: dict[str, str] = field(default_factory=dict)  # more -o options, verbatim


def effective_format(opts: ImageOptions) -> str:
    """The qemu driver: libvirt describes a LUKS volume as raw with <encryption>."""
    if opts.format in ("raw", "iso") and opts.encryption is not None:
        return "luks"
    if opts.format == "iso":
        return "raw"
    return opts.format


def effective_compat(opts: ImageOptions) -> str | None:
    if opts.format != "qcow2":
        return None
    if opts.compat:
        return opts.compat
    return "1.1" if opts.lazy_refcounts or opts.extended_l2 else "0.10"


def validate(opts: ImageOptions) -> None:
    """Refuse what libvirt or qemu-img refuses, before anything is run."""
    fmt = opts.format
    if fmt not in SUPPORTED_CREATE_FORMATS:
        if fmt in READ_ONLY_FORMATS:
            raise Unsupported(f"creating volumes in format '{fmt}' is not supported")
        raise InvalidArgument(f"unknown storage volume format '{fmt}'")
    if fmt != "qcow2" and (opts.compat or opts.lazy_refcounts or opts.extended_l2
                           or (opts.cluster_size and fmt != "qed")):
        raise InvalidArgument(QCOW2_ONLY)
    compat = effective_compat(opts)
    if compat is not None:
        version = compat_version(compat)
        if opts.lazy_refcounts and version < 3:
            raise InvalidArgument(LAZY_NEEDS_V3)
        if opts.extended_l2 and version < 3:
            raise InvalidArgument("extended L2 entries need qcow2 compat level 1.1")
    if opts.capacity is None and not opts.backing_file:
        raise InvalidArgument("a capacity is needed when there is no backing file")
    if opts.capacity is not None and opts.capacity < 0:
        raise InvalidArgument(f"invalid capacity {opts.capacity}")
    if opts.backing_file and not opts.backing_format:
        raise InvalidArgument("a backing file needs its format")
    if opts.backing_file and fmt not in ("qcow2", "qed", "vmdk"):
        raise Unsupported(f"format '{fmt}' cannot have a backing file")
    prealloc = opts.preallocation
    if prealloc is not None:
        if prealloc not in PREALLOCATION_MODES:
            raise InvalidArgument(f"unknown preallocation mode '{prealloc}'")
        if prealloc not in SUPPORTED_CREATE_FORMATS[effective_format(opts)]:
            raise Unsupported(f"preallocation '{prealloc}' is not supported for format "
                              f"'{effective_format(opts)}'")
        if prealloc != "off" and opts.backing_file and not opts.extended_l2:
            raise InvalidArgument("preallocation and a backing file can only be used "
                                  "together with extended L2 entries")
    _validate_encryption(opts)


def _validate_encryption(opts: ImageOptions) -> None:
    enc = opts.encryption
    if enc is None:
        if opts.format == "luks":
            raise InvalidArgument("a luks volume needs an encryption secret")
        return
    if enc.format in ("qcow", "default"):
        raise Unsupported("qcow encryption is no longer supported for new volumes: "
                          "use encryption format 'luks'")
    if enc.format != "luks":
        raise InvalidArgument(f"unknown encryption format '{enc.format}'")
    if opts.format not in ENCRYPTABLE and opts.format != "iso":
        raise Unsupported(f"format '{opts.format}' cannot be encrypted")
    if (enc.secret is None) == (enc.secret_file is None):
        raise InvalidArgument("luks encryption needs exactly one of a secret or a secret file")


def _escape(value: str) -> str:
    """qemu option values escape ',' by doubling it."""
    return value.replace(",", ",,")


def _encryption_opts(enc: Encryption, secret_id: str, prefix: str) -> list[str]:
    opts = [f"{prefix}key-secret={secret_id}"]
    if prefix:
        opts.insert(0, "encrypt.format=luks")
    if enc.cipher:
        name, size = enc.cipher.get("name"), enc.cipher.get("size")
        if name:
            opts.append(f"{prefix}cipher-alg={name}-{size}" if size else
                        f"{prefix}cipher-alg={name}")
        if enc.cipher.get("mode"):
            opts.append(f"{prefix}cipher-mode={enc.cipher['mode']}")
        if enc.cipher.get("hash"):
            opts.append(f"{prefix}hash-alg={enc.cipher['hash']}")
    if enc.ivgen:
        if enc.ivgen.get("name"):
            opts.append(f"{prefix}ivgen-alg={enc.ivgen['name']}")
        if enc.ivgen.get("hash"):
            opts.append(f"{prefix}ivgen-hash-alg={enc.ivgen['hash']}")
    return opts


@contextlib.contextmanager
def _secret_object(enc: Encryption, secret_id: str) -> Iterator[list[str]]:
    """``--object secret,...`` reading the key from a file; a 0600 temp file for a
    secret given as bytes, removed afterwards."""
    if enc.secret_file is not None:
        yield ["--object", f"secret,id={secret_id},file={_escape(enc.secret_file)}"]
        return
    assert enc.secret is not None
    with secret_file(enc.secret) as tmp:
        yield ["--object", f"secret,id={secret_id},file={_escape(tmp)}"]


def create_options(opts: ImageOptions, secret_id: str | None = None) -> list[str]:
    """The ``-o`` list for ``qemu-img create``/``convert`` (libvirt's order)."""
    fmt = effective_format(opts)
    out: list[str] = []
    if opts.backing_format and opts.backing_file:
        out.append(f"backing_fmt={opts.backing_format}")
    if opts.encryption is not None and secret_id is not None:
        out += _encryption_opts(opts.encryption, secret_id, "encrypt." if fmt == "qcow2" else "")
    if opts.preallocation and opts.preallocation != "off":
        out.append(f"preallocation={opts.preallocation}")
    if opts.nocow:
        out.append("nocow=on")
    compat = effective_compat(opts)
    if compat:
        out.append(f"compat={compat}")
    if opts.cluster_size:
        out.append(f"cluster_size={opts.cluster_size}")
    if opts.lazy_refcounts:
        out.append("lazy_refcounts=on")
    if opts.extended_l2:
        out.append("extended_l2=on")
    out += [f"{k}={_escape(v)}" for k, v in opts.extra.items()]
    return out


def _run(argv: Sequence[str], timeout: float | None) -> Result:
    for attempt in range(_RETRIES):
        try:
            return run(argv, timeout=timeout)
        except CommandFailed as exc:
            if FLAKY_PBKDF not in exc.stderr or attempt == _RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _abs(path: str) -> str:
    # A relative name with a ':' would be read by qemu as a protocol ("nbd:...").
    return os.path.abspath(path)


def create(path: str, opts: ImageOptions, *, timeout: float | None = 600.0) -> None:
    """``qemu-img create`` a new image at ``path`` (qemu-img creates or truncates it)."""
    validate(opts)
    fmt = effective_format(opts)
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if opts.backing_file:
        argv += ["-b", opts.backing_file]
    secret_id = "virtstore_encrypt0" if opts.encryption else None
    with contextlib.ExitStack() as stack:
        if opts.encryption is not None and secret_id is not None:
            argv += stack.enter_context(_secret_object(opts.encryption, secret_id))
        options = create_options(opts, secret_id)
        if options:
            argv += ["-o", ",".join(options)]
        argv.append(_abs(path))
        if opts.capacity is not None:
            argv.append(str(opts.capacity))
        _run(argv, timeout)


def _image_opts(path: str, fmt: str, enc: Encryption | None, secret_id: str) -> str:
    spec = f"driver={fmt},file.filename={_escape(_abs(path))}"
    if enc is not None:
        spec += f",{'encrypt.' if fmt == 'qcow2' else ''}key-secret={secret_id}"
    return spec


def convert(src: str, src_fmt: str, dst: str, dst_fmt: str, opts: ImageOptions | None = None,
            *, target_exists: bool = False, src_encryption: Encryption | None = None,
            parallel_writes: bool = False, timeout: float | None = None) -> None:
    """``qemu-img convert`` ``src`` into ``dst`` (no progress output; -W if asked).

    Without encryption, ``-n`` writes into an existing target and otherwise qemu-img
    creates it with ``opts``. With an encrypted source or target, the target is
    created first (when needed) and both sides are given as --image-opts, as libvirt
    does.
    """
    opts = opts or ImageOptions(format=dst_fmt)
    dst_driver = effective_format(ImageOptions(format=dst_fmt, encryption=opts.encryption))
    if src_encryption is None and opts.encryption is None:
        argv = [QEMU_IMG, "convert", "-f", src_fmt, "-O", dst_driver]
        if target_exists:
            argv.append("-n")
        else:
            validate(_with_capacity(opts, dst_fmt))
            options = create_options(opts)
            if options:
                argv += ["-o", ",".join(options)]
        if parallel_writes:
            argv.append("-W")
        _run([*argv, _abs(src), _abs(dst)], timeout)
        return
    if not target_exists:
        if opts.capacity is None:
            raise InvalidArgument("converting into a new encrypted image needs its capacity")
        create(dst, opts)
    argv = [QEMU_IMG, "convert", "--image-opts", "-n", "--target-image-opts"]
    if parallel_writes:
        argv.append("-W")
    src_driver = "luks" if src_encryption is not None and src_fmt in ("raw", "iso") else src_fmt
    with contextlib.ExitStack() as stack:
        if opts.encryption is not None:
            argv += stack.enter_context(_secret_object(opts.encryption, "dst_encrypt0"))
        if src_encryption is not None:
            argv += stack.enter_context(_secret_object(src_encryption, "src_encrypt0"))
        argv.append(_image_opts(src, src_driver, src_encryption, "src_encrypt0"))
        argv.append(_image_opts(dst, dst_driver, opts.encryption, "dst_encrypt0"))
        _run(argv, timeout)


def _with_capacity(opts: ImageOptions, fmt: str) -> ImageOptions:
    # convert takes the size from its source: validate the rest as if it had one.
    copy = ImageOptions(**{**opts.__dict__, "format": fmt})
    copy.capacity = 0 if copy.capacity is None else copy.capacity
    return copy


def info(path: str, fmt: str | None = None, *, backing_chain: bool = False,
         timeout: float | None = 60.0) -> Any:
    """``qemu-img info --output=json -U``: a dict (a list of dicts with the chain)."""
    argv = [QEMU_IMG, "info", "--output=json", "-U"]
    if fmt:
        argv += ["-f", fmt]
    if backing_chain:
        argv.append("--backing-chain")
    return json.loads(run([*argv, _abs(path)], timeout=timeout).stdout)


def measure(out_fmt: str, *, image: str | None = None, fmt: str | None = None,
            image_opts: str | None = None, objects: Sequence[str] = (),
            timeout: float | None = 120.0) -> dict[str, int]:
    """``qemu-img measure``: the bytes a copy of the image in ``out_fmt`` needs
    (``required``: its data and metadata; ``fully-allocated``: preallocated)."""
    argv = [QEMU_IMG, "measure", "--output=json", "-O", out_fmt]
    for obj in objects:
        argv += ["--object", obj]
    if image_opts is not None:
        argv += ["--image-opts", image_opts]
    elif image is not None:
        argv += [*(["-f", fmt] if fmt else []), _abs(image)]
    else:
        raise InvalidArgument("qemu-img measure needs an image")
    out = json.loads(run(argv, timeout=timeout).stdout)
    return {"required": int(out["required"]),
            "fully_allocated": int(out["fully-allocated"])}


def check(path: str, fmt: str | None = None, *, timeout: float | None = 3600.0) -> dict[str, Any]:
    """``qemu-img check --output=json``. Corruptions and leaks (exit 2, 3) are reported
    in the result, with ``"returncode"`` added; only a failure to check raises."""
    argv = [QEMU_IMG, "check", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    result = run([*argv, _abs(path)], timeout=timeout, check=False)
    if result.returncode not in (0, 2, 3) or not result.stdout.strip():
        why = (result.stderr or result.stdout).strip().splitlines()
        raise CommandFailed(f"'qemu-img check' failed (exit {result.returncode}): "
                            f"{why[-1] if why else 'no output'}", argv=result.argv,
                            returncode=result.returncode, stderr=result.stderr)
    report: dict[str, Any] = json.loads(result.stdout)
    report["returncode"] = result.returncode
    return report


def resize(path: str, size: int, fmt: str, *, shrink: bool = False,
           preallocation: str | None = None, timeout: float | None = 600.0) -> None:
    """``qemu-img resize``; shrinking must be asked for explicitly."""
    if size < 0:
        raise InvalidArgument(f"invalid capacity {size}")
    if fmt in ("luks", "qcow") or fmt not in SUPPORTED_CREATE_FORMATS:
        raise Unsupported(f"resizing format '{fmt}' with qemu-img is not supported")
    argv = [QEMU_IMG, "resize", "-q", "-f", fmt]
    if shrink:
        argv.append("--shrink")
    if preallocation and preallocation != "off":
        argv.append(f"--preallocation={preallocation}")
    _run([*argv, _abs(path), str(size)], timeout)
