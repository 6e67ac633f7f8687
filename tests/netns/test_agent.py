"""The personal agent end to end: agents in the home namespace, the client from the appliance.

The agent runs as the real `personal-agent run` process at 203.0.113.1 (a second one
at 203.0.113.2, an address added inside the test's home namespace); the client runs
in this process, moved into the gw namespace, exactly as the portal calls it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_helpers import appliance_config, make_agent_dir

from appliance.agent import cli, tlscert
from appliance.agent.client import AgentAnswer, AgentError, appliance_key_id, authenticate
from appliance.agent.settings import AgentSettings
from appliance.core.config import Config
from appliance.lab.topology import NetnsSwitch, Process, Topology

pytestmark = pytest.mark.netns
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _children_die_quietly() -> Iterator[None]:
    """pyroute2 forks helper children from this process; they inherit conftest's SIGTERM
    handler and, when the harness stops them, unwind a whole copy of pytest (seconds each).
    Here a SIGTERM in such a child just ends it; the test process itself behaves as before.
    (The same two lines belong in conftest's `_on_term`; reported to the lead.)"""
    main_pid = os.getpid()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(0)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    yield
    signal.signal(signal.SIGTERM, previous)


def agent_cli(settings: AgentSettings, *args: str, stdin: str | None = None) -> str:
    """`personal-agent ARGS --config ...` in this process (it only edits files)."""
    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out):
            # --config before a "--" (after which a key may start with "-")
            cut = args.index("--") if "--" in args else len(args)
            rc = cli.main([*args[:cut], "--config", str(settings.path), *args[cut:]])
    finally:
        sys.stdin = old_stdin
    assert rc == 0, (args, out.getvalue())
    return out.getvalue()


def start_agent(topo: Topology, settings: AgentSettings) -> tuple[str, Process]:
    fp = agent_cli(settings, "fingerprint").strip()
    proc = topo["home"].start(
        sys.executable,
        "-m",
        "appliance.agent.cli",
        "run",
        "--config",
        str(settings.path),
        name=f"agent-{settings.listen_address}",
    )
    topo["home"].wait_port(settings.port, host=settings.listen_address)
    return fp, proc


def login(topo: Topology, config: Config, spec: str, password: str) -> AgentAnswer:
    with NetnsSwitch(topo["gw"].netns):
        return authenticate(config, spec, password)


def refused(topo: Topology, config: Config, spec: str, password: str) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(AgentError) as err:
        login(topo, config, spec, password)
    return err.value.code, time.monotonic() - start


def test_alice_and_bob_log_in_through_their_agents(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=0)
    topo["home"].run("ip", "addr", "add", "203.0.113.2/24", "dev", "eth0")
    config = appliance_config(tmp_path / "appliance")
    a = make_agent_dir(
        tmp_path / "agent-a",
        "203.0.113.1",
        users={
            "mallory": ("pw-m", {}, {"pop3": "192.168.1.50:110"}),
            "selfish": ("pw-s", {}, {"pop3": "203.0.113.254:110"}),
        },
    )
    # alice is added the way a household does it, through the CLI
    agent_cli(
        a,
        "users",
        "add",
        "alice",
        "--attr",
        "department=Sales 1",
        "--attr",
        "title=engineer",
        "--password-stdin",
        stdin="alice-secret\n",
    )
    agent_cli(a, "servers", "set", "alice", "pop3", "203.0.113.3:110")
    b = make_agent_dir(
        tmp_path / "agent-b",
        "203.0.113.2",
        users={"bob": ("bob-secret", {"department": "Research"}, {"pop3": "203.0.113.3:1110"})},
        extra='[appliances]\naccept = "any"\n',
    )
    fp_a, proc_a = start_agent(topo, a)
    fp_b, proc_b = start_agent(topo, b)
    alice = f"alice@203.0.113.1#{fp_a}"

    # agent A does not know this appliance yet: refused, and the key shows up as pending
    code, _ = refused(topo, config, alice, "alice-secret")
    assert code == "appliance_not_allowed"
    key = appliance_key_id(config)
    assert f"{key}  pending" in agent_cli(a, "appliances", "list")
    agent_cli(a, "appliances", "allow", "--name", "test site", "--", key[:22])  # may start "-"
    assert f"{key}  allowed" in agent_cli(a, "appliances", "list")

    answer = login(topo, config, alice, "alice-secret")
    assert answer.user == "alice"
    assert dict(answer.attributes) == {"department": "Sales 1", "title": "engineer"}
    assert dict(answer.servers) == {"pop3": "203.0.113.3:110"}

    # bob's agent (accept = "any") answers for bob, with his own server
    bob = login(topo, config, f"bob@203.0.113.2#{fp_b}", "bob-secret")
    assert bob.attributes == {"department": "Research"}
    assert bob.servers == {"pop3": "203.0.113.3:1110"}

    # each refusal has its own code
    assert refused(topo, config, alice, "wrong")[0] == "bad_password"
    assert refused(topo, config, f"nobody@203.0.113.1#{fp_a}", "x")[0] == "unknown_user"
    assert refused(topo, config, f"alice@203.0.113.1#{fp_b}", "alice-secret")[0] == (
        "bad_certificate"
    )
    # without a pin, a self-signed certificate is not trusted
    assert refused(topo, config, "alice@203.0.113.1", "alice-secret")[0] == "bad_certificate"
    # (hidden networks and the rest: tests/unit/test_agent_client.py; the appliance's own
    # home-side address is only known here, in its namespace)
    for user, pw in (("mallory", "pw-m"), ("selfish", "pw-s")):
        assert refused(topo, config, f"{user}@203.0.113.1#{fp_a}", pw)[0] == "refused_servers"
    # an agent address on the hidden segment is never contacted
    assert refused(topo, config, "alice@198.51.100.3", "x")[0] == "bad_address"

    # the same from a separate process in the appliance's namespace, as an admin checks it
    out = (
        topo["gw"]
        .run(
            sys.executable,
            "-m",
            "appliance",
            "agent-login",
            "--config",
            str(config.path),
            alice,
            "--password-stdin",
            input="alice-secret\n",
        )
        .stdout
    )
    assert '"pop3": "203.0.113.3:110"' in out
    # and what the portal takes from it: agent A is not in the trusted-agents table
    assert json.loads(out)["session"] == {
        "user": "alice@203.0.113.1",
        "trusted": False,
        "attributes": {"source": "agent", "agent": "203.0.113.1"},
        "not_taken": ["department", "title"],
    }

    # SIGHUP re-reads the tables and keeps serving (systemd's reload)
    proc_a.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "tables re-read" not in proc_a.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "tables re-read" in proc_a.output()
    assert proc_a.alive() and login(topo, config, alice, "alice-secret").user == "alice"

    # the household denies the appliance: refused again
    agent_cli(a, "appliances", "deny", "--", key)
    assert refused(topo, config, alice, "alice-secret")[0] == "appliance_not_allowed"

    # agent B goes down: a quick, clear refusal
    proc_b.stop()
    code, took = refused(topo, config, f"bob@203.0.113.2#{fp_b}", "bob-secret")
    assert code == "unreachable" and took < 2.0


def test_slow_and_garbage_agents_fail_within_the_deadline(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=0)
    config = appliance_config(tmp_path / "appliance", timeout=2.0)
    settings = make_agent_dir(tmp_path / "fake", "203.0.113.1")
    tlscert.secure_dir(settings.state_directory)
    tlscert.ensure_certificate(settings.tls_certificate, settings.tls_key)
    fp = tlscert.certificate_fingerprint(settings.tls_certificate)
    cert, key = str(settings.tls_certificate), str(settings.tls_key)
    for mode, port in (("slow", 9001), ("garbage", 9002), ("html", 9003)):
        topo["home"].start(
            sys.executable,
            str(HERE / "fake_agent.py"),
            mode,
            "203.0.113.1",
            str(port),
            cert,
            key,
            name=f"fake-{mode}",
        )
    # nothing at all listens at .80:9004 (a closed port) and .1:9005 only accepts TCP
    topo["home"].start(
        sys.executable,
        "-c",
        "import socket,time\ns=socket.create_server(('203.0.113.1',9005))\ntime.sleep(60)",
        name="tcp-only",
    )
    for port in (9001, 9002, 9003, 9005):
        topo["home"].wait_port(port, host="203.0.113.1")

    code, took = refused(topo, config, f"alice@203.0.113.1:9001#{fp}", "x")
    assert code == "timeout" and 1.9 < took < 2.6, (code, took)
    code, took = refused(topo, config, f"alice@203.0.113.1:9005#{fp}", "x")
    assert code == "timeout" and took < 2.6, (code, took)
    assert refused(topo, config, f"alice@203.0.113.1:9002#{fp}", "x")[0] == "bad_answer"
    assert refused(topo, config, f"alice@203.0.113.1:9003#{fp}", "x")[0] == "bad_answer"
    code, took = refused(topo, config, f"alice@203.0.113.80:9004#{fp}", "x")
    assert code == "unreachable" and took < 1.0
    # a home agent whose machine is off: nobody answers ARP, the deadline still holds
    code, took = refused(topo, config, f"alice@203.0.113.77#{fp}", "x")
    assert code in ("timeout", "unreachable") and took < 2.6, (code, took)


def test_the_site_decides_whose_word_it_takes(
    make_topology: Callable[..., Topology], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14/2, with two real agents: carol runs her own, answering role = staff; the
    corp agent is in the site's trusted-agents table for `role` only.  What the portal
    gets (gates.agent_authenticate, in the appliance's namespace) and what the example
    access rights then allow."""
    from appliance.core.atomic_file import write_atomically
    from appliance.portal import gates

    monkeypatch.setattr(gates, "_policy", None)
    topo = make_topology(guests=0)
    topo["home"].run("ip", "addr", "add", "203.0.113.2/24", "dev", "eth0")
    config = appliance_config(tmp_path / "appliance")
    staff: dict[str, str | tuple[str, ...]] = {"role": "staff", "department": "Sales 1"}
    anyone = '[appliances]\naccept = "any"\n'
    corp = make_agent_dir(
        tmp_path / "corp", "203.0.113.1", users={"dave": ("pw-d", staff, {})}, extra=anyone
    )
    own = make_agent_dir(
        tmp_path / "own",
        "203.0.113.2",
        users={"carol": ("pw-c", staff, {"pop3": "203.0.113.3:110"})},
        extra=anyone,
    )
    fp_corp, _ = start_agent(topo, corp)
    fp_own, _ = start_agent(topo, own)

    def trust(attributes: str) -> None:
        write_atomically(
            config.policies.agents,
            f'[agents."corp.example"]\nfingerprints = ["{fp_corp}"]\nattributes = {attributes}\n',
        )

    def log_in(spec: str, password: str) -> tuple[gates.AgentResult, list[str]]:
        with NetnsSwitch(topo["gw"].netns):
            r = gates.agent_authenticate(config, spec, password)
        verdicts = gates.services(config, r.attributes) or []
        return r, sorted(name for name, v in verdicts if v.allowed)

    trust('["role"]')
    carol, allowed = log_in(f"carol@203.0.113.2#{fp_own}", "pw-c")
    assert carol.user == "carol@203.0.113.2" and not carol.trusted
    assert dict(carol.attributes) == {"source": "agent", "agent": "203.0.113.2"}
    # the example's visitors rule (their own mail), not staff's smtp, pop3, http
    assert allowed == ["imap", "imaps", "pop3", "pop3s"]
    assert carol.servers == {"pop3": "203.0.113.3:110"}  # her own mail server still works

    dave, allowed = log_in(f"dave@203.0.113.1#{fp_corp}", "pw-d")
    assert dave.user == "dave@corp.example" and dave.trusted
    assert dict(dave.attributes) == {"role": "staff", "source": "agent", "agent": "corp.example"}
    staff = ["http", "https", "imap", "imaps", "pop3", "pop3s", "smtp", "smtps", "submission"]
    assert allowed == staff

    # an invalid edit changes nothing; a valid one applies at the next login
    trust('["source"]')
    assert log_in(f"dave@203.0.113.1#{fp_corp}", "pw-d")[1] == staff
    trust("[]")
    dave, allowed = log_in(f"dave@203.0.113.1#{fp_corp}", "pw-d")
    assert allowed == ["imap", "imaps", "pop3", "pop3s"] and dave.user == "dave@corp.example"
