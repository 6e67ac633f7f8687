"""`appliance install`: put the appliance on a real box run by systemd.

It copies the example configuration and tables to the configuration directory
(never overwriting a file an admin may have edited), creates the system user
`appliance` that every role runs as, links the commands into PREFIX/bin, writes
the units of `systemd/` to /etc/systemd/system (paths rewritten for the chosen
prefix and directories) and enables `appliance.target`.  It starts nothing: the
admin edits the configuration first, then `systemctl start appliance.target`.

`--root DIR` stages the whole install under DIR (what the tests do): nothing
outside DIR is touched and systemd is not asked to reload.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# the checkout the package runs from: it holds systemd/ and policies/
SOURCE = Path(__file__).resolve().parents[1]
USER = "appliance"
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS = Path("/etc/sysusers.d/appliance.conf")
SYSUSERS_LINE = f'u {USER} - "Guest gateway appliance" /var/lib/appliance /usr/sbin/nologin\n'
COMMANDS = ("appliance", "personal-agent", "home-relay")

# what the unit files in systemd/ say, rewritten by render_unit()
DEFAULT_PREFIX = Path("/usr/local")
DEFAULT_CONFIG_DIR = Path("/etc/appliance")
DEFAULT_STATE_DIR = Path("/var/lib/appliance")
TARGET = "appliance.target"


@dataclass(frozen=True)
class Layout:
    """Where things go on the box (absolute paths as the running system sees them)."""

    prefix: Path = DEFAULT_PREFIX
    config_dir: Path = DEFAULT_CONFIG_DIR
    state_dir: Path = DEFAULT_STATE_DIR


def unit_files(source: Path = SOURCE) -> list[Path]:
    return sorted(p for p in (source / "systemd").iterdir() if p.suffix in (".service", ".target"))


def render_unit(text: str, layout: Layout) -> str:
    """The unit text with the command, configuration and state paths of `layout`."""
    text = text.replace(f"{DEFAULT_PREFIX}/bin/", f"{layout.prefix}/bin/")
    text = re.sub(rf"{re.escape(str(DEFAULT_CONFIG_DIR))}(?=[/\s])", str(layout.config_dir), text)
    # files named inside the state directory (InaccessiblePaths= of the keys)
    text = text.replace(f"{DEFAULT_STATE_DIR}/", f"{layout.state_dir}/")
    if layout.state_dir != DEFAULT_STATE_DIR:
        varlib = Path("/var/lib")
        if layout.state_dir.is_relative_to(varlib):
            rel = layout.state_dir.relative_to(varlib)
            text = text.replace("StateDirectory=appliance\n", f"StateDirectory={rel}\n")
        else:
            # StateDirectory= only knows /var/lib; elsewhere the directory is made writable
            text = text.replace(
                "StateDirectory=appliance\n", f"ReadWritePaths={layout.state_dir}\n"
            )
    return text


def render_config(text: str, layout: Layout) -> str:
    """The example appliance.toml with its [state] directory set to the chosen one."""
    head, sep, tail = text.partition("\n[state]\n")
    if not sep:
        return text + f'\n[state]\ndirectory = "{layout.state_dir}"\n'
    value = f'"{layout.state_dir}"'
    tail = re.sub(r'(?m)^(directory\s*=\s*)"[^"]*"', lambda m: m.group(1) + value, tail, count=1)
    return head + sep + tail


class Installer:
    def __init__(
        self,
        layout: Layout,
        root: Path | None = None,
        source: Path = SOURCE,
        say: Callable[[str], None] = print,
    ) -> None:
        self.layout = layout
        self.root = root
        self.source = source
        self.say = say

    def at(self, path: Path) -> Path:
        """`path` as seen from here: inside the staging root when there is one."""
        return self.root / path.relative_to("/") if self.root else path

    # -- steps -------------------------------------------------------------------------

    def create_user(self) -> None:
        conf = self.at(SYSUSERS)
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(SYSUSERS_LINE)
        self.say(f"wrote {SYSUSERS}")
        sysusers = shutil.which("systemd-sysusers")
        if sysusers:
            argv = [sysusers]
            if self.root:
                argv.append(f"--root={self.root}")
            subprocess.run([*argv, str(conf)], check=True, capture_output=True)
        elif self.root is None:
            if subprocess.run(["id", USER], capture_output=True).returncode != 0:
                subprocess.run(
                    ["useradd", "--system", "--home-dir", str(self.layout.state_dir),
                     "--shell", "/usr/sbin/nologin", "--user-group", USER],
                    check=True,
                )  # fmt: skip
        else:
            self.say("no systemd-sysusers: the user is created on first boot from sysusers.d")
            return
        self.say(f"system user {USER}: ok")

    def ids(self) -> tuple[int, int] | None:
        """uid and gid of the appliance user (in the staged passwd when staging)."""
        for line in self.at(Path("/etc/passwd")).read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 3 and fields[0] == USER:
                return int(fields[2]), int(fields[3])
        return None

    def chown(self, path: Path, user: bool) -> None:
        """root:appliance (user=False) or appliance:appliance; only when we are root."""
        ids = self.ids() if os.geteuid() == 0 else None
        if ids:
            os.chown(path, ids[0] if user else 0, ids[1])

    def copy_config(self) -> None:
        cdir = self.at(self.layout.config_dir)
        cdir.mkdir(parents=True, exist_ok=True)
        # the admin role rewrites tables (atomic rename), so the group may write here
        cdir.chmod(0o770)
        self.chown(cdir, user=False)
        for src in sorted((self.source / "policies").glob("*.toml")):
            dest = cdir / src.name
            shown = self.layout.config_dir / src.name
            if dest.exists():
                self.say(f"kept {shown} (exists)")
                continue
            text = src.read_text()
            if src.name == "appliance.toml":
                text = render_config(text, self.layout)
            dest.write_text(text)
            dest.chmod(0o640)
            self.chown(dest, user=False)
            self.say(f"installed {shown}")

    def make_state_dir(self) -> None:
        sdir = self.at(self.layout.state_dir)
        sdir.mkdir(parents=True, exist_ok=True)
        sdir.chmod(0o750)
        self.chown(sdir, user=True)
        self.say(f"state directory {self.layout.state_dir}: ok")
        self.make_keys()

    def make_keys(self) -> None:
        """The admin pages' signing key, the portal's agent-client and grant keys, made now.

        Every role runs as the user appliance; the units hide these files from the
        roles that do not use them (InaccessiblePaths=), which only works for a file
        that exists when the unit starts, so they must not wait for first use.  The
        formats are those the roles make on first use (appliance/admin/app.py and
        appliance/net/members.py: 32 random bytes; appliance/agent/client.py:
        Ed25519, PKCS#8 PEM)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from appliance.agent.client import KEY_FILE
        from appliance.net.members import KEY_FILE as GRANT_KEY_FILE

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for name, data in (
            ("admin-secret.key", secrets.token_bytes(32)),
            (KEY_FILE, pem),
            (GRANT_KEY_FILE, secrets.token_bytes(32)),
        ):
            path = self.at(self.layout.state_dir / name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self.say(f"kept {self.layout.state_dir / name} (exists)")
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.chown(path, user=True)
            self.say(f"made {self.layout.state_dir / name}")

    def link_commands(self) -> None:
        bindir = self.at(self.layout.prefix / "bin")
        bindir.mkdir(parents=True, exist_ok=True)
        here = Path(sys.executable).parent
        for name in COMMANDS:
            script = here / name
            link = bindir / name
            shown = self.layout.prefix / "bin" / name
            if not script.exists():
                self.say(f"skipped {shown}: no {script}")
                continue
            if link.exists() and not link.is_symlink():
                self.say(f"kept {shown} (a file, not our link)")
                continue
            if link.is_symlink():
                link.unlink()
            link.symlink_to(script)
            self.say(f"linked {shown} -> {script}")
        for where in (here, Path(sys.executable).resolve()):
            if str(where).startswith(("/home/", "/root/")):
                self.say(
                    f"warning: {where} is under /home or /root, which the units hide "
                    "(ProtectHome=) and the user appliance cannot read; use a venv made "
                    "with /usr/bin/python3 in a checkout under /opt"
                )
                break

    def install_units(self) -> list[str]:
        udir = self.at(UNIT_DIR)
        udir.mkdir(parents=True, exist_ok=True)
        names = []
        for src in unit_files(self.source):
            (udir / src.name).write_text(render_unit(src.read_text(), self.layout))
            (udir / src.name).chmod(0o644)
            names.append(src.name)
            self.say(f"installed {UNIT_DIR / src.name}")
        return names

    def enable(self) -> None:
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            self.say("no systemctl: enable appliance.target yourself")
            return
        if self.root:
            # a pure file operation inside the staged root: the enablement symlinks
            subprocess.run(
                [systemctl, f"--root={self.root}", "enable", TARGET],
                check=True,
                capture_output=True,
            )
            self.say(f"enabled {TARGET} in {self.root}")
        elif Path("/run/systemd/system").is_dir():
            subprocess.run([systemctl, "daemon-reload"], check=True)
            subprocess.run([systemctl, "enable", TARGET], check=True)
            self.say(f"enabled {TARGET}")
        else:
            self.say(f"systemd is not running: later, systemctl enable {TARGET}")

    def check_config(self) -> bool:
        """Validate the installed configuration and its tables, as check-config does."""
        from appliance.core.config import ConfigError, load
        from appliance.policy import files as policy_files

        path = self.at(self.layout.config_dir / "appliance.toml")
        try:
            policy_files.check(load(path))
        except (ConfigError, OSError) as exc:
            self.say(f"warning: the configuration does not validate yet: {exc}")
            return False
        self.say(f"{self.layout.config_dir / 'appliance.toml'}: ok")
        return True

    def run(self, enable: bool = True) -> None:
        self.create_user()
        self.copy_config()
        self.check_config()
        self.make_state_dir()
        self.link_commands()
        self.install_units()
        if enable:
            self.enable()
        conf = self.layout.config_dir / "appliance.toml"
        self.say("next:")
        self.say(f"  edit {conf} (interfaces, addresses), then: appliance check-config {conf}")
        self.say(f"  systemctl start {TARGET}")
        self.say("  journalctl -u 'appliance-*' -f")


def _cmd_install(args: argparse.Namespace) -> int:
    layout = Layout(prefix=args.prefix, config_dir=args.config_dir, state_dir=args.state_dir)
    for p in (layout.prefix, layout.config_dir, layout.state_dir):
        if not p.is_absolute():
            print(f"appliance install: {p} is not an absolute path", file=sys.stderr)
            return 2
    source: Path = args.source
    if not (source / "systemd").is_dir() or not (source / "policies").is_dir():
        print(
            f"appliance install: {source} has no systemd/ and policies/ (run it from a checkout, "
            "or name one with --source)",
            file=sys.stderr,
        )
        return 2
    root = args.root.resolve() if args.root else None
    if root is None and os.geteuid() != 0:
        print("appliance install: run as root (or stage with --root DIR)", file=sys.stderr)
        return 1
    Installer(layout, root=root, source=source).run(enable=not args.no_enable)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install",
        help="install config, system user and systemd units on this box",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX, help="commands go to PREFIX/bin")
    p.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR)
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--root", type=Path, help="stage the install under this directory")
    p.add_argument("--source", type=Path, default=SOURCE, help="checkout with systemd/, policies/")
    p.add_argument("--no-enable", action="store_true", help="do not enable appliance.target")
    p.set_defaults(func=_cmd_install)
