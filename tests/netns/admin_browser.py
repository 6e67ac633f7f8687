"""Drive the admin pages with a real Chromium (run inside the segment namespace by the test).

usage: admin_browser.py URL ADMIN PASSWORD SCREENSHOT PROFILE_DIR
Logs in, toggles the sales/smtp cell to deny, saves, opens the audit log, takes a
screenshot, then opens the usage page (7 days) and reads its table and plots; prints
one JSON line with what it saw.  The password comes on stdin's
first line when PASSWORD is "-" (so it never shows in a process list).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from chromium import chromium
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait


def _replaced(old: WebElement) -> Callable[[WebDriver], bool]:
    """True once `old` is no longer in the page: stale, or (chromedriver says this too,
    now and then, for a node of a document that has just been replaced) "does not
    belong to the document"."""

    def gone(_driver: WebDriver) -> bool:
        try:
            old.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in (exc.msg or ""):
                return True
            raise
        return False

    return gone


def click_and_wait(driver: WebDriver, button: WebElement, then_id: str) -> WebElement:
    """Click, wait until the page it opens replaced this one, return the element `then_id`.

    click() returns once the event is dispatched, not when the next page is shown."""
    old = driver.find_element(By.TAG_NAME, "html")
    button.click()
    WebDriverWait(driver, 20).until(_replaced(old))
    return WebDriverWait(driver, 20).until(ec.presence_of_element_located((By.ID, then_id)))


def main() -> int:
    url, admin, password, shot, profile = sys.argv[1:6]
    if password == "-":
        password = sys.stdin.readline().rstrip("\n")
    driver = chromium(profile, "1280,900")
    seen: dict[str, object] = {}
    try:
        driver.set_page_load_timeout(30)
        driver.get(url + "/access")
        seen["redirected_to_login"] = driver.current_url.endswith("/login")
        driver.find_element(By.ID, "name").send_keys(admin)
        driver.find_element(By.ID, "password").send_keys(password)
        cell = Select(
            click_and_wait(driver, driver.find_element(By.ID, "login"), "cell-sales-smtp")
        )
        seen["after_login"] = driver.current_url
        seen["cell_before"] = cell.first_selected_option.get_attribute("value")
        cell.select_by_value("deny")
        click_and_wait(driver, driver.find_element(By.ID, "save"), "cell-sales-smtp")
        seen["saved_banner"] = bool(driver.find_elements(By.ID, "saved"))
        seen["cell_after"] = Select(
            driver.find_element(By.ID, "cell-sales-smtp")
        ).first_selected_option.get_attribute("value")
        audit = click_and_wait(driver, driver.find_element(By.LINK_TEXT, "Audit log"), "audit")
        seen["audit"] = audit.text
        driver.save_screenshot(shot)
        # the grid itself, as the README shows it
        click_and_wait(
            driver, driver.find_element(By.LINK_TEXT, "Access rights"), "cell-sales-smtp"
        )
        driver.save_screenshot(shot.replace(".png", "-grid.png"))
        click_and_wait(driver, driver.find_element(By.LINK_TEXT, "Usage"), "period-7")
        click_and_wait(driver, driver.find_element(By.ID, "period-7"), "usage")
        seen["usage"] = [
            {
                "user": row.get_attribute("data-user"),
                "service": row.get_attribute("data-service"),
                "up": int(row.find_element(By.CLASS_NAME, "bytes-up").get_attribute("data-bytes")),
                "down": int(
                    row.find_element(By.CLASS_NAME, "bytes-down").get_attribute("data-bytes")
                ),
                "shown": row.find_element(By.CLASS_NAME, "bytes-down").text,
            }
            for row in driver.find_elements(By.CSS_SELECTOR, "tr.usage-row")
        ]
        seen["plots"] = {
            str(svg.get_attribute("data-user")): [
                float(r.get_attribute("height") or 0)
                for r in svg.find_elements(By.TAG_NAME, "rect")
            ]
            for svg in driver.find_elements(By.CSS_SELECTOR, "svg.plot")
        }
        driver.save_screenshot(shot.replace(".png", "-usage.png"))
    finally:
        driver.quit()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
