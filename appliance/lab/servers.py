"""Real servers for lab nodes: postfix, dovecot (POP3, IMAP), squid, nginx.

Each runs in a namespace through `node.start(...)` (so topology teardown kills
it) with its own configuration in a private directory: nothing touches the
machine's own /etc/postfix, /etc/dovecot, /etc/squid or /etc/nginx, and no
server listens outside its namespace.  The directories are made with
`tempfile.mkdtemp` under /tmp rather than in pytest's tmp_path because the
daemons drop privileges (postfix's virtual delivery, squid's `proxy` user,
dovecot's mail uid) and pytest's tmp tree is private to root; `stop()` kills
the server and removes its directory.

Why postfix and not aiosmtpd: postfix runs unprivileged-to-root fine in a
namespace with `config_directory`/`queue_directory` in a temp dir and
`start-fg`, and delivers to a maildir through its `virtual` agent, so the
tests talk to the real MTA a site would run.

TLS: given a `LabCA` (appliance.lab.tls), nginx, dovecot and postfix also speak
TLS with a certificate the CA issued into their private directory, so real
clients (curl, openssl s_client, swaks, imaplib) verify them with `ca.pem` as
their only trust root; `server.extra["ca"]` is that file and
`server.extra["cert"]` the server's chain (for `tls.fingerprint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.lab.tls import LabCA
from appliance.lab.topology import LabError, Node, Process

SMTP_ADDR = "198.51.100.3"
WEBPROXY_ADDR = "198.51.100.4"
PROMETHEUS_ADDR = "198.51.100.5"
PROMETHEUS_PORT = 9090
SCRAPE_INTERVAL = 2  # seconds: tests wait a few of these at most
POP_ADDR = "203.0.113.3"
WEB_ADDR = "203.0.113.80"


@dataclass
class Server:
    """A running lab server: its process, its directory, and where it listens."""

    name: str
    process: Process
    directory: Path
    host: str
    port: int
    extra: dict[str, Path] = field(default_factory=dict)

    def stop(self, remove: bool = True) -> None:
        self.process.stop()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        parts = [self.process.output()]
        for p in self.directory.glob("*.log"):
            with contextlib.suppress(OSError):
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)


def _issue(tls: LabCA, names: list[str], directory: Path, stem: str) -> dict[str, Path]:
    """A certificate for `names` in the server's own directory; returns its `extra` entries."""
    chain, key = tls.issue(list(dict.fromkeys(names)), directory, stem)
    return {"ca": tls.cert, "cert": chain, "key": key}


def _workdir(node: Node, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"{node.topology.prefix}-{name}-", dir="/tmp"))
    d.chmod(0o755)
    return d


def _chown(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _started(
    node: Node, server: Server, timeout: float = 20.0, more_ports: tuple[int, ...] = ()
) -> Server:
    """Wait for the server's port and `more_ports` on its host; stop it and say why if not."""
    try:
        for port in (server.port, *more_ports):
            node.wait_port(port, server.host, timeout=timeout)
    except LabError:
        out = server.log()
        server.stop()
        raise LabError(f"{server.name} did not start:\n{out[-4000:]}") from None
    return server


# -- dnsmasq -----------------------------------------------------------------------
RESOLVER_ADDR = "198.51.100.2"


def dnsmasq_argv(listen: str, pid_file: Path, port: int = 53) -> list[str]:
    """dnsmasq in the foreground with no file of the machine's own (/etc/hosts, resolv.conf)."""
    return [
        "dnsmasq",
        "-k",
        "-C",
        "/dev/null",
        "--no-resolv",
        "--no-hosts",
        "-u",
        "root",
        f"--listen-address={listen}",
        "--bind-interfaces",
        f"--port={port}",
        f"--pid-file={pid_file}",
    ]


def start_resolver(
    node: Node,
    records: dict[str, str] | list[tuple[str, str]],
    workdir: Path,
    host: str = RESOLVER_ADDR,
    port: int = 53,
    ttl: int = 300,
    extra: list[str] | None = None,
) -> Process:
    """The site's resolver: dnsmasq answering `records` (name -> IPv4) from its own table."""
    pairs = records.items() if isinstance(records, dict) else records
    argv = dnsmasq_argv(host, workdir / f"resolver-{host}-{port}.pid", port)
    argv += [f"--local-ttl={ttl}", *(f"--host-record={n},{ip}" for n, ip in pairs)]
    proc = node.start(*argv, *(extra or []), name="resolver")
    node.wait_port(port, host, proto="udp")
    return proc


# -- postfix -----------------------------------------------------------------------
_MASTER_CF = """\
smtp      inet  n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""
# Mail submission over TLS, only with a CA: STARTTLS offered on 587, implicit TLS on 465
# (RFC 8314).  No SASL: the same `permit_mynetworks` as port 25 lets the segment relay,
# and port 25 itself is left exactly as without TLS (no STARTTLS offered there).
_MASTER_CF_TLS = """\
587       inet  n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=may
465       inet  n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
tlsmgr    unix  - - n 1000? 1 tlsmgr
"""
SUBMISSION_PORT = 587
SMTPS_PORT = 465


def start_smtp(
    node: Node,
    host: str = SMTP_ADDR,
    domains: tuple[str, ...] = ("example.net",),
    mynetworks: str = "198.51.100.0/24",
    tls: LabCA | None = None,
    names: tuple[str, ...] = ("smtp.segment.example",),
) -> Server:
    """Postfix on host:25 relaying only for `mynetworks`; every mail for `domains` lands in
    one maildir (`server.extra["maildir"]`); read it with `maildir_messages`.

    With `tls`, also submission on host:587 (STARTTLS) and smtps on host:465 (implicit
    TLS), same relay rule, with a certificate for `names` and `host`."""
    d = _workdir(node, "postfix")
    etc, queue, data, mail = d / "etc", d / "queue", d / "data", d / "mail"
    for p in (etc, queue, data, mail):
        p.mkdir()
    _chown(data, "postfix")
    _chown(mail, "postfix")
    pw = pwd.getpwnam("postfix")
    extra = {"maildir": mail / "inbox"}
    tls_cf = ""
    if tls is not None:
        extra |= _issue(tls, [*names, host], d, "smtp")
        # security level stays "none" in main.cf (port 25); master.cf raises it per service
        tls_cf = (
            f"smtpd_tls_chain_files = {extra['key']}, {extra['cert']}\n"
            "smtpd_tls_protocols = >=TLSv1.2\n"
            "smtpd_tls_loglevel = 1\n"
        )
    (etc / "master.cf").write_text(_MASTER_CF + (_MASTER_CF_TLS if tls else ""))
    (etc / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = smtp.segment.example
mydomain = segment.example
mydestination =
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = {mynetworks}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {" ".join(domains)}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{pw.pw_uid}
virtual_gid_maps = static:{pw.pw_gid}
maillog_file = /dev/stdout
smtpd_banner = $myhostname ESMTP
alias_maps =
alias_database =
local_recipient_maps =
biff = no
{tls_cf}"""
    )
    proc = node.start("postfix", "-c", str(etc), "start-fg", name="postfix")
    server = Server("postfix", proc, d, host, 25, extra)
    return _started(node, server, more_ports=(SUBMISSION_PORT, SMTPS_PORT) if tls else ())


def maildir_messages(maildir: Path) -> list[bytes]:
    out = []
    for sub in ("new", "cur"):
        p = maildir / sub
        if p.is_dir():
            out += [f.read_bytes() for f in sorted(p.iterdir())]
    return out


def wait_mail(maildir: Path, count: int = 1, timeout: float = 15.0) -> list[bytes]:
    """Messages in the maildir once there are at least `count` (postfix delivers async)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msgs = maildir_messages(maildir)
        if len(msgs) >= count:
            return msgs
        time.sleep(0.1)
    raise LabError(f"{count} message(s) expected in {maildir}, found {len(msgs)}")


# -- dovecot -----------------------------------------------------------------------
IMAP_PORT, IMAPS_PORT, POP3S_PORT = 143, 993, 995


def _listener(name: str, host: str, port: int, ssl: bool = False) -> str:
    return (
        f"  inet_listener {name} {{\n    address = {host}\n    port = {port}\n"
        + ("    ssl = yes\n" if ssl else "")
        + "  }\n"
    )


def start_mail_store(
    node: Node,
    users: dict[str, str],
    host: str = POP_ADDR,
    tls: LabCA | None = None,
    names: tuple[str, ...] = ("mail.home.example",),
    pop3_port: int = 110,
    imap: bool = True,
) -> Server:
    """Dovecot over one set of maildirs: POP3 on host:`pop3_port`, and with `imap` IMAP on
    host:143; with `tls` also IMAPS 993 and POP3S 995, STARTTLS offered on 143 and 110,
    with a certificate for `names` and `host`.  Users are a passwd-file (plaintext
    passwords, plaintext logins allowed: lab only); each user's maildir is
    `server.extra["mail"] / user` (seed it with `add_pop_message`)."""
    d = _workdir(node, "dovecot")
    mail, run, state = d / "mail", d / "run", d / "state"
    for p in (mail, run, state):
        p.mkdir()
    (d / "passwd").write_text("".join(f"{u}:{{PLAIN}}{pw}::::::\n" for u, pw in users.items()))
    for u in users:
        for sub in ("new", "cur", "tmp"):
            (mail / u / sub).mkdir(parents=True)
    for p in [mail, *mail.rglob("*")]:
        _chown(p, "nobody")
    extra = {"mail": mail}
    ssl_conf = "ssl = no\n"
    pop3 = _listener("pop3", host, pop3_port)
    imap4 = _listener("imap", host, IMAP_PORT) if imap else ""
    ports: list[int] = [IMAP_PORT] if imap else []
    if tls is not None:
        extra |= _issue(tls, [*names, host], d, "mail")
        # the config process reads "<file" as root before the login processes drop
        ssl_conf = (
            f"ssl = yes\nssl_cert = <{extra['cert']}\nssl_key = <{extra['key']}\n"
            "ssl_min_protocol = TLSv1.2\n"
        )
        pop3 += _listener("pop3s", host, POP3S_PORT, ssl=True)
        ports.append(POP3S_PORT)
        if imap:
            imap4 += _listener("imaps", host, IMAPS_PORT, ssl=True)
            ports.append(IMAPS_PORT)
    imap_service = f"service imap-login {{\n{imap4}}}\n" if imap else ""
    (d / "dovecot.conf").write_text(
        f"""base_dir = {run}
state_dir = {state}
protocols = pop3{" imap" if imap else ""}
listen = {host}
{ssl_conf}disable_plaintext_auth = no
auth_mechanisms = plain
log_path = /dev/stderr
first_valid_uid = 1
mail_location = maildir:{mail}/%u
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={mail}/%u
}}
service pop3-login {{
{pop3}}}
{imap_service}service anvil {{
  chroot =
}}
"""
    )
    proc = node.start("dovecot", "-F", "-c", str(d / "dovecot.conf"), name="dovecot")
    server = Server("dovecot", proc, d, host, pop3_port, extra)
    return _started(node, server, more_ports=tuple(ports))


def start_pop3(
    node: Node,
    users: dict[str, str],
    host: str = POP_ADDR,
    port: int = 110,
    tls: LabCA | None = None,
    names: tuple[str, ...] = ("mail.home.example",),
) -> Server:
    """Dovecot POP3 only (host:port, and POP3S on 995 with `tls`): `start_mail_store`
    without IMAP, as the relay's POP3 tests have always had it."""
    return start_mail_store(node, users, host, tls, names, pop3_port=port, imap=False)


def add_pop_message(server: Server, user: str, message: bytes) -> None:
    deliver(server.extra["mail"] / user, message)


def deliver(box: Path, message: bytes) -> None:
    """A message into one user's maildir, as an MDA does (tmp, then new)."""
    name = f"{time.time_ns()}.lab.{box.name}"
    tmp = box / "tmp" / name
    tmp.write_bytes(message)
    _chown(tmp, "nobody")
    tmp.rename(box / "new" / name)


# -- squid -------------------------------------------------------------------------
# what the site's web proxy itself refuses to fetch: the segment it sits in, the guest
# subnet, itself.  The appliance checks names before it asks, but only the proxy knows
# which address its own lookup gave (DNS rebinding), so this deny is the last word.
PROXY_DENIED = ("198.51.100.0/24", "192.168.1.0/24", "127.0.0.0/8", "0.0.0.0/8", "::1")


def start_webproxy(
    node: Node,
    host: str = WEBPROXY_ADDR,
    port: int = 3128,
    resolver: str = "127.0.0.1",
    denied: tuple[str, ...] = PROXY_DENIED,
) -> Server:
    """Squid as the site's web proxy, no disk cache, CONNECT allowed to any port (lab),
    never to the hidden networks (`denied`)."""
    d = _workdir(node, "squid")
    _chown(d, "proxy")
    (d / "squid.conf").write_text(
        f"""http_port {host}:{port}
visible_hostname webproxy
cache deny all
cache_mem 8 MB
access_log stdio:{d}/access.log
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
cache_effective_user proxy
dns_nameservers {resolver}
acl hidden dst {" ".join(denied)}
http_access deny hidden
http_access allow all
shutdown_lifetime 0 seconds
"""
    )
    proc = node.start("squid", "-N", "-f", str(d / "squid.conf"), name="squid")
    return _started(
        node, Server("squid", proc, d, host, port, {"access_log": d / "access.log"}), 30
    )


# -- nginx -------------------------------------------------------------------------
HTTPS_PORT = 443
# advertised on the HTTPS server while no HTTP/3 listens: the lab checks that a browser's
# QUIC attempt (UDP 443, never relayed) falls back to TCP at once
ALT_SVC = 'h3=":443"; ma=86400'


def start_web(
    node: Node,
    host: str = WEB_ADDR,
    port: int = 80,
    files: dict[str, bytes] | None = None,
    workers: int = 1,
    tls: LabCA | None = None,
    names: tuple[str, ...] = ("www.example.com",),
) -> Server:
    """Nginx serving `files` (path -> content) from host:port; access log with $remote_addr.

    With `tls`, the same files over HTTPS on host:443 too, with a certificate for `names`
    only (a client must send one of them as SNI to verify), and an Alt-Svc header offering
    HTTP/3 that nothing serves: a browser's QUIC attempt to UDP 443 must fail over to TCP."""
    d = _workdir(node, "nginx")
    www = d / "www"
    www.mkdir()
    for name, content in (files or {"index.html": b"<h1>the internet</h1>\n"}).items():
        (www / name).parent.mkdir(parents=True, exist_ok=True)
        (www / name).write_bytes(content)
    extra = {"access_log": d / "access.log"}
    https = ""
    if tls is not None:
        extra |= _issue(tls, list(names), d, "web")
        https = f"""    server {{
        listen {host}:{HTTPS_PORT} ssl http2 backlog=4096;
        server_name {" ".join(names)};
        ssl_certificate {extra["cert"]};
        ssl_certificate_key {extra["key"]};
        ssl_protocols TLSv1.2 TLSv1.3;
        add_header Alt-Svc '{ALT_SVC}' always;
        root {www};
    }}
"""
    temps = "\n".join(
        f"    {k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (d / "nginx.conf").write_text(
        f"""user root;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 16384; }}
http {{
    access_log {d}/access.log;
{temps}
    keepalive_requests 100000;
    server {{
        listen {host}:{port} backlog=4096;
        root {www};
    }}
{https}}}
"""
    )
    proc = node.start(
        "nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;", name="nginx"
    )
    server = Server("nginx", proc, d, host, port, extra)
    return _started(node, server, more_ports=(HTTPS_PORT,) if tls else ())


# -- the relay over a static table, and interception, for tests and the lab ---------
PORTAL = "http://192.168.1.1/"
PORTS = {"smtp": 2525, "pop3": 1110, "http": 8081, "bulk": 9009}
EXPLICIT = 3128
INTERCEPT = {25: 2525, 110: 1110, 80: 8081, 9: 9009}


def redirect_ruleset(intercepts: dict[int, int], iif: str = "guest0") -> str:
    """A minimal nat table for the test's gw namespace until the net role's ruleset lands."""
    rules = "\n".join(
        f'    iifname "{iif}" tcp dport {a} redirect to :{b}' for a, b in intercepts.items()
    )
    return (
        "table ip relaytest {\n  chain pre {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"{rules}\n  }}\n}}\n"
    )


def install_redirects(gw: Node, intercepts: dict[int, int] = INTERCEPT) -> None:
    gw.run("nft", "-f", "-", input=redirect_ruleset(intercepts))


def guest_address(node: Node, ip: str) -> None:
    node.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    node.run("ip", "route", "add", "default", "via", "192.168.1.1")


def write_table(path: Path, users: dict[str, Any], servers: dict[str, list[str]]) -> None:
    listeners = [
        {"service": "smtp", "protocol": "smtp", "port": PORTS["smtp"]},
        {"service": "pop3", "protocol": "pop3", "port": PORTS["pop3"]},
        {"service": "http", "protocol": "http", "port": PORTS["http"]},
        {"service": "http", "protocol": "http", "port": EXPLICIT, "explicit": True},
        {"service": "bulk", "protocol": "tcp", "port": PORTS["bulk"]},
    ]
    path.write_text(
        json.dumps(
            {
                "portal_url": PORTAL,
                "listeners": listeners,
                "servers": servers,
                "users": users,
                "personal_allowed": ["pop3"],
            },
            indent=1,
        )
    )


def start_relay(
    gw: Node, table: Path, host: str = "192.168.1.1", *extra: str, loop: str = "auto"
) -> Process:
    proc = gw.start(
        sys.executable,
        "-m",
        "appliance.proxy",
        str(table),
        "--host",
        host,
        "--loop",
        loop,
        "--hidden",
        "198.51.100.0/24",
        *extra,
        name="relay",
    )
    gw.wait_port(PORTS["smtp"], host, timeout=20)
    return proc


# A byte source/sink for bulk transfers: `sink` hashes all it reads until EOF and
# answers with the hex digest (the client half-closed and still reads); `source`
# sends N MiB of random blocks and writes its digest to a file.
BULK = textwrap.dedent(
    """
    import hashlib, os, socket, sys
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    srv = socket.create_server((host, port))
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        h = hashlib.sha256()
        if mode == "sink":
            buf = bytearray(1 << 20)
            while (n := c.recv_into(buf)):
                h.update(memoryview(buf)[:n])
            c.sendall(h.hexdigest().encode())
        else:
            mib = int(c.recv(64).decode())
            block = bytearray(os.urandom(1 << 20))
            for i in range(mib):
                block[:8] = i.to_bytes(8, "big")
                h.update(block)
                c.sendall(block)
            open(sys.argv[4], "w").write(h.hexdigest())
        c.close()
    """
)


def start_bulk(node: Node, mode: str, host: str, port: int, workdir: Path) -> Process:
    script = workdir / "bulk.py"
    script.write_text(BULK)
    proc = node.start(
        sys.executable,
        str(script),
        mode,
        host,
        str(port),
        str(workdir / f"{mode}.sha"),
        name=f"bulk-{mode}",
    )
    node.wait_port(port, host)
    return proc


# -- prometheus --------------------------------------------------------------------
def prometheus_config(targets: dict[str, str], interval: int = SCRAPE_INTERVAL) -> str:
    """One scrape job per role (`job` is the role's name), every `interval` seconds."""
    lines = ["global:", f"  scrape_interval: {interval}s", f"  scrape_timeout: {interval}s"]
    lines.append("scrape_configs:")
    for role, target in targets.items():
        lines += [
            f"  - job_name: {json.dumps(role)}",
            "    static_configs:",
            f"      - targets: [{json.dumps(target)}]",
        ]
    return "\n".join(lines) + "\n"


def start_prometheus(
    node: Node,
    targets: dict[str, str],
    workdir: Path,
    host: str = PROMETHEUS_ADDR,
    port: int = PROMETHEUS_PORT,
) -> Server:
    """Debian's Prometheus scraping `targets` (job -> HOST:PORT), its data in `workdir`."""
    d = workdir / "prometheus"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "prometheus.yml"
    conf.write_text(prometheus_config(targets))
    proc = node.start(
        "/usr/bin/prometheus",
        f"--config.file={conf}",
        f"--storage.tsdb.path={d / 'data'}",
        f"--web.listen-address={host}:{port}",
        "--log.level=warn",
        name="prometheus",
    )
    return _started(node, Server("prometheus", proc, d, host, port), timeout=60)


# -- PostgreSQL (the shared store, issue #18) -------------------------------------------
POSTGRES_ADDR = "198.51.100.6"
POSTGRES_PORT = 5432
POSTGRES_USER = "postgres"  # Debian's server runs as it


def postgres_bindir() -> Path:
    """The newest installed server's programs (/usr/lib/postgresql/<version>/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    if not found:
        raise LabError("PostgreSQL is not installed (apt-get install postgresql)")
    return found[-1].parent


def postgres_init(data: Path, auth: str) -> None:
    """A new cluster in `data` (made by and for the postgres user), fsync on."""
    _as_postgres(
        postgres_bindir() / "initdb", "-D", data, "-U", POSTGRES_USER, "-A", auth,
        "-E", "UTF8", "--no-instructions",
    )  # fmt: skip


def _as_postgres(*argv: str | Path, timeout: float = 60.0, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["runuser", "-u", POSTGRES_USER, "--", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
    )
    if done.returncode != 0:
        said = f"{done.stdout}{done.stderr}" if stdin is None else "(its input holds a secret)"
        raise LabError(f"{Path(str(argv[0])).name} failed: {said}")
    return done.stdout


def start_postgres(
    node: Node, clients: tuple[str, ...], state_dir: Path, host: str = POSTGRES_ADDR
) -> tuple[Server, str]:
    """The site's PostgreSQL for the shared store, on `host`:5432 in the segment; only
    `clients` (the appliances' segment addresses) may log in, as user `appliance` with a
    random password (scram-sha-256) kept in a passfile in `state_dir`, mode 0600.
    Returns the server and the appliance's DSN (no password in it)."""
    d = _workdir(node, "postgres")
    _chown(d, POSTGRES_USER)
    d.chmod(0o700)
    data = d / "data"
    postgres_init(data, "peer")
    with open(data / "pg_hba.conf", "w") as hba:  # only the superuser locally, the appliance
        hba.write(f"local all {POSTGRES_USER} peer\n")
        for client in clients:
            hba.write(f"host appliance appliance {client}/32 scram-sha-256\n")
    proc = node.start(
        "runuser", "-u", POSTGRES_USER, "--", str(postgres_bindir() / "postgres"),
        "-D", str(data), "-k", str(d), "-c", f"listen_addresses={host}", "-c", "fsync=on",
        name="postgres",
    )  # fmt: skip
    server = _started(node, Server("postgres", proc, d, host, POSTGRES_PORT), timeout=60)
    password = secrets.token_urlsafe(24)
    for sql in (  # on stdin: the password is in no process's argv, nor in the server's log
        "SET log_min_error_statement = panic; SET log_statement = 'none'; "
        f"CREATE ROLE appliance LOGIN PASSWORD '{password}';",
        "CREATE DATABASE appliance OWNER appliance;",
    ):
        _as_postgres(postgres_bindir() / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                     "-h", d, "-d", "postgres", stdin=sql)  # fmt: skip
    state_dir.mkdir(parents=True, exist_ok=True)
    passfile = state_dir / "pgpass"
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # (an older file keeps its mode otherwise; libpq ignores a loose one)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{host}:{POSTGRES_PORT}:appliance:appliance:{password}\n")
    dsn = f"host={host} port={POSTGRES_PORT} dbname=appliance user=appliance passfile={passfile}"
    return server, dsn
