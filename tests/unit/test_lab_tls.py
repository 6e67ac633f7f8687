"""The lab CA: what it issues verifies with `ssl` and the CA as the only trust root."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from pathlib import Path

import pytest

from appliance.lab.tls import LabCA, fingerprint

pytestmark = pytest.mark.unit


def handshake(ca: LabCA, chain: Path, key: Path, server_hostname: str) -> ssl.SSLObject:
    """A TLS handshake between two in-memory endpoints; raises what the client raises."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(chain, key)
    client_ctx = ssl.create_default_context(cafile=str(ca.cert))  # the lab CA only
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA.create(tmp_path_factory.mktemp("ca"))


def test_issued_cert_verifies_for_its_names(ca: LabCA, tmp_path: Path) -> None:
    chain, key = ca.issue(["www.example.com", "203.0.113.80"], tmp_path, "www")
    assert (chain.name, key.name) == ("www.pem", "www.key")
    assert ca.cert.name == "ca.pem" and ca.key.name == "ca.key"
    client = handshake(ca, chain, key, "www.example.com")
    assert client.getpeercert()["subjectAltName"] == (  # type: ignore[index]
        ("DNS", "www.example.com"),
        ("IP Address", "203.0.113.80"),
    )
    handshake(ca, chain, key, "203.0.113.80")  # an IP literal is checked against the IP SAN


def test_name_not_in_san_fails(ca: LabCA, tmp_path: Path) -> None:
    chain, key = ca.issue(["www.example.com"], tmp_path, "www")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(ca, chain, key, "mail.example.com")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, chain, key, "203.0.113.80")


def test_another_ca_is_not_trusted(ca: LabCA, tmp_path: Path) -> None:
    other = LabCA.create(tmp_path / "other")
    chain, key = other.issue(["www.example.com"], tmp_path, "www")
    with pytest.raises(
        ssl.SSLCertVerificationError, match="self-signed certificate in certificate chain"
    ):
        handshake(ca, chain, key, "www.example.com")


def test_openssl_sees_ca_and_server_purposes(ca: LabCA, tmp_path: Path) -> None:
    chain, _ = ca.issue(["mail.example.net"], tmp_path, "mail")
    leaf = tmp_path / "leaf.pem"
    text = chain.read_text()
    leaf.write_text(text[: text.index("-----END CERTIFICATE-----") + 26])
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert), "-purpose", "sslserver", str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr
    ca_text = subprocess.run(
        ["openssl", "x509", "-in", str(ca.cert), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CA:TRUE" in ca_text and "Certificate Sign" in ca_text
    assert oct(ca.key.stat().st_mode & 0o777) == "0o600"


def test_fingerprint_is_sha256_of_the_leaf_der(ca: LabCA, tmp_path: Path) -> None:
    chain, _ = ca.issue(["www.example.com"], tmp_path, "www")
    leaf = chain.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    der = ssl.PEM_cert_to_DER_cert(leaf)
    assert fingerprint(chain) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert fingerprint(ca.cert) != fingerprint(chain)
    out = subprocess.run(
        ["openssl", "x509", "-in", str(chain), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert fingerprint(chain) == "sha256:" + out.split("=", 1)[1].strip().replace(":", "").lower()
