"""Debian's Chromium under selenium, as every browser test starts it.

Imported by the test modules and by the browser scripts the tests run inside a
namespace (`python tests/netns/admin_browser.py ...`: this folder is then
sys.path[0]).
"""

from __future__ import annotations

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def chromium(profile: str, window: str, *extra: str) -> webdriver.Chrome:
    """A headless Chromium with its own profile directory; `extra` adds switches."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={window}",
        *extra,
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
