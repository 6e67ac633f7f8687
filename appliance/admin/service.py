"""`appliance run admin`: the admin pages on the management address, served by waitress.

It binds `config.interfaces.management_address:config.admin.port` and nothing else:
the management address is refused on the guest side by config validation, so the
pages are never reachable from a guest.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from waitress.server import create_server

from appliance.admin.app import create_app
from appliance.core import metrics
from appliance.core.config import Config

log = logging.getLogger("appliance.admin")


def main(config: Config) -> int:
    metrics.serve(config, "admin")  # up, with the process's own metrics
    if config.policies.shared:  # this box's tables in step with the store's, pages or not
        from appliance.admin.mirror import Mirror
        from appliance.core.pidfiles import signal_roles

        mirror = Mirror(config, signal_roles)
        threading.Thread(
            target=mirror.run, args=(threading.Event(),), name="tables-mirror", daemon=True
        ).start()
        log.info("policy tables shared through the store")
    if not config.admin.enabled:
        # stay up doing nothing: under `appliance run` a role that exits stops the others
        log.info("admin pages disabled in the configuration")
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda _s, _f: done.set())
        signal.signal(signal.SIGINT, lambda _s, _f: done.set())
        while not done.wait(3600):
            pass
        return 0
    app = create_app(config)
    host = str(config.interfaces.management_address)
    server = create_server(app, host=host, port=config.admin.port, threads=4, ident="appliance")
    log.info("admin pages on http://%s:%d/", host, config.admin.port)

    def stop(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.close, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # it reads the tables from disk per request
    # close() from the signal handler ends asyncore's loop with a closed-socket error
    with contextlib.suppress(OSError, ValueError):
        server.run()
    log.info("admin pages stopped")
    return 0
