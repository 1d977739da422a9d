"""Headless Chromium (Debian's) driven by Playwright, for the tests of web pages."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import Any

from laion_assets_tests.platform import apt_install

# What a root process in a closed network needs: no sandbox (root), no GPU, and none of the background connections
# Chromium makes at start (refused here, and slow to fail).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        apt_install("chromium")
        path = shutil.which("chromium")
    assert path, "Debian's chromium did not install"
    return path


@contextlib.contextmanager
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.set_default_timeout(30_000)
            yield tab
        finally:
            browser.close()
