#!/usr/bin/env python3
"""Coverage-guided fuzzing of virtstore's XML parsers with atheris (not run in CI).

The property is the one of tests/reliability/test_xml_fuzz.py: every input is either
refused with XMLError / InvalidArgument, or accepted; an accepted document formats
to output that parses back to the same model (fields libvirt does not print back are
normalised) and that validates against libvirt's schema whenever the input did. Any
other exception, or a broken property, is a crash atheris reports and saves.

Install and run (atheris ships manylinux wheels for CPython 3.11 on x86_64; where no
wheel fits, pip builds it from source and needs clang with libFuzzer):

    .venv/bin/pip install atheris
    mkdir -p /var/lib/virtstore-fuzz/corpus
    .venv/bin/python fuzz/atheris_xml.py /var/lib/virtstore-fuzz/corpus \\
        -max_total_time=3600 -max_len=65536

On this project's CI image the 2.3.0 wheel installs and runs. Within a minute it
reports one known finding (docs/reliability.md): a logical pool's <host>/<dir> source
elements are kept in the model but not printed, so the model does not round-trip;
libFuzzer's -ignore_crashes=1 with -fork=N keeps going past it.

The conformance corpus (shared/conformance/libvirt, or VIRTSTORE_CONFORMANCE) seeds
the run: its pool and volume inputs are copied into the corpus directory given first
when that directory is empty. The first byte of each input picks what it is parsed as:
even for a pool, odd for a volume (in a dir pool).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

try:
    import atheris
except ImportError:  # pragma: no cover - the script's only dependency outside the venv
    sys.exit("atheris is not installed: .venv/bin/pip install atheris")

with atheris.instrument_imports():
    from virtstore.errors import InvalidArgument, XMLError
    from virtstore.xml import (
        PoolDef,
        PoolTarget,
        VolDef,
        format_pool_xml,
        format_volume_xml,
        parse_pool_xml,
        parse_volume_xml,
        validate,
    )

CONFORMANCE = Path(os.environ.get("VIRTSTORE_CONFORMANCE",
                                  REPO.parent / "shared" / "conformance" / "libvirt"))
DIR_POOL = PoolDef(type="dir", name="fuzz", target=PoolTarget(path="/var/lib/virtstore/fuzz"))


def _normal_vol(v: VolDef) -> VolDef:
    v = copy.deepcopy(v)
    if not v.capacity_given:
        v.capacity, v.capacity_given = v.capacity or 0, True
    v.allocation_given = True
    v.target = dataclasses.replace(v.target, nocow=False)
    return v


def _schema_ok(text: bytes, out: str, kind: str) -> None:
    try:
        validate(out, kind)
    except XMLError:
        try:
            validate(text, kind)
        except XMLError:
            return  # the input was not schema-valid either (libvirt's parser is lenient)
        raise


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, text = ("volume" if data[0] & 1 else "pool"), data[1:]
    try:
        if kind == "pool":
            pool = parse_pool_xml(text)
        else:
            vol = parse_volume_xml(text, DIR_POOL, capacity_optional=True)
    except (XMLError, InvalidArgument) as exc:
        if "\n" in str(exc):
            raise AssertionError("error message is not one line") from exc
        return
    if kind == "pool":
        out = format_pool_xml(pool)
        again = parse_pool_xml(out)
        if again != pool or format_pool_xml(again) != out:
            raise AssertionError(f"pool round trip changed:\n{out}")
    else:
        out = format_volume_xml(vol, DIR_POOL)
        back = parse_volume_xml(out, DIR_POOL, capacity_optional=True)
        if _normal_vol(back) != _normal_vol(vol) or format_volume_xml(back, DIR_POOL) != out:
            raise AssertionError(f"volume round trip changed:\n{out}")
    _schema_ok(text, out, kind)


def _seed(corpus: Path) -> None:
    if any(corpus.iterdir()):
        return
    for prefix, sub in ((b"\x00", "storagepoolxml2xmlin"), (b"\x01", "storagevolxml2xmlin")):
        for f in sorted((CONFORMANCE / sub).glob("*.xml")):
            (corpus / f"{sub}-{f.name}").write_bytes(prefix + f.read_bytes())


def main() -> None:
    dirs = [a for a in sys.argv[1:] if not a.startswith("-")]
    if dirs and not Path(dirs[0]).is_file():  # a file: re-run one saved crash
        Path(dirs[0]).mkdir(parents=True, exist_ok=True)
        _seed(Path(dirs[0]))
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
