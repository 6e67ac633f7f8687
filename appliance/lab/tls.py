"""A certificate authority for the lab, so real TLS clients verify real lab servers.

The lab's servers (nginx on 443, dovecot IMAPS/POP3S, postfix submission/smtps)
get certificates from one throwaway CA made per run; clients are given `ca.pem`
as their only trust root (`curl --cacert`, `openssl s_client -CAfile`,
`swaks --tls-ca-path`), so a test fails if a name or a chain is wrong, exactly
as it would for a guest.  Nothing is added to the machine's own trust store.
The relay pins upstream certificates by `fingerprint`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# long enough for a lab left running over a weekend, short enough that a leaked key expires
VALID_DAYS = 4


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key readable by its owner only (servers read it as root, then drop)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True)
class LabCA:
    """A self-signed CA (EC P-256) in a directory: `ca.pem` and `ca.key`."""

    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str = "Guest gateway lab CA") -> LabCA:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory / "ca.pem", directory / "ca.key")
        ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca.cert.chmod(0o644)
        _write_key(ca.key, key)
        return ca

    def issue(self, names: list[str], directory: Path, stem: str) -> tuple[Path, Path]:
        """A server certificate for `names` (DNS names, or IP literals as IP SANs).

        Returns (chain, key): `stem.pem` holds the leaf then the CA, which is what
        nginx, dovecot and postfix each want in one file; `stem.key` is its key.
        """
        if not names:
            raise ValueError("a certificate needs at least one name")
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{self.key}: not an EC key")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(_san(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        chain, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        chain.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + ca_cert.public_bytes(serialization.Encoding.PEM)
        )
        chain.chmod(0o644)
        _write_key(key_path, key)
        return chain, key_path


def fingerprint(cert_pem: Path) -> str:
    """ "sha256:" + hex of the DER of the first certificate in the file (the leaf of a chain)."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()
