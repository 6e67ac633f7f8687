"""The libraries the roles load live with the units' syscall sandbox.

The units set MemoryDenyWriteExecute=yes (systemd: a seccomp rule against
writable+executable memory; Linux >= 6.3 offers the same rule to any process as
prctl PR_SET_MDWE), SystemCallFilter=@system-service minus @privileged and
@resources, and RestrictAddressFamilies=.  A child process installs all three as
the portal's unit states them (tests/unit_sandbox.py), then does what the roles
do with the libraries that could trip over them: ctypes/libffi callbacks,
argon2 (cffi), cryptography (TLS keys and certificates), uvloop, flask, sqlite,
dnslib, pyroute2 (netlink), and imports every role module this build has.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import unit_sandbox

from appliance.install import SOURCE

pytestmark = pytest.mark.unit

BODY = textwrap.dedent(
    r"""
    import ctypes, mmap, os, sys
    # the sandbox holds: writable+executable memory and privileged calls are refused
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("mdwe not enforced"); sys.exit(1)
    except OSError:
        pass
    try:
        os.chown(".", os.getuid(), os.getgid())
        print("syscall filter not enforced"); sys.exit(1)
    except PermissionError:
        pass

    cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
    assert cb(41) == 42

    from appliance.core import passwords
    h = passwords.hash_password("correct horse")
    assert passwords.verify_password(h, "correct horse")

    import datetime, ssl, tempfile, os
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    d = tempfile.mkdtemp()
    open(os.path.join(d, "c.pem"), "wb").write(cert.public_bytes(serialization.Encoding.PEM))
    open(os.path.join(d, "k.pem"), "wb").write(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(d, "c.pem"), os.path.join(d, "k.pem"))

    import asyncio, uvloop
    async def echo():
        async def handle(r, w):
            w.write(await r.read(5)); await w.drain(); w.close()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"hello"); data = await r.read(5); w.close(); srv.close()
        return data
    assert uvloop.run(echo()) == b"hello"

    import flask, waitress
    app = flask.Flask("t")
    app.add_url_rule("/", "i", lambda: "ok")
    assert app.test_client().get("/").data == b"ok"

    import dnslib
    q = dnslib.DNSRecord.question("portal.guest.example")
    assert dnslib.DNSRecord.parse(q.pack()).q.qname == "portal.guest.example"

    from pathlib import Path
    from appliance.state import store
    conn = store.connect(Path(d) / "state.sqlite")
    conn.execute("create table t (x)"); conn.execute("insert into t values (1)")

    if "netlink" in sys.argv[1:]:  # only the net role talks netlink (pyroute2, nftables)
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            assert ipr.get_links()

    from appliance import roles
    for role in roles.ROLES:
        try:
            roles.resolve(role)
            print("role", role)
        except roles.RoleUnavailable:
            pass
    print("ok")
    """
)


@pytest.mark.parametrize(("unit_name", "netlink"), [("portal", False), ("net", True)])
def test_role_libraries_work_in_the_units_syscall_sandbox(unit_name: str, netlink: bool) -> None:
    unit = SOURCE / "systemd" / f"appliance-{unit_name}.service"
    r = subprocess.run(
        [sys.executable, "-c", unit_sandbox.program(unit, BODY), *(["netlink"] if netlink else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "no PR_SET_MDWE" in r.stderr:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok"), r.stdout
