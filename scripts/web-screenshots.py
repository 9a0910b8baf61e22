#!/usr/bin/env python3
"""Screenshots of every tab of the web page, for docs/screenshots/ and the README:
a virtstored with its web listener on a scratch state root, a pool with volumes and a
snapshot, a slow clone running, driven in Debian's headless Chromium.

    .venv/bin/python scripts/web-screenshots.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE / "tests")]

from playwright.sync_api import sync_playwright  # noqa: E402
from tests.web_fixtures import CHROMIUM, CHROMIUM_ARGS, start_web  # noqa: E402

import virtstore  # noqa: E402

OUT = HERE / "docs" / "screenshots"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        web = start_web(Path(tmp))
        try:
            conn = virtstore.connect(web.daemon.rw_uri)
            images = Path(tmp) / "images"
            conn.pool_define_xml(f"<pool type='dir'><name>images</name><target><path>{images}"
                                 "</path></target></pool>")
            conn.pool_start("images", build=True)
            conn.pool_set_autostart("images", True)
            pool = conn.pool("images")
            pool.create_volume("debian12.qcow2", "20G", format="qcow2")
            pool.create_volume("data.raw", "64M", format="raw")
            pool.create_volume("scratch.img", "2G", format="raw")
            with open(images / "data.raw", "r+b") as fh:
                fh.write(b"x" * (48 << 20))
            conn.volume_snapshot_create("images", "debian12.qcow2", "before-upgrade")
            conn.volume_clone("images", "data.raw", "data-copy.raw", bandwidth=1 << 20)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(web.url)
                page.get_by_label("Token").fill(web.rw_token)
                page.get_by_label("Token").press("Enter")
                page.wait_for_selector("#app:not([hidden])")
                for tab in ("pools", "volumes", "jobs", "host", "secrets"):
                    page.click(f"nav button[data-tab='{tab}']")
                    if tab == "volumes":
                        page.locator("#tab-volumes").get_by_label("Pool").select_option(
                            "images")
                    time.sleep(1.0)  # the tab's data and the event stream arrive
                    page.screenshot(path=str(OUT / f"{tab}.png"))
                    print(OUT / f"{tab}.png")
                browser.close()
            conn.close()
        finally:
            web.daemon.stop()


if __name__ == "__main__":
    main()
