"""Register many idle households at a home relay and hold their links open.

    python households.py URL CA RELAY_HOST COUNT PREFIX

Each household has its own P-256 key and self-signed certificate (as an agent's),
answers the relay's challenge with `sign_registration`, then stays idle (the
relay's own pings keep it up).  Prints `READY n` once n are registered, then
sleeps until killed.  Runs in a namespace of the benchmark (see
test_home_relay_bench.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import resource
import ssl
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect

from appliance.homelink.registration import parse_challenge, sign_registration


def identity(name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


async def register(
    url: str, ctx: ssl.SSLContext, host: str, name: str, gate: asyncio.Semaphore
) -> ClientConnection:
    key, der = identity(name)
    async with gate:
        ws = await connect(
            url, ssl=ctx, server_hostname=host, compression=None, ping_interval=None,
            open_timeout=60,
        )  # fmt: skip
        nonce = parse_challenge(await ws.recv())
        await ws.send(json.dumps(sign_registration(key, der, nonce, name, host)))
        answer = json.loads(await ws.recv())
        if answer.get("type") != "registered":
            raise RuntimeError(f"{name}: {answer}")
    return ws


async def main() -> None:
    url, ca, host, count, prefix = sys.argv[1:6]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = ssl.create_default_context(cafile=ca)
    gate = asyncio.Semaphore(32)
    links = await asyncio.gather(
        *(register(url, ctx, host, f"{prefix}-{i}", gate) for i in range(int(count)))
    )
    print(f"READY {len(links)}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
