"""vol-move of one volume to another host's virtstored against a move between two pools
of one host: two daemons on this machine (the target through its unix socket), a
sparse raw volume with random data spread over it, one run each.

    python bench/bench_move.py [--size 4G] [--data 512M] [--workdir DIR]

Printed: each move's time, the bytes its progress counted (copy and check, per 4 MiB
chunk that holds data) and what the copy takes on the target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the server recipes

import virtstore  # noqa: E402
from server_fixtures import start_daemon  # noqa: E402
from virtstore.api import size_arg  # noqa: E402

MiB = 1 << 20


def pool_xml(name: str, path: Path) -> str:
    return f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--data", default="512M")
    ap.add_argument("--workdir", default="/var/tmp")
    opts = ap.parse_args()
    size, data = size_arg(opts.size), size_arg(opts.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-move-", dir=opts.workdir))
    a = start_daemon(tmp / "a")
    b = start_daemon(tmp / "b")
    try:
        with virtstore.connect(a.rw_uri) as src, virtstore.connect(b.rw_uri) as dst:
            for conn, name in ((src, "src"), (src, "src2"), (dst, "dst")):
                (tmp / name).mkdir()
                conn.pool_define_xml(pool_xml(name, tmp / name))
                conn.pool_start(name)
            pieces = data // MiB
            step = max(MiB, size // pieces // MiB * MiB)
            for name in ("v1", "v2"):
                src.volume_create_xml("src", f"<volume><name>{name}</name><capacity>{size}"
                                      "</capacity><allocation>0</allocation></volume>")
                with open(tmp / "src" / name, "r+b") as fh:
                    for i in range(pieces):  # 1 MiB of random data every ``step`` bytes
                        fh.seek(i * step)
                        fh.write(os.urandom(MiB))
            runs = (("to another host", "v1", "dst", b.rw_uri),
                    ("to another pool of this host", "v2", "src2", None))
            for label, name, to_pool, target in runs:
                t = time.monotonic()
                info = src.job_wait(src.volume_move("src", name, to_pool, target=target).id)
                took = time.monotonic() - t
                assert info.state == "done", info.error
                print(f"{label}: {took:.1f} s, progress {info.bytes_total // MiB} MiB")
            print(f"the copy on the other host takes "
                  f"{dst.volume_info('dst', 'v1').allocation // MiB} MiB")
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
