"""Property-based fuzzing of the running agent (HTTPS on loopback) from its OpenAPI file.

Schemathesis generates requests from `appliance/agent/openapi.yaml`, valid and
invalid; every other request is signed by an allowed appliance key so the fuzz
also reaches the body checks and the password check.  No answer may be a 5xx,
and every answer must match the documented schema.
"""

from __future__ import annotations

import itertools
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from agent_helpers import RunningAgent, free_port, make_agent_dir
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings

import appliance.agent
from appliance.core import agent_protocol as wire

pytestmark = pytest.mark.unit
OPENAPI = Path(appliance.agent.__file__).with_name("openapi.yaml")
KEY = Ed25519PrivateKey.generate()
# 413 (too large) and 423 (locked) are right refusals of bad input too
_config = schemathesis.Config.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "403", "404", "405", "413", "415", "423", "429"]
            }
        }
    }
)
schema = schemathesis.openapi.from_path(OPENAPI, config=_config)


def quick_verify(stored: str | None, password: str) -> bool:
    """argon2id is slow on purpose (and tested elsewhere); here it would only slow the fuzz."""
    return stored is not None and password == "alice-pw"


class SignEveryOther(requests.auth.AuthBase):
    """Sign the prepared request (exact bytes) as the appliance would, every other time."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.turn = itertools.count()

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if next(self.turn) % 2:
            return r
        body = r.body if isinstance(r.body, bytes) else (r.body or "").encode()
        path = urllib.parse.urlsplit(r.url or "").path
        r.headers.update(
            wire.sign_headers(
                KEY,
                r.method or "POST",
                path,
                self.fingerprint,
                body,
                time.time(),
                secrets.token_urlsafe(18),
            )
        )
        return r


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    d: Path = tmp_path_factory.mktemp("fuzz-agent")
    settings_ = make_agent_dir(
        d,
        port=free_port(),
        users={"alice": ("alice-pw", {"department": "Sales 1"}, {"pop3": "203.0.113.3:110"})},
        extra=(
            f'[appliances]\ntrusted = ["{wire.public_key_id(KEY.public_key())}"]\n'
            '[tls]\nnames = ["127.0.0.1"]\n'
            "[limits]\nrate = 100000\nburst = 100000\nmax_failures = 1000\n"
        ),
    )
    running = RunningAgent(settings_, verify=quick_verify)
    yield running
    running.close()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_server_errors(
    case: schemathesis.Case, agent: RunningAgent, session: requests.Session
) -> None:
    response = case.call(
        base_url=agent.url,
        session=session,
        auth=SignEveryOther(agent.server.fingerprint),
        timeout=10,
        verify=str(agent.server.settings.tls_certificate),  # its own CA, for 127.0.0.1
    )
    assert response.status_code < 500, response.text
    case.validate_response(response)
