"""How a sandboxed interpreter is started: the operating-system isolation around it, best first.

- bwrap (bubblewrap): new user, mount, PID, network, IPC, UTS and cgroup namespaces; no capabilities, no nested
  user namespaces, a new session; the file system is read-only system folders and the Python installation, the
  child's own files at /sandbox (read-only), a minimal /dev, no /proc, and a size-capped tmpfs at /work (the only
  writable place).
- unshare (util-linux): the same namespaces and a size-capped tmpfs over the work folder, but the rest of the file
  system is the host's, guarded by the audit hook (and, when we are root, by running the program as nobody).
- hook: no namespaces (e.g. no user namespaces allowed, or not Linux): rlimits, seccomp and the audit hook only
  (and nobody's permissions when we are root); writes are capped per file, not in total.

Each tier is probed once per process by starting an interpreter in it. In both namespace tiers the interpreter is
not PID 1 (bwrap's init or a shell is), and a child killed by signal N is reported as exit status 128 + N.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["TIERS", "available", "best", "command", "python_executable"]

TIERS = ("bwrap", "unshare", "hook")
NOBODY = 65534
"""The uid and gid an untrusted program runs as when we are root (bwrap: inside its own user namespace)."""
INSIDE_TOP, INSIDE_ROOT = "/sandbox", "/work"


def python_executable() -> str:
    """The real interpreter (not a venv link): started with -I -S it finds its standard library by itself."""
    return os.path.realpath(sys.executable)


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for prefix in {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python_executable()))}:
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    return args


@functools.lru_cache(maxsize=None)
def drops_privileges() -> bool:
    """Whether the program process switches to NOBODY itself (tiers unshare and hook), so that the file system's
    permissions guard the host's files too: when we are root and NOBODY can read the Python installation (a
    pyenv under /root, say, it cannot; then the audit hook is the only guard of the host's files)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    for folder in {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python_executable()))}:
        path = Path(folder)
        for p in (path, *path.parents):
            if not p.stat().st_mode & 0o001:  # others may not pass through
                return False
        if not path.stat().st_mode & 0o004:
            return False
    return True


def command(tier: str, top: Path, root: Path, disk_bytes: int) -> tuple[list[str], str, str]:
    """(argv prefix, top folder, root folder as the child sees them) for starting a child in `tier`: `top` holds
    the child's files, `root` is its (empty) writable working folder."""
    if tier == "bwrap":
        argv = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
                "--cap-drop", "ALL", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox", *_system_binds(),
                "--dev", "/dev", "--size", str(disk_bytes), "--tmpfs", INSIDE_ROOT,
                "--ro-bind", str(top), INSIDE_TOP, "--chdir", INSIDE_ROOT, "--"]
        return argv, INSIDE_TOP, INSIDE_ROOT
    if tier == "unshare":  # root makes the namespaces itself (no user namespace), and the child drops to NOBODY
        # the shell stays as the namespace's PID 1 (which ignores signals it has no handler for) and runs the child
        owner = f",uid={NOBODY},gid={NOBODY}" if drops_privileges() else ""
        script = ('mount -t tmpfs -o size="$1",mode=700' + owner + ' lmforge-sandbox "$2" && cd "$2" || exit 70; '
                  'shift 2; "$@"; exit $?')
        user = [] if drops_privileges() else ["--user", "--map-root-user"]
        argv = ["unshare", *user, "--mount", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts",
                "--mount-proc", "sh", "-c", script, "sh", str(disk_bytes), str(root)]
        return argv, str(top), str(root)
    if tier == "hook":
        return [], str(top), str(root)
    raise ValueError(f"sandbox isolation: expected auto or one of {', '.join(TIERS)}, found {tier!r}")


@functools.lru_cache(maxsize=None)
def available(tier: str) -> bool:
    """Whether `tier` starts an interpreter on this machine (probed once per process)."""
    if tier == "hook":
        return True
    if sys.platform != "linux" or shutil.which(tier) is None:
        return False
    with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-probe-") as tmp:
        top, root = Path(tmp) / "top", Path(tmp) / "work"
        top.mkdir()
        root.mkdir()
        argv, _, _ = command(tier, top, root, 1 << 20)
        try:
            done = subprocess.run(argv + [python_executable(), "-I", "-S", "-c", "pass"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, cwd=root)
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


def best() -> str:
    """The strongest tier this machine offers."""
    return next(t for t in TIERS if available(t))
