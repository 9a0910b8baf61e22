"""The volume table pages, sorts and filters on the server: a pool of 100,000 volumes
shows one page and the right count (bench/bench_web.py times it)."""

from __future__ import annotations

from typing import Any

import pytest
from tests.server_fixtures import Setup, setup_fixture
from tests.web_fixtures import Web, browser_fixture, open_page, web_daemon_fixture

import virtstore
from virtstore.errors import InvalidArgument

__all__ = ["browser_fixture", "setup_fixture", "web_daemon_fixture"]
COUNT = 100_000


def test_paging_sorting_filtering(web_daemon: Web, browser: Any) -> None:
    target = web_daemon.tmp / "many"
    target.mkdir()
    for i in range(COUNT):
        (target / f"vol-{i:05d}.img").write_bytes(b"x" * (i % 7))
    conn = virtstore.connect(web_daemon.daemon.rw_uri)
    conn.pool_define_xml(f"<pool type='dir'><name>many</name><target><path>{target}</path>"
                         "</target></pool>")
    conn.pool_start("many")
    conn.close()

    page = open_page(browser, web_daemon, web_daemon.ro_token)
    page.get_by_role("button", name="Volumes", exact=True).click()
    page.get_by_label("Pool", exact=True).select_option("many")
    rng = page.locator("#vol-range")
    rows = page.locator("#vol-table tbody tr")
    page.wait_for_function(f"() => document.querySelector('#vol-range').textContent"
                           f".endsWith('of {COUNT}')")
    assert rng.inner_text() == f"1–50 of {COUNT}"
    assert rows.count() == 50
    assert rows.first.get_attribute("data-volume") == "vol-00000.img"
    assert page.get_by_role("button", name="Previous page").is_disabled()

    page.get_by_role("button", name="Next page").click()
    page.wait_for_function("() => document.querySelector('#vol-range').textContent"
                           ".startsWith('51')")
    assert rng.inner_text() == f"51–100 of {COUNT}"
    assert rows.first.get_attribute("data-volume") == "vol-00050.img"

    page.get_by_label("Per page").select_option("500")
    page.wait_for_function("() => document.querySelector('#vol-range').textContent"
                           ".startsWith('1–500')")
    assert rows.count() == 500

    # The table is in name order; a click on the header turns it: the last volume first.
    assert page.locator("th[data-sort=name]").get_attribute("aria-sort") == "ascending"
    page.get_by_role("button", name="Sort by name").click()
    page.wait_for_function("() => document.querySelector('#vol-table tbody tr')"
                           f".dataset.volume === 'vol-{COUNT - 1:05d}.img'")
    assert page.locator("th[data-sort=name]").get_attribute("aria-sort") == "descending"

    page.get_by_label("Filter by name").fill("vol-012")
    page.wait_for_function("() => document.querySelector('#vol-range').textContent "
                           "=== '1–100 of 100'")
    assert rows.first.get_attribute("data-volume") == "vol-01299.img"
    assert "100 matching" in page.locator("#vol-count").inner_text()

    # By capacity, largest first: the files of 6 bytes, in name order among themselves.
    page.get_by_role("button", name="Sort by capacity").click()
    page.get_by_role("button", name="Sort by capacity").click()
    page.wait_for_function("() => document.querySelector('th[data-sort=capacity]')"
                           ".getAttribute('aria-sort') === 'descending'")
    page.wait_for_function("() => document.querySelector('#vol-table tbody tr')"
                           ".dataset.volume === 'vol-01203.img'")


def test_volume_page_from_the_python_api(setup: Setup) -> None:
    """list_volumes_page answers the same embedded and remote; list_volumes is unchanged."""
    conn, _, tmp = setup
    target = tmp / "pp"
    conn.pool_define_xml(f"<pool type='dir'><name>pp</name><target><path>{target}</path>"
                         "</target></pool>")
    conn.pool_start("pp", build=True)
    for i, name in enumerate(["b_1.raw", "a.raw", "B2.raw", "c.raw", "b%x.raw"]):
        conn.volume_create("pp", virtstore.VolumeCreateArgs(name=name, capacity=(i + 1) * 1024,
                                                            format="raw"))
    page = conn.list_volumes_page("pp", limit=2)
    assert page.total == 5 and page.offset == 0
    assert [v.name for v in page.volumes] == ["B2.raw", "a.raw"]
    page = conn.list_volumes_page("pp", offset=2, limit=2, sort="-capacity")
    assert [v.name for v in page.volumes] == ["B2.raw", "a.raw"]
    # The filter is a substring, case-insensitive; % and _ are no wildcards.
    assert [v.name for v in conn.list_volumes_page("pp", filter="b").volumes] == [
        "B2.raw", "b%x.raw", "b_1.raw"]
    assert [v.name for v in conn.list_volumes_page("pp", filter="b_").volumes] == ["b_1.raw"]
    assert [v.name for v in conn.list_volumes_page("pp", filter="%").volumes] == ["b%x.raw"]
    assert len(conn.list_volumes("pp")) == 5
    with pytest.raises(InvalidArgument):
        conn.list_volumes_page("pp", sort="path")
    with pytest.raises(InvalidArgument):
        conn.list_volumes_page("pp", limit=0)
