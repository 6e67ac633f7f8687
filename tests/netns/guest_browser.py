"""A visitor's browser on the real chain (run inside a guest namespace by the test).

usage: guest_browser.py URL USER PASSWORD SHOT_DIR PROFILE_DIR
Started with `ip netns exec`, so Chromium resolves names with the guest's own
resolv.conf (the appliance's DNS, from DHCP).  Opens URL, expects the portal,
logs in with a site account, and prints one JSON line with what it saw; saves
screenshots of the login page and of where it landed.  PASSWORD "-" reads the
password from stdin's first line.
"""

from __future__ import annotations

import json
import sys

from chromium import chromium
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> int:
    url, user, password, shots, profile = sys.argv[1:6]
    portal = "http://192.168.1.1/"
    if password == "-":
        password = sys.stdin.readline().rstrip("\n")
    driver = chromium(profile, "800,700", "--lang=en-US")
    seen: dict[str, object] = {}
    try:
        driver.set_page_load_timeout(30)
        driver.get(url)
        seen["first_url"] = driver.current_url
        seen["first_body"] = driver.find_element(By.TAG_NAME, "body").text
        if not driver.find_elements(By.ID, "user"):
            print(json.dumps(seen))
            return 1
        driver.find_element(By.ID, "user").send_keys(user)
        driver.find_element(By.ID, "password").send_keys(password)
        driver.save_screenshot(f"{shots}/e2e-browser-login.png")
        driver.find_element(By.ID, "login").click()
        # click() need not wait for the navigation it starts: wait until we left the portal
        WebDriverWait(driver, 30).until(lambda d: not d.current_url.startswith(portal))
        seen["landed_url"] = driver.current_url
        seen["landed_title"] = driver.title
        seen["landed_h1"] = " ".join(e.text for e in driver.find_elements(By.TAG_NAME, "h1"))
        seen["landed_body"] = driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(f"{shots}/e2e-browser-origin.png")
    finally:
        driver.quit()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
