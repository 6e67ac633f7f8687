"""The whole lab site: real servers in the segment and at home, a personal agent, the appliance.

`appliance lab up` calls `start()` after building the topology; everything runs as a
background process inside the lab's namespaces, so it outlives the command and
`appliance lab down` removes it with the namespaces.  Accounts are fixed and printed
so a person (or `appliance lab demo`) can log in at once:

- site account `carol` / `carol-pass` (department Sales 1, a contractor: web only);
- home account `alice` / `alice-pass` at the personal agent 203.0.113.1, which the site
  trusts (agents.toml) for department and role: she logs in as alice@home.example (staff:
  mail, her own POP server at home, and web);
- admin `admin` / `admin-pass` on the admin pages at http://198.51.100.1:8000/.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.core import tomledit
from appliance.core.atomic_file import write_atomically
from appliance.core.config import load
from appliance.lab import household, pair, servers
from appliance.lab.commands import agent_cmd, appliance_cmd, run_checked
from appliance.lab.tls import LabCA, fingerprint
from appliance.lab.topology import LAB_PREFIX, NETNS_ETC, LabError, Node, Topology

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
AGENT_ADDR = "203.0.113.1"
AGENT_PORT = 8443

# names the lab resolver (dnsmasq at 198.51.100.2) knows
PUBLIC_NAMES = {
    "www.example.com": servers.WEB_ADDR,
    "mail.home.example": servers.POP_ADDR,
    "smtp.example.org": "192.0.2.25",
}
SEGMENT_NAMES = {"intranet.site.example": "198.51.100.3", "proxy.site.example": "198.51.100.4"}

SITE_USER = ("carol", "carol-pass", ["department=Sales 1", "title=contractor"])
HOME_USER = ("alice", "alice-pass", ["department=Sales 1", "role=staff"])
ADMIN = ("admin", "admin-pass")
WELCOME = (
    b"From: home@home.example\r\nTo: alice@home.example\r\nSubject: welcome home\r\n"
    b"\r\nThis message waits on alice's own POP server at home.\r\n"
)


@dataclass
class SiteInfo:
    """What `lab up` prints and `lab demo` reads back (state.json)."""

    directory: str
    config: str
    agent_fingerprint: str = ""
    maildir: str = ""
    server_dirs: list[str] = field(default_factory=list)
    # the lab CA's certificate: guests trust it to check the origins' own certificates
    # (the appliance never decrypts, so what a guest sees is the origin's)
    ca: str = ""
    web_cert: str = ""  # www.example.com's certificate chain
    mail_cert: str = ""  # alice's home mail store's
    bob_spec: str = ""  # bob's agent behind NAT, through the relay (appliance/lab/household.py)
    bob_maildir: str = ""  # his POP server's maildir (demo and tests add messages)
    state_dsn: str = ""  # the store on the segment's PostgreSQL (`lab up --state postgresql`)
    second_config: str = ""  # gw2's, the standby of the pair (`lab up --ha`)

    @property
    def agent_spec(self) -> str:
        return f"{AGENT_ADDR}#{self.agent_fingerprint}"


def write_config(directory: Path, state_dsn: str = "", dhcp_relays: tuple[str, ...] = ()) -> Path:
    """The example config and tables, with state in the lab directory (or, given a DSN,
    in PostgreSQL: `[state] backend = "postgresql"`); `dhcp_relays`: DHCP relay agents
    on the guest side to trust (a benchmark's perfdhcp)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("servers.toml", "access.toml", "agents.toml"):
        shutil.copy(POLICIES / name, directory / name)
    text = (POLICIES / "appliance.toml").read_text()
    state = directory / "state"
    text = text.replace('directory = "/var/lib/appliance"', f'directory = "{state}"')
    if state_dsn:
        text = text.replace(
            f'directory = "{state}"',
            f'directory = "{state}"\nbackend = "postgresql"\ndsn = "{state_dsn}"',
        )
    if dhcp_relays:
        listed = ", ".join(f'"{r}"' for r in dhcp_relays)
        text = text.replace("[dhcp]\n", f"[dhcp]\nrelays = [{listed}]\n", 1)
    path = directory / "appliance.toml"
    path.write_text(text)
    return path


def _accounts(config: Path, gw: Node) -> None:
    """The site's accounts, made as an admin would on the box (in gw: the store may be
    the segment's PostgreSQL, which only the appliance's address reaches)."""
    user, pw, attrs = SITE_USER
    run_checked(
        gw,
        appliance_cmd(
            "users",
            "add",
            "--config",
            str(config),
            user,
            "--password-stdin",
            *[a for kv in attrs for a in ("--attr", kv)],
        ),
        stdin=pw + "\n",
    )
    name, apw = ADMIN
    run_checked(
        gw,
        appliance_cmd("admins", "add", "--config", str(config), name, "--password-stdin"),
        stdin=apw + "\n",
    )


def add_agent(
    topo: Topology,
    directory: Path,
    config: Path,
    *,
    addr: str = AGENT_ADDR,
    user: tuple[str, str, list[str]] = HOME_USER,
    pop: str = servers.POP_ADDR,
    name: str = "agent",
    trusted_as: str | None = "home.example",
    trusted_keys: tuple[str, ...] = ("department", "role"),
    allow: bool = True,
    pop3_pin: str = "",
) -> str:
    """A personal agent at home on `addr` with one user whose POP server is `pop`; this
    appliance's key allowed (unless `allow` is false: a household that has not yet).
    Returns the agent's pin (`sha256:...`).

    The lab's own agent is the default, and the site trusts it (agents.toml, by its
    fingerprint, as `trusted_as`) to assert `trusted_keys`; tests add a second
    household's agent with another address (which must be on the home namespace's
    interface) and user, untrusted with `trusted_as=None`."""
    home, gw = topo["home"], topo["gw"]
    adir = directory / name
    adir.mkdir(parents=True, exist_ok=True)
    agent_toml = adir / "agent.toml"
    agent_toml.write_text(
        f'[listen]\naddress = "{addr}"\nport = {AGENT_PORT}\n'
        '[state]\ndirectory = "state"\n[appliances]\naccept = "listed"\n'
    )
    conf = ("--config", str(agent_toml))
    uid, pw, attrs = user
    run_checked(
        None,
        agent_cmd(
            "users",
            "add",
            *conf,
            uid,
            "--password-stdin",
            *[a for kv in attrs for a in ("--attr", kv)],
        ),
        stdin=pw + "\n",
    )
    # with the mail store's pin, the visitor's plain POP3 on 110 goes to its 995 as TLS
    pop3 = f"{pop}:995#{pop3_pin}" if pop3_pin else f"{pop}:110"
    for service, target in (
        ("pop3", pop3), ("pop3s", f"{pop}:995"), ("imap", f"{pop}:143"), ("imaps", f"{pop}:993")
    ):  # fmt: skip
        run_checked(None, agent_cmd("servers", "set", *conf, uid, service, target))
    key = run_checked(gw, appliance_cmd("agent-key", "--config", str(config))).split()[0]
    if allow:  # `--`: a key may start with "-" (base64url)
        run_checked(
            None, agent_cmd("appliances", "allow", *conf, "--name", "lab appliance", "--", key)
        )
    home.start(*agent_cmd("run", *conf), name=f"personal-{name}")
    home.wait_port(AGENT_PORT, addr, timeout=30)
    fingerprint = run_checked(None, agent_cmd("fingerprint", *conf)).split()[0]
    if trusted_as is not None:
        table = config.parent / "agents.toml"
        old = tomledit.read(table)
        data = tomllib.loads(old)
        entry = {"fingerprints": [fingerprint], "attributes": list(trusted_keys)}
        data.setdefault("agents", {})[trusted_as] = entry
        write_atomically(table, tomledit.updated(old, data, path=table))
    return fingerprint


def start(
    topo: Topology, directory: Path, postgres: bool = False, dhcp_relays: tuple[str, ...] = ()
) -> SiteInfo:
    """Start every server and the appliance; returns what a person needs to try it.
    `postgres`: the shared store on the segment's PostgreSQL (198.51.100.6) instead of
    SQLite.  A topology with a second appliance (`ha`) gets the active/standby pair
    (appliance/lab/pair.py), on PostgreSQL.

    A topology built with its household behind NAT (`nat_household`) also gets the
    home relay and bob's home (appliance/lab/household.py)."""
    state_dsn, pg_dirs = "", []
    ha = "gw2" in topo.nodes
    if postgres or ha:
        clients = ("198.51.100.1", "198.51.100.11") if ha else ("198.51.100.1",)
        pg, state_dsn = servers.start_postgres(topo["seg"], clients, directory / "state")
        pg_dirs.append(str(pg.directory))
    config = write_config(directory, state_dsn, dhcp_relays)
    info = SiteInfo(str(directory), str(config), state_dsn=state_dsn)
    with_household = "relay" in topo.nodes
    servers.start_resolver(topo["seg"], {**PUBLIC_NAMES, **SEGMENT_NAMES}, directory, ttl=60)
    # the box's own resolver is the site's, as on a real box: the relay checks names with it
    (NETNS_ETC / topo["gw"].netns / "resolv.conf").write_text("nameserver 198.51.100.2\n")
    ca = LabCA.create(directory / "ca")
    info.ca = str(ca.cert)
    # the site's relay with submission (587, STARTTLS) and smtps (465); alice's home mail
    # store with POP3, IMAP (STARTTLS), POP3S and IMAPS; www.example.com over HTTP and HTTPS
    smtp = servers.start_smtp(topo["seg"], domains=("example.net", "example.org"), tls=ca)
    proxy = servers.start_webproxy(topo["seg"], resolver="198.51.100.2")
    pop = servers.start_mail_store(topo["home"], {HOME_USER[0]: HOME_USER[1]}, tls=ca)
    servers.add_pop_message(pop, HOME_USER[0], WELCOME)
    web = servers.start_web(
        topo["home"],
        files={
            "index.html": b"<h1>www.example.com</h1><p>The internet, as seen through the site's "
            b"web proxy.</p>\n"
        },
        tls=ca,
    )
    info.web_cert, info.mail_cert = str(web.extra["cert"]), str(pop.extra["cert"])
    info.server_dirs = [str(s.directory) for s in (smtp, proxy, pop, web)] + pg_dirs
    info.maildir = str(smtp.extra["maildir"])
    _accounts(config, topo["gw"])
    info.agent_fingerprint = add_agent(
        topo, directory, config, pop3_pin=fingerprint(Path(info.mail_cert))
    )
    if with_household:
        info.server_dirs += household.start_relay(topo, directory, ca)
        with config.open("a") as f:
            f.write(household.relay_section(ca, directory, household.federated(topo)))
        key = run_checked(topo["gw"], appliance_cmd("agent-key", "--config", str(config)))
        pin, bob_pop = household.start_household(topo, directory, config, ca, key.split()[0])
        info.bob_spec = household.bob_spec(pin)
        info.bob_maildir = str(bob_pop.extra["mail"] / household.USER[0])
        info.server_dirs.append(str(bob_pop.directory))
    second = pair.configure(config) if ha else None
    start_roles(topo["gw"], config)
    if second is not None:
        # keepalived holds the address only while the roles run (its vrrp_script), so
        # they come first; gw's keepalived first: it takes the guest address, gw2's
        # then finds it taken.  gw2 with the keys gw's roles made.
        pair.start_keepalived(topo["gw"], config, directory)
        pair.wait_active(topo["gw"])
        pair.share_keys(config, second)
        start_roles(topo["gw2"], second, "198.51.100.11")
        pair.start_keepalived(topo["gw2"], second, directory)
        info.second_config = str(second)
    # the segment's Prometheus scrapes every role's metrics on the management address
    servers.start_prometheus(topo["seg"], load(config).metrics.targets(), directory)
    (directory / "site.json").write_text(json.dumps(asdict(info), indent=2))
    return info


def start_roles(gw: Node, config: Path, segment_ip: str = "198.51.100.1") -> None:
    """Every role of one appliance, under the supervisor; back once they all listen."""
    gw.start(*appliance_cmd("run", "--config", str(config)), name="appliance")
    for port, host, proto in (
        (67, "0.0.0.0", "udp"),
        (53, "192.168.1.1", "udp"),
        (80, "192.168.1.1", "tcp"),
        (8000, segment_ip, "tcp"),
    ):
        gw.wait_port(port, host, timeout=60, proto=proto)
    deadline = time.monotonic() + 30
    while gw.run("nft", "list", "table", "inet", "appliance", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise LabError(f"the appliance on {gw.name} did not install its nftables table")
        time.sleep(0.2)


def load_info(directory: Path) -> SiteInfo:
    try:
        return SiteInfo(**json.loads((directory / "site.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise LabError(f"the lab is not up (no {directory / 'site.json'}): {exc}") from None


def cleanup(directory: Path) -> None:
    """Remove the servers' private directories and the lab directory."""
    try:
        info = load_info(directory)
        for d in info.server_dirs:
            shutil.rmtree(d, ignore_errors=True)
    except LabError:
        pass
    shutil.rmtree(directory, ignore_errors=True)
    # servers' private directories (mkdtemp under /tmp) of a start that failed half-way
    for leftover in Path("/tmp").glob(f"{LAB_PREFIX}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
