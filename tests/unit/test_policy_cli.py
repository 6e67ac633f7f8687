"""`appliance policy check|show|explain` and `appliance reload` as an admin runs them."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.core.config import load
from appliance.core.pidfiles import pidfile, running_roles

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    for name in ("appliance.toml", "servers.toml", "access.toml"):
        shutil.copy(ROOT / "policies" / name, tmp_path / name)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(cfg.read_text().replace("/var/lib/appliance", str(tmp_path / "state")))
    (tmp_path / "users.toml").write_text(
        '[users.dave]\npassword_hash = "$argon2id$x"\n'
        'attributes = { department = "Sales 1", title = "contractor" }\n'
        '[users.erin]\npassword_hash = "$argon2id$x"\n'
        'attributes = { role = ["guest", "staff"] }\n'
    )
    return cfg


def test_check_and_show(site: Path) -> None:
    r = appliance("policy", "check", "--config", str(site))
    assert r.returncode == 0 and "(9 services)" in r.stdout and "(4 rules)" in r.stdout
    assert "agents.toml: absent (no agent is trusted" in r.stdout
    (site.parent / "agents.toml").write_text('[agents.corp]\ndomains = ["agent.corp.example"]\n')
    r = appliance("policy", "check", "--config", str(site))
    assert r.returncode == 0 and "agents.toml: ok (1 trusted agents)" in r.stdout
    (site.parent / "agents.toml").write_text('[agents.corp]\ndomain = "agent.corp.example"\n')
    r = appliance("policy", "check", "--config", str(site))
    assert r.returncode == 2 and "agents.toml:2: agents.corp.domain: unknown key" in r.stderr
    r = appliance("check-config", str(site))
    assert r.returncode == 2 and "agents.corp.domain: unknown key" in r.stderr
    (site.parent / "agents.toml").unlink()
    r = appliance("policy", "show", "--config", str(site))
    assert r.returncode == 0
    assert "smtp       :2525  intercepts 25" in r.stdout
    sales = next(line for line in r.stdout.splitlines() if " sales " in line)
    # http https imap imaps pop3 pop3s smtp smtps submission
    assert sales.split()[2:11] == ["allow", "allow", "-", "-", "-", "-", "allow", "allow", "allow"]


def test_check_refuses_a_bad_table_with_file_line_key(site: Path) -> None:
    access = site.parent / "access.toml"
    access.write_text(access.read_text().replace('allow = ["http"]', 'allow = ["gopher"]'))
    r = appliance("policy", "check", "--config", str(site))
    assert r.returncode == 2
    line = next(n for n, t in enumerate(access.read_text().splitlines(), 1) if "gopher" in t)
    assert f"{access}:{line}: rules[0].allow: unknown service 'gopher'" in r.stderr
    r = appliance("check-config", str(site))
    assert r.returncode == 2 and "unknown service 'gopher'" in r.stderr


def test_explain_for_site_users_and_given_attributes(site: Path) -> None:
    r = appliance("policy", "explain", "--config", str(site), "dave", "smtp")
    assert r.returncode == 1
    assert "contractors: matches, deny smtp  <- decides" in r.stdout
    assert "smtp: denied: rule 'contractors'" in r.stdout
    r = appliance("policy", "explain", "--config", str(site), "erin", "pop3")
    assert r.returncode == 0 and "staff: matches, allow pop3" in r.stdout
    r = appliance(
        "policy", "explain", "--config", str(site), "x", "smtp", "--attr", "department=Sales 1"
    )
    assert r.returncode == 0 and "sales: matches, allow smtp" in r.stdout
    r = appliance("policy", "explain", "--config", str(site), "x", "network", "--attr", "a=b")
    assert r.returncode == 1 and "network use: refused" in r.stdout
    r = appliance("policy", "explain", "--config", str(site), "nobody", "smtp")
    assert r.returncode == 2 and "no site user 'nobody'" in r.stderr


FAKE_ROLE = """
import signal, sys, time, pathlib
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGHUP, lambda s, f: out.write_text("hup"))
out.write_text("ready")
time.sleep(30)
"""


def test_reload_signals_the_running_roles_and_refuses_invalid_tables(
    site: Path, tmp_path: Path
) -> None:
    config = load(site)
    r = appliance("reload", "--config", str(site))
    assert r.returncode == 1 and "no running roles" in r.stdout
    mark = tmp_path / "mark"
    # a stand-in role: its command line looks like `... appliance run ...`
    proc = subprocess.Popen([sys.executable, "-c", FAKE_ROLE, str(mark), "appliance", "run"])
    try:
        while not mark.exists() or mark.read_text() != "ready":
            time.sleep(0.02)
        run = config.state.directory / "run"
        run.mkdir(parents=True)
        (run / "proxy.pid").write_text(f"{proc.pid}\n")
        (run / "dns.pid").write_text("999999\n")  # stale: skipped
        assert running_roles(config) == {"proxy": proc.pid}
        access = site.parent / "access.toml"
        good = access.read_text()
        access.write_text(good.replace('"Sales 1" }\nallow', '"Sales 1" }\nallow = 3\nx'))
        r = appliance("reload", "--config", str(site))
        assert r.returncode == 2 and "access.toml" in r.stderr
        assert mark.read_text() == "ready"  # nothing was signalled
        access.write_text(good)
        r = appliance("reload", "--config", str(site))
        assert r.returncode == 0 and f"sent SIGHUP to proxy (pid {proc.pid})" in r.stdout
        deadline = time.monotonic() + 5
        while mark.read_text() != "hup" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mark.read_text() == "hup"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)


def test_pidfile_lives_as_long_as_the_role(site: Path) -> None:
    config = load(site)
    with pidfile(config, "admin") as path:
        assert path.read_text().strip().isdigit()
    assert not path.exists()
