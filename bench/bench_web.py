"""The web page at 100,000 volumes: how long the first page of the volume table takes to
show, in headless Chromium, and what the paged listing costs the daemon.

Measurement only (no assertion): the goal is a first page under a second.

    .venv/bin/python bench/bench_web.py                 # 100,000 volumes
    .venv/bin/python bench/bench_web.py --volumes 10000 --workdir /var/lib
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_fixtures import start_daemon
from tests.web_fixtures import CHROMIUM, CHROMIUM_ARGS


def _api(base: str, token: str, path: str) -> tuple[float, object]:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req) as resp:
        data = json.load(resp)
    return time.perf_counter() - t0, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=100_000)
    ap.add_argument("--workdir", default="/var/lib")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="vs-bench-web-", dir=args.workdir))
    target = work / "pool"
    target.mkdir()
    t0 = time.perf_counter()
    for i in range(args.volumes):
        os.close(os.open(target / f"vm-{i:06d}.img", os.O_CREAT | os.O_WRONLY, 0o600))
    print(f"made {args.volumes} files in {time.perf_counter() - t0:.1f} s")
    d = start_daemon(work / "state", "--web", "127.0.0.1:0", tcp=False)
    try:
        import virtstore

        conn = virtstore.connect(d.rw_uri)
        conn.pool_define_xml(f"<pool type='dir'><name>big</name><target><path>{target}"
                             "</path></target></pool>")
        t0 = time.perf_counter()
        conn.pool_start("big")
        print(f"pool start (first scan) {time.perf_counter() - t0:.1f} s")
        conn.close()
        m = re.search(r"web page: (http://[^/ ]+)/", d.log())
        assert m
        base = m.group(1)
        token = (d.sock_dir / "web-token-ro").read_text().strip()
        print("\nAPI, one page of 50 (median of 20 requests):")
        for what, q in (("name order", "limit=50"), ("a middle page", "limit=50&offset=50000"),
                        ("by capacity, descending", "limit=50&sort=-capacity"),
                        ("filtered by name", "limit=50&filter=12")):
            times = [_api(base, token, f"/v1/pools/big/volumes?{q}")[0] for _ in range(20)]
            print(f"  {what:26} {statistics.median(times) * 1000:7.1f} ms")
        times = [_api(base, token, "/v1/pools/big/volumes")[0] for _ in range(3)]
        print(f"  {'the whole list (no limit)':26} {statistics.median(times) * 1000:7.1f} ms")

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=CHROMIUM_ARGS)
            firsts, nexts = [], []
            for _ in range(5):
                ctx = browser.new_context()
                page = ctx.new_page()
                page.goto(base + "/")
                page.get_by_label("Token").fill(token)
                page.get_by_label("Token").press("Enter")
                page.wait_for_selector("#app:not([hidden])")
                page.get_by_role("button", name="Volumes", exact=True).click()
                t0 = time.perf_counter()
                page.get_by_label("Pool", exact=True).select_option("big")
                page.wait_for_function(f"() => document.querySelector('#vol-range')"
                                       f".textContent.endsWith('of {args.volumes}')")
                firsts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                page.get_by_role("button", name="Next page").click()
                page.wait_for_function("() => document.querySelector('#vol-range')"
                                       ".textContent.startsWith('51')")
                nexts.append(time.perf_counter() - t0)
                ctx.close()
            browser.close()
        first = statistics.median(firsts)
        print(f"\nbrowser: first page of {args.volumes} volumes shown in "
              f"{first * 1000:.0f} ms (median of 5; goal < 1000 ms: "
              f"{'met' if first < 1 else 'MISSED'}); next page "
              f"{statistics.median(nexts) * 1000:.0f} ms")
    finally:
        d.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
