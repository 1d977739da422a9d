"""The search page in headless Chromium (Debian's, driven by Playwright): a text query shows results, safe mode
hides the unsafe ones, "more like this" searches by a result's image, and a subset exports as parquet."""

from __future__ import annotations

import pyarrow.parquet as pq

from laion_assets_tests.browser import page
from laion_assets_tests.index.conftest import CRAWLS


def _punsafes(tab) -> list[float]:
    return [float(x) for x in tab.eval_on_selector_all(".result", "cards => cards.map(c => c.dataset.punsafe)")]


def test_search_filter_more_like_this_and_export(service, world, tmp_path):
    _, _, _, tables = world
    caption = tables[CRAWLS[0]]["caption"][4].as_py()
    with page() as tab:
        tab.goto(service)
        tab.wait_for_function("document.getElementById('indice').options.length === 3")
        tab.select_option("#indice", CRAWLS[0])
        assert tab.is_checked("#safe")  # safe mode is on by default
        tab.uncheck("#safe")
        tab.fill("#num", "30")
        tab.fill("#text", caption)
        tab.click("#search")
        tab.wait_for_function("document.getElementById('status').textContent.endsWith('results') || "
                              "document.getElementById('status').className === 'error'")
        assert tab.get_attribute("#status", "class") != "error", tab.inner_text("#status")
        tab.wait_for_function("document.getElementById('status').textContent.endsWith('results')")
        unsafe_shown = _punsafes(tab)
        assert len(unsafe_shown) == 30 and max(unsafe_shown) > 0.5
        unsafe_keys = set(tab.eval_on_selector_all(
            ".result", "cards => cards.filter(c => +c.dataset.punsafe > 0.5).map(c => c.dataset.key)"))
        colour = caption.split()[1]
        first = tab.inner_text(".result .caption")
        assert f"a {colour} " in first, first
        # Stored images render from our shards.
        assert tab.eval_on_selector(".result img", "img => img.complete && img.naturalWidth > 0 && img.src"
                                    ).split("/image/")[1].startswith(CRAWLS[0])
        # Safe mode back on: the page searches again and the unsafe ones are gone.
        tab.check("#safe")
        tab.wait_for_function("[...document.querySelectorAll('.result')].every(c => +c.dataset.punsafe <= 0.5)")
        safe = _punsafes(tab)
        assert safe and max(safe) <= 0.5
        assert not unsafe_keys & set(tab.eval_on_selector_all(".result", "cards => cards.map(c => c.dataset.key)"))
        # More like this: the first result's image as the query finds that very image first.
        key = tab.get_attribute(".result", "data-key")
        renders = int(tab.get_attribute("#results", "data-renders"))
        tab.click(".result .more")
        tab.wait_for_function(f"+document.getElementById('results').dataset.renders > {renders} && "
                              "document.getElementById('status').textContent.endsWith('results')")
        assert tab.get_attribute(".result", "data-key") == key
        shown = tab.eval_on_selector_all(".result", "cards => cards.map(c => +c.dataset.id)")
        # Export the current results, then the whole crawl under a filter.
        with tab.expect_download() as download:
            tab.click("#export-results")
        path = tmp_path / "results.parquet"
        download.value.save_as(path)
        exported = pq.read_table(path)
        assert exported.column_names[:2] == ["URL", "TEXT"] and exported.num_rows == len(shown)
        assert exported["key"].to_pylist() == [tables[CRAWLS[0]]["key"][i].as_py() for i in shown]
        tab.fill("#min-width", "500")
        with tab.expect_download() as download:
            tab.click("#export-filter")
        path = tmp_path / "filtered.parquet"
        download.value.save_as(path)
        subset = pq.read_table(path)
        table = tables[CRAWLS[0]]
        expected = [k for k, w, p in zip(table["key"].to_pylist(), table["WIDTH"].to_pylist(),
                                         table["punsafe"].to_pylist(), strict=True) if w >= 500 and p <= 0.5]
        assert sorted(subset["key"].to_pylist()) == sorted(expected) and expected
