"""`appliance install --root DIR`: a staged install, checked file by file (never the real /etc)."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import pytest

from appliance import cli
from appliance.install import SOURCE, unit_files

pytestmark = pytest.mark.unit


def install(root: Path, *extra: str) -> int:
    return cli.main(["install", "--root", str(root), *extra])


def test_staged_install_puts_config_units_user_and_links_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    assert install(root) == 0
    etc = root / "etc" / "appliance"
    for src in (SOURCE / "policies").glob("*.toml"):
        assert (etc / src.name).read_text() == src.read_text(), src.name
        assert (etc / src.name).stat().st_mode & 0o777 == 0o640
    assert tomllib.loads((etc / "appliance.toml").read_text())["state"]["directory"] == (
        "/var/lib/appliance"
    )
    units = root / "etc" / "systemd" / "system"
    for src in unit_files():
        assert (units / src.name).read_text() == src.read_text(), src.name
    assert (root / "var" / "lib" / "appliance").is_dir()
    # the keys the units hide from the roles that do not use them exist before any starts
    for key in ("admin-secret.key", "agent-client.key", "firewall-grant.key"):
        path = root / "var" / "lib" / "appliance" / key
        assert path.stat().st_size > 0 and path.stat().st_mode & 0o777 == 0o600, key
    link = root / "usr" / "local" / "bin" / "appliance"
    assert link.is_symlink() and os.access(link, os.X_OK)
    assert (root / "etc" / "sysusers.d" / "appliance.conf").read_text().startswith("u appliance ")
    if shutil.which("systemd-sysusers"):
        users = (root / "etc" / "passwd").read_text()
        assert any(line.startswith("appliance:") for line in users.splitlines())
    if shutil.which("systemctl"):
        wants = units / "multi-user.target.wants" / "appliance.target"
        assert wants.is_symlink()
        assert os.readlink(wants) == "/etc/systemd/system/appliance.target"
    out = capsys.readouterr().out
    assert "/etc/appliance/appliance.toml: ok" in out  # the example validates where it lands
    assert "systemctl start appliance.target" in out


def test_install_never_overwrites_an_edited_config_and_runs_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    edited = root / "etc" / "appliance" / "access.toml"
    edited.parent.mkdir(parents=True)
    edited.write_text("# the admin's own rules\n")
    assert install(root) == 0
    assert install(root) == 0
    assert edited.read_text() == "# the admin's own rules\n"
    out = capsys.readouterr().out
    assert "kept /etc/appliance/access.toml (exists)" in out


def test_install_with_other_directories_rewrites_units_and_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    rc = install(
        root,
        "--prefix=/opt/gg",
        "--config-dir=/srv/gg/etc",
        "--state-dir=/srv/gg/state",
        "--no-enable",
    )
    assert rc == 0
    conf = root / "srv" / "gg" / "etc" / "appliance.toml"
    assert tomllib.loads(conf.read_text())["state"]["directory"] == "/srv/gg/state"
    assert (root / "srv" / "gg" / "state").is_dir()
    units = root / "etc" / "systemd" / "system"
    dns = (units / "appliance-dns.service").read_text()
    assert "ExecStart=/opt/gg/bin/appliance run --config /srv/gg/etc/appliance.toml dns\n" in dns
    # StateDirectory= only covers /var/lib; elsewhere the state is made writable instead
    assert "StateDirectory=" not in dns
    assert "ReadWritePaths=/srv/gg/state\n" in dns
    admin = (units / "appliance-admin.service").read_text()
    assert "ReadWritePaths=/srv/gg/etc\n" in admin
    assert "=/etc/appliance" not in admin and " /etc/appliance" not in admin
    assert "InaccessiblePaths=-/srv/gg/state/admin-secret.key " in dns
    assert "/var/lib/appliance" not in dns
    assert (root / "opt" / "gg" / "bin" / "appliance").is_symlink()
    assert not (units / "multi-user.target.wants").exists()


def test_install_refuses_relative_paths(tmp_path: Path) -> None:
    assert install(tmp_path, "--config-dir=etc/appliance") == 2


def test_the_keys_made_at_install_are_the_ones_the_roles_use(tmp_path: Path) -> None:
    """Same formats as on first use: the agent client loads its key, the admin its secret."""
    from dataclasses import replace

    from appliance.agent import client
    from appliance.core.config import load

    root = tmp_path / "root"
    assert install(root, "--no-enable") == 0
    state = root / "var" / "lib" / "appliance"
    made = (state / "agent-client.key").read_bytes()
    cfg = load(root / "etc" / "appliance" / "appliance.toml")
    cfg = replace(cfg, state=replace(cfg.state, directory=state))
    client.appliance_key(cfg)  # loads (a bad file would raise), never remakes
    assert (state / "agent-client.key").read_bytes() == made
    assert install(root, "--no-enable") == 0  # a second install keeps them
    assert (state / "agent-client.key").read_bytes() == made
