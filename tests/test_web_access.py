"""Who may do what from the web page: the read-only token sees every list and can change
nothing (its change buttons are disabled, and the server refuses a forced request); a
download ticket is good once; without a token only the page's assets are served."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from tests.web_fixtures import Web, browser_fixture, open_page, web_daemon_fixture

import virtstore
from virtstore.errors import InvalidArgument
from virtstore.server.config import load

__all__ = ["browser_fixture", "web_daemon_fixture"]


def _fill(web: Web) -> None:
    conn = virtstore.connect(web.daemon.rw_uri)
    target = web.tmp / "p"
    conn.pool_define_xml(f"<pool type='dir'><name>p</name><target><path>{target}</path>"
                         "</target></pool>")
    conn.pool_start("p", build=True)
    conn.volume_create("p", virtstore.VolumeCreateArgs(name="a.qcow2", capacity=2**20,
                                                       format="qcow2"))
    conn.close()


def _fetch(page: Any, method: str, path: str, token: str, body: object = None) -> Any:
    return page.evaluate("""async ([method, path, token, body]) => {
        const r = await fetch(path, {method, headers: {Authorization: `Bearer ${token}`,
            'Content-Type': 'application/json'}, body: body === null ? undefined
            : JSON.stringify(body)});
        return [r.status, await r.text()];
    }""", [method, path, token, body])


def test_read_only_token_sees_everything_and_changes_nothing(web_daemon: Web,
                                                             browser: Any) -> None:
    _fill(web_daemon)
    page = open_page(browser, web_daemon, web_daemon.ro_token)
    assert "read-only" in page.locator("#who").inner_text()
    page.locator("#pools-table tr[data-pool=p]").wait_for()
    page.get_by_role("button", name="Volumes of pool p").click()
    page.locator("#vol-table tr[data-volume='a.qcow2']").wait_for()
    page.get_by_role("button", name="Open volume a.qcow2").click()
    page.locator("#vd-xml").filter(has_text="<volume").wait_for()
    for tab in ("Jobs", "Host", "Secrets", "Pools"):
        page.get_by_role("button", name=tab, exact=True).click()

    enabled = page.evaluate("""() => [...document.querySelectorAll('[data-write]')]
        .filter(b => !b.disabled).map(b => b.getAttribute('aria-label') || b.textContent)""")
    assert enabled == []
    assert page.locator("[data-write]").count() > 10  # the buttons are there, disabled

    # The server refuses what the page would not offer.
    status, text = _fetch(page, "POST", "/v1/pools/p/volumes", web_daemon.ro_token,
                          {"name": "b.raw", "capacity": 1024})
    assert status == 403 and json.loads(text)["error"]["code"] == "forbidden"
    status, _ = _fetch(page, "POST", "/v1/pools/p/stop", web_daemon.ro_token)
    assert status == 403
    status, _ = _fetch(page, "POST", "/v1/tickets", web_daemon.ro_token,
                       {"path": "/v1/pools/p/volumes/a.qcow2/download"})
    assert status == 403
    assert not (web_daemon.tmp / "p" / "b.raw").exists()


def test_without_a_token_only_the_page_is_served_and_tickets_are_single_use(
        web_daemon: Web) -> None:
    _fill(web_daemon)
    base = web_daemon.url.rstrip("/")
    for asset in ("/", "/ui/app.js", "/ui/app.css"):
        with urllib.request.urlopen(base + asset) as resp:
            assert resp.status == 200
    for path in ("/v1/pools", "/ui/../v1/pools", "/ui/nothing.js"):
        try:
            urllib.request.urlopen(base + path)
        except urllib.error.HTTPError as err:
            assert err.code in (401, 404)
        else:
            raise AssertionError(f"{path} answered without a token")

    path = "/v1/pools/p/volumes/a.qcow2/download"
    req = urllib.request.Request(base + "/v1/tickets", method="POST",
                                 data=json.dumps({"path": path}).encode(),
                                 headers={"Authorization": f"Bearer {web_daemon.rw_token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        url = json.load(resp)["url"]
    with urllib.request.urlopen(base + url) as resp:
        assert resp.read()[:4] == b"QFI\xfb"
        assert "a.qcow2" in resp.headers["Content-Disposition"]
    try:
        urllib.request.urlopen(base + url)
    except urllib.error.HTTPError as err:
        assert err.code == 401
    else:
        raise AssertionError("a ticket worked twice")
    # A ticket names its path: it opens no other volume.
    other = url.replace("a.qcow2", "b.qcow2")
    try:
        urllib.request.urlopen(base + other)
    except urllib.error.HTTPError as err:
        assert err.code == 401


def test_token_in_the_link_logs_in_and_leaves_the_address(web_daemon: Web,
                                                          browser: Any) -> None:
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(f"{web_daemon.url}#token={web_daemon.rw_token}")
    page.wait_for_selector("#app:not([hidden])")
    assert "read-write" in page.locator("#who").inner_text()
    assert "token" not in page.url
    ctx.close()


def test_web_listener_only_on_loopback() -> None:
    for where in ("0.0.0.0:8080", "192.0.2.1:8080", "example.org:8080"):
        with pytest.raises(InvalidArgument, match="loopback"):
            load(["--web", where])
    assert load(["--web", "[::1]:0"]).web == "[::1]:0"
