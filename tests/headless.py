"""Debian's Chromium driven by Playwright for the browser tests; skips with a reason where either is missing."""
import contextlib
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling hosts this offline machine cannot reach.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium():
    """A launched headless browser, closed on exit."""
    executable = CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")
    if not executable:
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`) for browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
