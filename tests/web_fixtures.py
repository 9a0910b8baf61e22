"""The web page in a real browser: a virtstored with its loopback web listener, and
Debian's headless Chromium driven by Playwright (never a browser Playwright downloads).

Test modules import the fixtures they use (``web_daemon_fixture``, ``browser_fixture``);
their fixture names drop the suffix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.server_fixtures import Daemon, start_daemon

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


@dataclass
class Web:
    daemon: Daemon
    url: str
    rw_token: str
    ro_token: str
    tmp: Path


def start_web(tmp: Path, *args: str) -> Web:
    # Pools the page defines go under the test's directory: the web listener is TCP, so
    # the remote callers' rule applies to it.
    d = start_daemon(tmp / "state", "--web", "127.0.0.1:0", "--remote-pool-root", str(tmp),
                     *args, tcp=False)
    m = re.search(r"web page: (http://127\.0\.0\.1:\d+/)", d.log())
    assert m, d.log()
    run = d.sock_dir
    return Web(d, m.group(1), (run / "web-token").read_text().strip(),
               (run / "web-token-ro").read_text().strip(), tmp)


@pytest.fixture(name="web_daemon")
def web_daemon_fixture(tmp_path: Path) -> Iterator[Web]:
    w = start_web(tmp_path)
    yield w
    w.daemon.stop()


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/setup installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright gives the browser a fresh profile directory of its own, and each test a
    # fresh context (no storage shared between tests).
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser: Any, web: Web, token: str) -> Any:
    """A fresh browser context (its own storage) logged in through the login form."""
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(web.url)
    page.get_by_label("Token").fill(token)
    page.get_by_label("Token").press("Enter")
    page.wait_for_selector("#app:not([hidden])")
    return page
