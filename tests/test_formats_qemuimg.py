"""qemuimg and raw against real qemu-img and real files."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from virtstore.errors import CommandFailed, InvalidArgument, NoSpace, Unsupported
from virtstore.formats import qemuimg
from virtstore.formats.native import create_natively
from virtstore.formats.probe import probe_image
from virtstore.formats.qcow2 import create_qcow2
from virtstore.formats.qemuimg import Encryption, ImageOptions
from virtstore.formats.raw import create_raw, set_nocow
from virtstore.host import runner

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0,
    reason="qemu-img is not installed")

MIB = 1 << 20
SECRET = b"correct horse battery staple"
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "libvirt"


def luks(**kw: Any) -> Encryption:
    return Encryption(secret=SECRET, **kw)


def data(info: dict[str, Any]) -> dict[str, Any]:
    return dict(info.get("format-specific", {}).get("data", {}))


@pytest.fixture
def argvs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every argv qemuimg runs, with the secret files' modes seen while they exist."""
    seen: list[list[str]] = []
    real = runner.run

    def spy(argv: Sequence[str], **kw: Any) -> runner.Result:
        seen.append(list(argv))
        for arg in argv:
            if arg.startswith("secret,"):
                secret_file = arg.split("file=", 1)[1]
                assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
        return real(argv, **kw)

    monkeypatch.setattr(qemuimg, "run", spy)
    return seen


CREATE_CASES: list[tuple[str, ImageOptions, dict[str, Any]]] = [
    ("raw", ImageOptions("raw", 10 * MIB), {"format": "raw"}),
    ("iso", ImageOptions("iso", MIB), {"format": "raw"}),
    ("qcow2-default", ImageOptions("qcow2", 10 * MIB), {"format": "qcow2", "compat": "0.10"}),
    ("qcow2-lazy", ImageOptions("qcow2", 10 * MIB, lazy_refcounts=True),
     {"compat": "1.1", "lazy-refcounts": True}),
    ("qcow2-cluster", ImageOptions("qcow2", 10 * MIB, compat="1.1", cluster_size=131072,
                                   extended_l2=True),
     {"cluster-size": 131072, "extended-l2": True}),
    ("qcow2-prealloc", ImageOptions("qcow2", 10 * MIB, preallocation="metadata"),
     {"compat": "0.10"}),
    ("qcow2-nocow", ImageOptions("qcow2", 10 * MIB, nocow=True), {"format": "qcow2"}),
    ("qed", ImageOptions("qed", 10 * MIB, cluster_size=1 << 16), {"cluster-size": 65536}),
    ("vmdk", ImageOptions("vmdk", 10 * MIB), {"format": "vmdk"}),
    ("vdi", ImageOptions("vdi", 10 * MIB), {"format": "vdi"}),
    ("vpc", ImageOptions("vpc", 10 * MIB), {"format": "vpc"}),
    ("luks", ImageOptions("luks", 10 * MIB, encryption=luks()),
     {"format": "luks", "encrypted": True}),
    ("raw-luks-cipher", ImageOptions("raw", 10 * MIB, encryption=luks(
        cipher={"name": "serpent", "size": 256, "mode": "cbc", "hash": "sha256"},
        ivgen={"name": "plain64", "hash": "sha256"})),
     {"format": "luks", "cipher-alg": "serpent-256", "cipher-mode": "cbc",
      "ivgen-alg": "plain64", "hash-alg": "sha256"}),
    ("qcow2-luks", ImageOptions("qcow2", 10 * MIB, compat="1.1", encryption=luks()),
     {"format": "qcow2", "encrypted": True}),
]


@pytest.mark.parametrize(("opts", "expect"), [c[1:] for c in CREATE_CASES],
                         ids=[c[0] for c in CREATE_CASES])
def test_create_each_format(tmp_path: Path, argvs: list[list[str]], opts: ImageOptions,
                            expect: dict[str, Any]) -> None:
    path = tmp_path / "vol"
    qemuimg.create(str(path), opts)
    got = qemuimg.info(str(path))
    if opts.format == "vpc":  # qemu rounds a VHD up to whole CHS cylinders
        assert opts.capacity is not None
        assert opts.capacity <= got["virtual-size"] < opts.capacity + 16 * 63 * 512
    else:
        assert got["virtual-size"] == opts.capacity
    flat = {**got, **data(got)}
    for key, value in expect.items():
        assert flat.get(key, False) == value, key
    probed = probe_image(str(path))
    assert probed.format == ("raw" if opts.format == "iso" else flat["format"])
    assert probed.virtual_size == got["virtual-size"]
    for argv in argvs:
        assert not any(SECRET.decode() in a for a in argv)
    assert not any(a.startswith("secret,") and os.path.exists(a.split("file=")[1])
                   for argv in argvs for a in argv)


def test_luks_cipher_options_match_libvirt() -> None:
    expected = (CONFORMANCE / "storagevolxml2argvdata" / "luks-cipher.argv").read_text()
    opts = ImageOptions("raw", 5 * MIB, encryption=luks(
        cipher={"name": "serpent", "size": 256, "mode": "cbc", "hash": "sha256"},
        ivgen={"name": "plain64", "hash": "sha256"}))
    ours = ",".join(qemuimg.create_options(opts, "LuksDemo.img_encrypt0"))
    assert f"-o {ours} " in expected.replace("\\\n", "")
    qcow = ImageOptions("qcow2", 5 * MIB, encryption=luks(), backing_file="/dev/null",
                        backing_format="raw")
    expected = (CONFORMANCE / "storagevolxml2argvdata" / "qcow2-luks.argv").read_text()
    ours = ",".join(qemuimg.create_options(qcow, "OtherDemoLuks.img_encrypt0"))
    assert f"-o {ours} " in expected.replace("\\\n", "")


def test_backing_file_and_no_capacity(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemuimg.create(str(base), ImageOptions("raw", 3 * MIB))
    top = tmp_path / "top.qcow2"
    qemuimg.create(str(top), ImageOptions("qcow2", backing_file=str(base), backing_format="raw"))
    got = qemuimg.info(str(top))
    assert (got["virtual-size"], got["backing-filename"], got["backing-filename-format"]) == (
        3 * MIB, str(base), "raw")
    chain = qemuimg.info(str(top), backing_chain=True)
    assert [c["format"] for c in chain] == ["qcow2", "raw"]


@pytest.mark.parametrize(("opts", "error", "message"), [
    (ImageOptions("qcow2", MIB, compat="0.10", lazy_refcounts=True), InvalidArgument,
     "lazy refcounts not supported with compat level 0.10"),
    (ImageOptions("qcow2", MIB, encryption=Encryption(format="qcow", secret=b"x")),
     Unsupported, "qcow encryption"),
    (ImageOptions("qcow2", MIB, encryption=Encryption(format="default", secret=b"x")),
     Unsupported, "qcow encryption"),
    (ImageOptions("qcow2", MIB, preallocation="metadata", backing_file="/dev/null",
                  backing_format="raw"), InvalidArgument, "preallocation"),
    (ImageOptions("raw", MIB, preallocation="metadata"), Unsupported, "preallocation"),
    (ImageOptions("bogus", MIB), InvalidArgument, "unknown"),
    (ImageOptions("vhdx", MIB), Unsupported, "vhdx"),
    (ImageOptions("raw", MIB, compat="1.1"), InvalidArgument, "qcow2"),
    (ImageOptions("luks", MIB), InvalidArgument, "secret"),
    (ImageOptions("vmdk", MIB, encryption=Encryption(secret=b"x")), Unsupported, "encrypted"),
    (ImageOptions("qcow2"), InvalidArgument, "capacity"),
    (ImageOptions("qcow2", MIB, backing_file="/dev/null"), InvalidArgument, "format"),
])
def test_refusals(tmp_path: Path, argvs: list[list[str]], opts: ImageOptions,
                  error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        qemuimg.create(str(tmp_path / "x"), opts)
    assert argvs == [] and not (tmp_path / "x").exists()


def test_qemu_failure_is_command_failed(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed, match="qemu-img"):
        qemuimg.create(str(tmp_path / "no" / "dir" / "x"), ImageOptions("qcow2", MIB))
    with pytest.raises(CommandFailed):
        qemuimg.info(str(tmp_path / "missing"))


def fill(path: Path, size: int) -> bytes:
    blob = os.urandom(64 * 1024)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MIB)
        f.write(blob)
    return blob


def test_convert_plain(tmp_path: Path, argvs: list[list[str]]) -> None:
    src = tmp_path / "src.raw"
    fill(src, 4 * MIB)
    dst = tmp_path / "dst.qcow2"
    qemuimg.convert(str(src), "raw", str(dst), "qcow2", ImageOptions("qcow2", compat="1.1"))
    assert "-p" not in argvs[-1] and "-n" not in argvs[-1]
    assert data(qemuimg.info(str(dst)))["compat"] == "1.1"
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(src), str(dst)],
                   check=True)
    back = tmp_path / "back.raw"
    back.touch()
    create_raw(str(back), 4 * MIB)
    qemuimg.convert(str(dst), "qcow2", str(back), "raw", target_exists=True,
                    parallel_writes=True)
    assert "-n" in argvs[-1] and "-W" in argvs[-1]
    assert back.read_bytes() == src.read_bytes()


def test_convert_encrypted_both_ways(tmp_path: Path, argvs: list[list[str]]) -> None:
    src = tmp_path / "src.raw"
    blob = fill(src, 4 * MIB)
    enc = tmp_path / "enc.luks"
    qemuimg.convert(str(src), "raw", str(enc), "raw",
                    ImageOptions("raw", 4 * MIB, encryption=luks()))
    assert probe_image(str(enc)).format == "luks"
    assert blob not in enc.read_bytes()
    plain = tmp_path / "plain.qcow2"
    qemuimg.create(str(plain), ImageOptions("qcow2", 4 * MIB))
    qemuimg.convert(str(enc), "raw", str(plain), "qcow2", target_exists=True,
                    src_encryption=luks())
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(src),
                    str(plain)], check=True)
    assert "--image-opts" in argvs[-1]
    assert not any(SECRET.decode() in a for argv in argvs for a in argv)


def test_secret_file_is_used_as_given(tmp_path: Path, argvs: list[list[str]]) -> None:
    key = tmp_path / "key"
    key.write_bytes(SECRET)
    key.chmod(0o600)
    path = tmp_path / "v.luks"
    qemuimg.create(str(path), ImageOptions("luks", MIB, encryption=Encryption(
        secret_file=str(key))))
    assert f"secret,id=virtstore_encrypt0,file={key}" in argvs[-1]
    assert key.exists()
    assert probe_image(str(path)).virtual_size == MIB


def test_check_reports_leaks_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    path.touch()
    create_qcow2(str(path), MIB)
    clean = qemuimg.check(str(path))
    assert clean["returncode"] == 0 and clean.get("leaks", 0) == 0
    with open(path, "r+b") as f:  # give an unused cluster a reference count
        f.truncate(6 * 65536)
        f.seek(2 * 65536 + 2 * 4)
        f.write(struct.pack(">H", 1))
    leaky = qemuimg.check(str(path))
    assert leaky["returncode"] == 3 and leaky["leaks"] == 1
    (tmp_path / "junk").write_bytes(b"QFI\xfb" + bytes(100))
    with pytest.raises(CommandFailed):
        qemuimg.check(str(tmp_path / "junk"), "qcow2")


def test_resize(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemuimg.create(str(path), ImageOptions("qcow2", MIB))
    qemuimg.resize(str(path), 8 * MIB, "qcow2")
    assert probe_image(str(path)).virtual_size == 8 * MIB
    raw = tmp_path / "a.raw"
    qemuimg.create(str(raw), ImageOptions("raw", 8 * MIB))
    with pytest.raises(CommandFailed, match=r"(?i)shrink"):
        qemuimg.resize(str(raw), MIB, "raw")
    qemuimg.resize(str(raw), MIB, "raw", shrink=True)
    assert raw.stat().st_size == MIB
    with pytest.raises(Unsupported):
        qemuimg.resize(str(raw), MIB, "luks")


def test_create_raw_sparse_and_allocated(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    sparse.touch()
    create_raw(str(sparse), 64 * MIB)
    assert (sparse.stat().st_size, sparse.stat().st_blocks) == (64 * MIB, 0)
    full = tmp_path / "full"
    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        create_raw(fd, 8 * MIB, 8 * MIB)
    finally:
        os.close(fd)
    assert full.stat().st_blocks * 512 >= 8 * MIB
    part = tmp_path / "part"
    part.touch()
    create_raw(str(part), 8 * MIB, 2 * MIB)
    assert 2 * MIB <= part.stat().st_blocks * 512 < 8 * MIB
    with pytest.raises(InvalidArgument):
        create_raw(str(part), -1)


@contextlib.contextmanager
def mounted(tmp_path: Path, argv: list[str]) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([*argv, str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a test filesystem here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_create_raw_no_space(tmp_path: Path) -> None:
    with mounted(tmp_path, ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs"]) as mnt:
        path = mnt / "big"
        path.touch()
        with pytest.raises(NoSpace):
            create_raw(str(path), 64 * MIB, 64 * MIB)
        assert path.exists()  # removing it is the caller's job
        path.unlink()


def test_nocow_on_btrfs_and_not_elsewhere(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.touch()
    fd = os.open(plain, os.O_RDONLY)
    try:
        on_tmp = set_nocow(fd)
    finally:
        os.close(fd)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                        text=True).stdout.strip()
    assert on_tmp == (fs == "btrfs")
    image = tmp_path / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(128 * MIB)
    if subprocess.run(["mkfs.btrfs", "-q", str(image)], capture_output=True).returncode:
        pytest.skip("mkfs.btrfs is not available")
    with mounted(tmp_path, ["mount", "-o", "loop", str(image)]) as mnt:
        path = mnt / "vol"
        path.touch()
        create_raw(str(path), 4 * MIB, nocow=True)
        out = subprocess.run(["lsattr", str(path)], capture_output=True, text=True).stdout
        assert "C" in out.split()[0]


NATIVE_CASES = [
    ImageOptions("qcow2", 10 * MIB),
    ImageOptions("qcow2", 10 * MIB, compat="1.1", lazy_refcounts=True, cluster_size=4096),
    ImageOptions("qcow2", None, backing_file="/dev/null", backing_format="raw"),
    ImageOptions("qcow2", 10 * MIB, backing_file="/dev/null", backing_format="raw"),
    ImageOptions("raw", 10 * MIB),
    ImageOptions("raw", 10 * MIB, preallocation="falloc"),
]


@pytest.mark.parametrize("opts", NATIVE_CASES)
def test_native_create_equals_qemu_img(tmp_path: Path, opts: ImageOptions) -> None:
    q, n = tmp_path / "q", tmp_path / "n"
    qemuimg.create(str(q), opts)
    n.touch()
    if opts.capacity is None:  # only qemu-img reads a backing file's size
        assert not create_natively(str(n), opts)
        return
    assert create_natively(str(n), opts)
    assert q.read_bytes() == n.read_bytes()
    if opts.format == "raw":
        # Both sparse (qemu-img allocates one block to probe alignment) or both allocated.
        allocated = [p.stat().st_blocks * 512 >= p.stat().st_size for p in (q, n)]
        assert allocated[0] == allocated[1] == (opts.preallocation == "falloc")


@pytest.mark.parametrize("opts", [
    ImageOptions("qcow2", MIB, preallocation="metadata"),
    ImageOptions("qcow2", MIB, compat="1.1", extended_l2=True),
    ImageOptions("raw", MIB, preallocation="full"),
    ImageOptions("luks", MIB, encryption=luks()),
    ImageOptions("vmdk", MIB),
])
def test_native_create_declines(tmp_path: Path, opts: ImageOptions) -> None:
    path = tmp_path / "x"
    path.touch()
    assert not create_natively(str(path), opts)
    assert path.stat().st_size == 0
    with pytest.raises(InvalidArgument):
        create_natively(str(path), ImageOptions("qcow2", MIB, compat="0.10",
                                                lazy_refcounts=True))
