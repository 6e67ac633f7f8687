"""The agent's TLS identity: a self-signed certificate made on first start, and its fingerprint.

Visitors pin the fingerprint (`alice@home.example#sha256:...`), so no CA is
involved; a household that has a CA-signed certificate names it in agent.toml
instead, and visitors may then leave the fingerprint out.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.core import agent_protocol as wire
from appliance.core.atomic_file import write_atomically


def ensure_certificate(cert_path: Path, key_path: Path, names: tuple[str, ...] = ()) -> bool:
    """Create a P-256 self-signed certificate if none exists; True when one was made."""
    if cert_path.exists() and key_path.exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    common = names[0] if names else socket.gethostname() or "personal-agent"
    sans: list[x509.GeneralName] = []
    for n in names or (common,):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomically(key_path, key_pem.decode("ascii"), 0o600)
    write_atomically(
        cert_path, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), 0o644
    )
    return True


def certificate_fingerprint(cert_path: Path) -> str:
    """Fingerprint of the first (leaf) certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return wire.fingerprint(cert.public_bytes(serialization.Encoding.DER))


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def secure_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
