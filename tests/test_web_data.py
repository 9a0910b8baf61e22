"""The web page moves data: a clone whose progress shows while it runs and which is
cancelled from the page, an upload from a file picked in the browser, a download."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.web_fixtures import Web, browser_fixture, open_page, web_daemon_fixture

import virtstore
from virtstore.api import Connection

__all__ = ["browser_fixture", "web_daemon_fixture"]
MiB = 1024 * 1024


@pytest.fixture(name="pool")
def pool_fixture(web_daemon: Web) -> Iterator[tuple[Connection, Path]]:
    """A running dir pool 'p' under the test's directory, from the read-write socket."""
    conn = virtstore.connect(web_daemon.daemon.rw_uri)
    target = web_daemon.tmp / "p"
    conn.pool_define_xml(f"<pool type='dir'><name>p</name><target><path>{target}</path>"
                         "</target></pool>")
    conn.pool_start("p", build=True)
    yield conn, target
    conn.close()


def _open_volume(page: Any, name: str) -> None:
    page.get_by_role("button", name="Volumes", exact=True).click()
    page.get_by_label("Pool", exact=True).select_option("p")
    page.get_by_role("button", name=f"Open volume {name}").click()
    page.locator("#vol-detail:not([hidden])").wait_for()


def test_clone_progress_shows_and_cancel_leaves_nothing(web_daemon: Web, browser: Any,
                                                         pool: tuple[Connection, Path]) -> None:
    conn, target = pool
    (target / "src.raw").write_bytes(os.urandom(24 * MiB))  # data, not holes: all copied
    conn.pool_refresh("p")
    page = open_page(browser, web_daemon, web_daemon.rw_token)
    _open_volume(page, "src.raw")
    form = page.locator("#clone-form")
    form.get_by_label("New name").fill("copy.raw")
    form.get_by_label("Bandwidth limit (bytes/s, optional)").fill("4M")
    form.get_by_role("button", name="Clone").click()

    row = page.locator("#jobs-table tr[data-job]").filter(has_text="copy.raw")
    bar = row.locator("progress")
    # Mid-way: the bar has moved, the job runs, a rate and an ETA are shown.
    page.wait_for_function(
        """() => [...document.querySelectorAll('#jobs-table tr[data-state=running] progress')]
                 .some(p => p.value >= 5 && p.value < 90)""", timeout=20_000)
    assert 5 <= float(bar.get_attribute("value") or 0) < 90
    cells = row.locator("td")
    assert re.search(r"\d MiB/s", cells.nth(3).inner_text())
    assert re.search(r"\d+s", cells.nth(4).inner_text())

    row.get_by_role("button", name=re.compile("^Cancel clone")).click()
    page.locator("#jobs-table tr[data-state=cancelled]").filter(
        has_text="copy.raw").wait_for(timeout=20_000)
    assert not (target / "copy.raw").exists()
    assert sorted(os.listdir(target)) == ["src.raw"]  # no staging file left either
    assert [v.name for v in conn.list_volumes("p")] == ["src.raw"]


def test_upload_from_the_browser_and_download(web_daemon: Web, browser: Any,
                                              pool: tuple[Connection, Path]) -> None:
    _, target = pool
    data = os.urandom(3 * MiB + 12345)
    src = web_daemon.tmp / "image.bin"
    src.write_bytes(data)
    page = open_page(browser, web_daemon, web_daemon.rw_token)
    page.get_by_role("button", name="Volumes", exact=True).click()
    page.get_by_label("Pool", exact=True).select_option("p")
    page.get_by_text("Upload a file as a volume", exact=True).click()
    form = page.locator("#upload-form")
    form.get_by_label("File", exact=True).set_input_files(str(src))
    form.get_by_label("Volume name (default: the file's)").fill("up.raw")
    form.get_by_role("button", name="Upload").click()
    page.locator("#status.ok").filter(has_text="Uploaded").wait_for(timeout=30_000)
    assert (target / "up.raw").read_bytes() == data

    page.get_by_role("button", name="Open volume up.raw").click()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download volume up.raw").click()
    download = dl.value
    assert download.suggested_filename == "up.raw"
    assert Path(download.path()).read_bytes() == data
