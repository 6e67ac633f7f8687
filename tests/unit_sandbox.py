"""A unit's syscall sandbox without systemd, for tests: its SystemCallFilter= and
RestrictAddressFamilies= as a seccomp filter (libseccomp through ctypes), plus
MemoryDenyWriteExecute= as the kernel's PR_SET_MDWE.

`program(unit, body)` gives Python source that installs the unit's filter in the
process that runs it (and so in everything it starts, e.g. `nft`), then runs
`body`.  A refused syscall fails with EPERM, as systemd's SystemCallErrorNumber=EPERM
makes it; a refused address family too (systemd says EAFNOSUPPORT; same effect).
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
from pathlib import Path


@functools.cache
def syscall_groups() -> dict[str, tuple[str, ...]]:
    """systemd's syscall groups (@system-service, ...) as systemd-analyze lists them."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
        else:
            current = None
    return {k: tuple(v) for k, v in groups.items()}


def expand(items: list[str]) -> set[str]:
    groups = syscall_groups()
    out: set[str] = set()
    for item in items:
        out |= expand(list(groups[item])) if item.startswith("@") else {item}
    return out


def unit_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def allowed_syscalls(unit: Path) -> set[str]:
    """SystemCallFilter= lines: an allow list, then `~` lines taking groups away."""
    allow: set[str] = set()
    for value in unit_settings(unit).get("SystemCallFilter", []):
        if value.startswith("~"):
            allow -= expand(value[1:].split())
        else:
            allow |= expand(value.split())
    return allow


def families(unit: Path) -> list[int]:
    values = unit_settings(unit).get("RestrictAddressFamilies", [])
    return [int(getattr(socket, f)) for f in values[-1].split()] if values else []


PRELUDE = r"""
import ctypes, errno, json, sys
def _sandbox(cfg):
    libc = ctypes.CDLL(None, use_errno=True)
    if cfg["mdwe"] and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
        raise SystemExit("no PR_SET_MDWE")
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    ctx = lib.seccomp_init(deny)
    for name in cfg["allow"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0 or (name == "socket" and cfg["families"]):
            continue
        lib.seccomp_rule_add_array(ctx, allow, nr, 0, None)
    if cfg["families"] and "socket" in cfg["allow"]:
        nr = lib.seccomp_syscall_resolve_name(b"socket")
        for fam in cfg["families"]:
            cmp = Cmp(0, 4, fam, 0)  # SCMP_CMP_EQ on the first argument
            if lib.seccomp_rule_add_array(ctx, allow, nr, 1, ctypes.byref(cmp)) != 0:
                raise SystemExit("seccomp rule failed")
    if lib.seccomp_load(ctx) != 0:
        raise SystemExit("seccomp_load failed")
"""


def program(unit: Path, body: str, mdwe: bool = True) -> str:
    """Python source: install `unit`'s sandbox in this process, then run `body`."""
    cfg = {"allow": sorted(allowed_syscalls(unit)), "families": families(unit), "mdwe": mdwe}
    return f"{PRELUDE}\n_sandbox(json.loads({json.dumps(json.dumps(cfg))}))\n{body}"


_CHECKOUT = Path(__file__).resolve().parents[1]


def fs_script(unit: Path, owner: int = 65534, setup: str = "", home: bool = True) -> str:
    """Shell commands (as root, in a private mount namespace) that lay out the file
    system the way the unit's ProtectSystem=, StateDirectory=, InaccessiblePaths=,
    PrivateTmp=, ProtectHome=, ProtectKernelTunables=, ProtectProc= and ProcSubset= would.
    The state directory is a fresh tmpfs owned by `owner` (the stand-in user);
    `setup` runs while /var/lib is still writable (e.g. to copy a configuration
    there); home=False leaves /home and /root alone (an interpreter lives there)."""
    every = unit_settings(unit)
    s = {k: v[-1] for k, v in every.items()}
    cmds = []
    state = s.get("StateDirectory")
    # InaccessiblePaths= ("-": when present): a mode-0000 inode over each, after `setup`
    hidden = [p.removeprefix("-") for v in every.get("InaccessiblePaths", []) for p in v.split()]
    hide = ["I=$(mktemp /dev/shm/inaccessible.XXXXXX)", "chmod 0000 $I"] if hidden else []
    hide += [f"if [ -e {p} ]; then mount --bind $I {p}; fi" for p in hidden]
    if state:
        cmds += [
            "mount -t tmpfs -o mode=0755 tmpfs /var/lib",
            f"mkdir -p /var/lib/{state}",
            f"chown {owner}:{owner} /var/lib/{state}",
            f"chmod {s.get('StateDirectoryMode', '0755')} /var/lib/{state}",
            setup,
            f"mount --bind /var/lib/{state} /var/lib/{state}",
            *hide,  # after the (non-recursive) bind above, which would drop them
            "mount -o remount,bind,ro /var/lib",
        ]
    if s.get("ProtectSystem") == "strict":
        cmds.append("mount -o remount,bind,ro /")
    if s.get("PrivateTmp") == "yes":
        keep = _CHECKOUT if _CHECKOUT.is_relative_to("/tmp") else None
        if keep:  # a clone under /tmp (CI may put one there): keep the code and venv visible
            cmds += ["K=$(mktemp -d /dev/shm/keep.XXXXXX)", f"mount --bind {keep} $K"]
        cmds += [
            "mount -t tmpfs -o mode=1777 tmpfs /tmp",
            "mount -t tmpfs -o mode=1777 tmpfs /var/tmp",
        ]
        if keep:
            cmds += [f"mkdir -p {keep}", f"mount --bind $K {keep}"]
    if s.get("ProtectHome") == "yes" and home:
        cmds += [
            "mount -t tmpfs -o mode=0000 tmpfs /home",
            "mount -t tmpfs -o mode=0000 tmpfs /root",
        ]
    if s.get("ProtectKernelTunables") == "yes":
        cmds.append("mount -o remount,bind,ro /sys")
    opts = []
    if s.get("ProtectProc") in ("invisible", "noaccess"):
        opts.append(f"hidepid={s['ProtectProc']}")
    if s.get("ProcSubset") == "pid":
        opts.append("subset=pid")
    if opts:
        cmds.append(f"mount -t proc -o {','.join(opts)} proc /proc")
    if s.get("ProtectKernelTunables") == "yes" and s.get("ProcSubset") != "pid":
        cmds += ["mount --bind /proc/sys /proc/sys", "mount -o remount,bind,ro /proc/sys"]
    return "\n".join(cmds)


def capabilities(unit: Path) -> list[str]:
    values = unit_settings(unit).get("AmbientCapabilities", [])
    return values[-1].split() if values else []


def command(
    unit: Path,
    python: str,
    body: str,
    caps: list[str] | None = None,
    uid: int = 65534,
    setup: str = "",
    home: bool = True,
) -> list[str]:
    """argv that runs Python `body` as the unit would run its service: in a private
    mount namespace laid out like the unit's (needs root), as `uid` with no new
    privileges and only `caps` (default: the unit's AmbientCapabilities=), inside
    its syscall filter, address families and write-xor-execute rule."""
    caps = capabilities(unit) if caps is None else caps
    spec = ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in sorted(caps))])
    script = fs_script(unit, owner=uid, setup=setup, home=home) + '\nexec "$@"\n'
    return [
        "unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh",
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
        f"--inh-caps={spec}", f"--ambient-caps={spec}", f"--bounding-set={spec}",
        python, "-c", program(unit, body),
    ]  # fmt: skip
