"""The web page: log in, define a pool and create a volume from forms, and what the page
promises about itself (its security headers, labelled controls, keyboard use)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from tests.web_fixtures import Web, browser_fixture, open_page, web_daemon_fixture

__all__ = ["browser_fixture", "web_daemon_fixture"]


def test_define_pool_and_create_volume_from_the_page(web_daemon: Web, browser: Any) -> None:
    page = open_page(browser, web_daemon, web_daemon.rw_token)
    assert "read-write" in page.locator("#who").inner_text()
    target = web_daemon.tmp / "images1"
    page.get_by_text("Define a pool", exact=True).click()
    form = page.locator("#pool-form")
    form.get_by_label("Name", exact=True).fill("images1")
    form.get_by_label("Type", exact=True).select_option("dir")
    form.get_by_label("Target directory").fill(str(target))
    form.get_by_role("button", name="Define", exact=True).click()
    row = page.locator("#pools-table tr[data-pool=images1]")
    row.wait_for()
    assert "running" in row.inner_text()
    assert target.is_dir()

    row.get_by_role("button", name="Volumes of pool images1").click()
    page.get_by_text("Create a volume", exact=True).click()
    form = page.locator("#vol-form")
    form.get_by_label("Name", exact=True).fill("disk1.qcow2")
    form.get_by_label("Capacity (e.g. 10G, 512M)").fill("64M")
    form.get_by_label("Format").select_option("qcow2")
    form.get_by_role("button", name="Create", exact=True).click()
    page.locator("#vol-table tr[data-volume='disk1.qcow2']").wait_for()
    assert "Volume disk1.qcow2 created" in page.locator("#status").inner_text()
    made = target / "disk1.qcow2"
    assert made.read_bytes()[:4] == b"QFI\xfb"
    assert "64.0 MiB" in page.locator("#vol-table tr[data-volume='disk1.qcow2']").inner_text()


def test_page_headers_labels_and_keyboard(web_daemon: Web, browser: Any, tmp_path: Path) -> None:
    with urllib.request.urlopen(web_daemon.url) as resp:
        csp = resp.headers["Content-Security-Policy"]
        html = resp.read().decode()
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert "<script>" not in html and "style=" not in html  # nothing inline to allow
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere

    # Keyboard only: the token field has the focus; typing and Enter log in.
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(web_daemon.url)
    page.keyboard.type(web_daemon.ro_token)
    page.keyboard.press("Enter")
    page.wait_for_selector("#app:not([hidden])")
    # Every form control has a label, every button a name (the accessibility tree's).
    for tab in ("Pools", "Volumes", "Jobs", "Host", "Secrets"):
        page.get_by_role("button", name=tab, exact=True).click()
    unlabelled = page.evaluate("""() => {
      const bad = [];
      for (const e of document.querySelectorAll('input, select, textarea')) {
        if (!e.labels.length && !e.getAttribute('aria-label')) bad.push(e.outerHTML);
      }
      for (const b of document.querySelectorAll('button')) {
        if (!(b.getAttribute('aria-label') || b.textContent).trim()) bad.push(b.outerHTML);
      }
      return bad;
    }""")
    assert unlabelled == []
    # Tab order reaches the section buttons and they switch with Enter.
    page.get_by_role("button", name="Jobs", exact=True).focus()
    page.keyboard.press("Enter")
    assert page.locator("#tab-jobs").is_visible()
    ctx.close()
