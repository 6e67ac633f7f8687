"""A logged-in guest's browser on HTTPS (run inside a guest namespace by the test).

usage: tls_browser.py URL SPKI PROFILE_DIR quic|noquic
The guest trusts exactly one key, the origin's (`--ignore-certificate-errors-spki-list`
takes the base64 SHA-256 of its SubjectPublicKeyInfo): a page that loads was served
under the origin's own certificate, so nothing in between decrypted it.  The page is
loaded twice: the first answer's Alt-Svc (h3) makes Chromium try QUIC on the second,
which the appliance refuses with ICMP port unreachable.  Prints one JSON line: the
second load's duration and protocol, and the page's heading.
"""

from __future__ import annotations

import json
import sys
import time

from chromium import chromium
from selenium.webdriver.common.by import By


def main() -> int:
    url, spki, profile, mode = sys.argv[1:5]
    quic = ["--enable-quic"] if mode == "quic" else ["--disable-quic"]
    driver = chromium(profile, "800,600", f"--ignore-certificate-errors-spki-list={spki}", *quic)
    seen: dict[str, object] = {}
    try:
        driver.set_page_load_timeout(30)
        driver.get(url)
        seen["first_h1"] = driver.find_element(By.TAG_NAME, "h1").text
        time.sleep(0.5)  # the Alt-Svc entry is stored after the response
        t0 = time.monotonic()
        driver.get(url + "?again")
        seen["seconds"] = round(time.monotonic() - t0, 3)
        seen["h1"] = driver.find_element(By.TAG_NAME, "h1").text
        seen["protocol"] = driver.execute_script(
            "return performance.getEntriesByType('navigation')[0].nextHopProtocol"
        )
    finally:
        driver.quit()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
