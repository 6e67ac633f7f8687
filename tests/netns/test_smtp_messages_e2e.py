"""SMTP messages per user, end to end: swaks through the relay to a real postfix.

Real processes: `appliance run proxy` in gw (accounting on, as by default), postfix on
the segment that relays for nobody (its own domain only: a mail to another domain is
refused at RCPT, so its DATA never comes).  alice, logged in, sends two mails that
arrive, one refused at RCPT and one refused at its end of data (a header check); at
the proxy's stop her usage row for smtp in the store says 4 connections and 2
messages, and so does the admin's CSV export.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.admin import usage_page
from appliance.core.config import load
from appliance.lab import servers
from appliance.lab import site as lab_site
from appliance.lab.topology import Topology, guest_mac
from appliance.net.firewall import revoker
from appliance.state import leases, schema, sessions, store, usage

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]
ALICE_IP = "192.168.1.100"


def test_smtp_messages_the_server_accepted_are_in_alices_usage(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    cfg_path = lab_site.write_config(tmp_path / "site")  # the example tables, state in tmp
    config = load(cfg_path)

    topo = make_topology(guests=1)
    gw, seg, guest = topo["gw"], topo["seg"], topo["guest1"]
    servers.guest_address(guest, ALICE_IP)
    servers.install_redirects(gw, {25: 2525})

    conn = store.connect(config.state.database)
    schema.upgrade(conn)
    now = time.time()
    leases.record(conn, "granted", leases.Lease(ALICE_IP, guest_mac(1), now + 3600), now)
    st = sessions.SessionStore.from_config(config, revoke=revoker(config))
    alice = st.create(
        user="alice", source="site", attributes={"role": "staff"}, ip=ALICE_IP, mac=guest_mac(1)
    )

    # mynetworks without the appliance: postfix takes mail for example.net only
    smtp = servers.start_smtp(seg, mynetworks="127.0.0.0/8")
    try:
        # and a mail with this subject is refused at its end of data (5xx to the ".")
        etc = smtp.directory / "etc"
        (etc / "header_checks").write_text("/^Subject: refused at the end/ REJECT no thanks\n")
        seg.run("postconf", "-c", str(etc), "-e", f"header_checks = regexp:{etc}/header_checks")
        seg.run("postfix", "-c", str(etc), "reload")
        appliance = [sys.executable, "-m", "appliance"]
        proxy = gw.start(*appliance, "run", "--config", str(cfg_path), "proxy", name="proxy")
        gw.wait_port(2525, "192.168.1.1")

        def swaks(to: str, subject: str) -> str:
            out = guest.run(
                *("swaks", "--server", "10.9.8.7:25", "--from", "alice@home.example"),
                *("--to", to, "--header", f"Subject: {subject}"),
                check=False,
            )
            return out.stdout + out.stderr

        for n in (1, 2):
            said = swaks("bob@example.net", f"mail {n}")
            assert "250 2.0.0 Ok: queued" in said, said
        said = swaks("x@elsewhere.test", "never sent")
        assert "554 5.7.1" in said and "Relay access denied" in said, said
        assert "354" not in said  # (the refused recipient: no DATA at all)
        said = swaks("bob@example.net", "refused at the end")
        assert "354" in said and "550 5.7.1 no thanks" in said, said
        mails = servers.wait_mail(smtp.extra["maildir"], 2)
        assert sorted(b"Subject: mail 1" in m for m in mails) == [False, True]

        proxy.stop()  # the stop flushes the worker's accounting
        (row,) = usage.by_user_service(conn, *usage.days_back(1))
        assert (row.user, row.service, row.connections, row.messages) == ("alice", "smtp", 4, 2)
        (of_session,) = usage.of_session(conn, alice.id)
        assert of_session.messages == 2
        exported = usage_page.csv_text(usage.csv_rows(conn, *usage.days_back(1)))
        (line,) = list(csv.DictReader(io.StringIO(exported)))
        assert (line["user"], line["service"], line["messages"]) == ("alice", "smtp", "2")
    finally:
        smtp.stop()
