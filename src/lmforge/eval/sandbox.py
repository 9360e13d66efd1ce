"""Run untrusted Python (model-generated code) in a child interpreter with resource limits and an audit hook.

The child is `python -I -S -B` (no user site, no environment influence, no bytecode writes) in a fresh process
group and a fresh temporary directory with a minimal environment. Before the program runs, a bootstrap sets
rlimits (address space, CPU seconds, file size, no core files) and installs a `sys.addaudithook` hook (PEP 578)
that refuses processes, signals to others, sockets, ctypes, writes outside the temporary directory, and reads
outside it except of the Python installation. Audit hooks cannot be removed once added, and the hook keeps its
own references to everything it calls, so a program that patches `os` or `builtins` does not weaken it; the wall
clock kills the whole process group.

This stops accidents and casual misuse by generated code (the HumanEval setting); it is not a boundary against
code written to exploit interpreter internals, for which a container or VM is the tool. RLIMIT_NPROC is not
used: it counts every process of the user (not of the child), includes threads, and is ignored for root, so
process creation is refused by the hook instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "run_many"]

REFUSED_EXIT, MEMORY_EXIT, ERROR_EXIT = 77, 78, 70
REFUSED_MARK = "__lmforge_sandbox_refused__"
MEMORY_MARK = "__lmforge_sandbox_memory__"
ERROR_MARK = "__lmforge_sandbox_error__"


@dataclass
class SandboxLimits:
    """Resources one sandboxed program may use."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the whole process group is killed (status "timeout")."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU); exceeding them ends the program with status "timeout"."""
    memory_mb: int = 1024
    """Address space in MiB (RLIMIT_AS); allocations beyond it raise MemoryError (status "memory")."""
    max_output_bytes: int = 1_000_000
    """Bytes of stdout and of stderr kept each; the rest is read and dropped."""
    max_file_bytes: int = 10_000_000
    """Largest file the program may write (RLIMIT_FSIZE); larger writes fail with OSError."""

    def validate(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s < 1 or self.memory_mb < 32 or self.max_output_bytes < 0 \
                or self.max_file_bytes < 0:
            raise ValueError(f"sandbox limits must be positive (memory_mb >= 32), found {self}")


@dataclass
class SandboxResult:
    """How one sandboxed program ended."""

    status: Literal["passed", "failed", "timeout", "memory", "refused", "error"]
    """passed: exit 0; failed: an exception or non-zero exit; timeout: wall clock or CPU limit; memory: out of
    address space; refused: the audit hook refused an operation; error: the sandbox itself could not run it."""
    returncode: int | None
    """Exit status of the child (negative: killed by that signal; None: never started)."""
    stdout: str
    """Captured standard output, truncated at max_output_bytes."""
    stderr: str
    """Captured standard error, truncated at max_output_bytes."""
    seconds: float
    """Wall-clock time of the child."""
    detail: str = ""
    """Short reason: the traceback tail, the refused operation, the limit hit."""


# The child's first code. It runs before the program, keeps private references to everything it calls, and
# leaves nothing of itself in the program's globals.
_BOOTSTRAP = r'''
import sys


def _install(cfg):
    # Set the limits and add the audit hook. The hook refers only to immutable values and built-in functions,
    # bound as its defaults, so nothing the program can reach (frames, modules, builtins) changes what it allows.
    import posix, resource, _stat

    write, exit_ = posix.write, posix._exit
    try:
        mb = cfg["memory_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mb, mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["max_file_bytes"], cfg["max_file_bytes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
    except (ValueError, OSError) as e:
        write(2, ("\n%s cannot set resource limits: %s\n" % (ERROR_MARK, e)).encode())
        exit_(ERROR_EXIT)

    import os.path

    roots = (os.path.realpath(cfg["root"]),)
    readable = tuple(os.path.realpath(p) for p in list(sys.path) + [sys.prefix, sys.base_prefix, cfg["bootstrap"]]
                     if p) + roots

    def hook(event, args, lstat=posix.lstat, readlink=posix.readlink, getcwd=posix.getcwd, fspath=posix.fspath,
             S_ISLNK=_stat.S_ISLNK, S_ISDIR=_stat.S_ISDIR, write=write, isinstance=isinstance, str=str, bytes=bytes,
             int=int, len=len, any=any, tuple=tuple, hasattr=hasattr, repr=repr, OSError=OSError,
             BaseException=BaseException, PermissionError=PermissionError, roots=roots, readable=readable,
             devices=("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"),
             refused_events=frozenset(cfg["refused_events"]), refused_prefixes=tuple(cfg["refused_prefixes"]),
             refused_imports=frozenset(cfg["refused_imports"]), write_events=frozenset(cfg["write_events"]),
             read_events=frozenset(cfg["read_events"]), mark=REFUSED_MARK,
             write_flags=posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND):
        # (path, allowed roots, writing) to check, or a reason to refuse outright
        checks, reason = [], None
        try:
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                if path is not None and not isinstance(path, int):
                    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                        (isinstance(flags, int) and flags & write_flags)
                    checks.append((path, roots if writing else readable, True))
            elif event in refused_events or event.startswith(refused_prefixes):
                reason = event
            elif event == "import":
                if args[0] in refused_imports:
                    reason = "import " + args[0]
            elif event in write_events or event in read_events:
                allowed = roots if event in write_events else readable
                for a in args:
                    if isinstance(a, (str, bytes)) or (a is not None and not isinstance(a, int)
                                                       and hasattr(a, "__fspath__")):
                        checks.append((a, allowed, False))
            for path, allowed, is_open in checks:
                # os.path.realpath, inlined: absolute, '.', '..' and symbolic links resolved
                path = fspath(path)
                if isinstance(path, bytes):
                    path = path.decode("utf-8", "surrogateescape")
                if not path.startswith("/"):
                    path = getcwd() + "/" + path
                todo, done, hops = path.split("/"), [], 0
                while todo:
                    part = todo.pop(0)
                    if part in ("", "."):
                        continue
                    if part == "..":
                        if done:
                            done.pop()
                        continue
                    candidate = "/" + "/".join(done + [part])
                    try:
                        st = lstat(candidate)
                    except OSError:
                        done.append(part)  # does not exist (yet): the rest resolves lexically
                        continue
                    if S_ISLNK(st.st_mode):
                        hops += 1
                        if hops > 40:
                            reason = "too many symbolic links"
                            break
                        target = readlink(candidate)
                        todo = target.split("/") + todo
                        if target.startswith("/"):
                            done = []
                    else:
                        done.append(part)
                real = "/" + "/".join(done)
                if real in devices or any(real == r or real.startswith(r + "/") for r in roots):
                    continue
                if not any(real == r or real.startswith(r + "/") for r in allowed):
                    reason = "%s %s" % (event, real)
                    break
                if is_open:  # a directory fd outside the sandbox would let dir_fd= escape these checks
                    try:
                        if S_ISDIR(lstat(real).st_mode):
                            reason = "%s directory %s" % (event, real)
                            break
                    except OSError:
                        pass
        except BaseException as e:  # fail closed on anything unexpected
            reason = "%s (hook error %s)" % (event, type(e).__name__)
        if reason is not None:
            reason = reason[:300]
            write(2, ("\n%s %s\n" % (mark, reason)).encode("utf-8", "backslashreplace"))
            raise PermissionError("sandbox refused " + reason)

    posix.chdir(roots[0])
    sys.addaudithook(hook)


def _run(cfg):
    import builtins, posix, traceback, linecache  # noqa: F401  (loaded before the hook)

    exit_, write = posix._exit, posix.write
    path = cfg["program"]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    sys.stdin = open(cfg["stdin"], encoding="utf-8")
    try:
        code = compile(source, path, "exec")
    except SyntaxError:
        traceback.print_exc()
        exit_(1)
    _install(cfg)
    sys.argv = [path]
    try:
        exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": builtins})
    except SystemExit:
        raise
    except MemoryError:
        write(2, ("\n%s MemoryError\n" % MEMORY_MARK).encode())
        exit_(MEMORY_EXIT)
    except BaseException as e:
        refused = isinstance(e, PermissionError) and str(e).startswith("sandbox refused")
        try:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        except MemoryError:
            write(2, ("\n%s MemoryError\n" % MEMORY_MARK).encode())
            exit_(MEMORY_EXIT)
        except BaseException:
            pass
        exit_(REFUSED_EXIT if refused else 1)


_run(CONFIG)
'''

_CONFIG_KEYS = dict(
    refused_events=["subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                    "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.spawn", "resource.setrlimit",
                    "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
                    "sys.setprofile", "os.chroot", "webbrowser.open"],
    refused_prefixes=["socket.", "ctypes.", "_winapi.", "msvcrt."],
    refused_imports=["_posixsubprocess", "_ctypes", "_testcapi", "_testinternalcapi", "_xxsubinterpreters",
                     "_multiprocessing"],
    write_events=["os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                  "os.utime", "os.link", "os.symlink", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
                  "os.lchmod", "os.mkfifo", "os.mknod", "os.chdir", "shutil.rmtree", "shutil.copyfile",
                  "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move", "shutil.make_archive",
                  "shutil.unpack_archive", "tempfile.mkstemp", "tempfile.mkdtemp"],
    read_events=["os.listdir", "os.scandir", "os.listxattr", "os.getxattr", "glob.glob", "glob.glob/2"],
)


def _bootstrap(cfg: dict) -> str:
    consts = (f"REFUSED_MARK, MEMORY_MARK, ERROR_MARK = {REFUSED_MARK!r}, {MEMORY_MARK!r}, {ERROR_MARK!r}\n"
              f"REFUSED_EXIT, MEMORY_EXIT, ERROR_EXIT = {REFUSED_EXIT}, {MEMORY_EXIT}, {ERROR_EXIT}\n"
              f"CONFIG = {cfg!r}\n")
    return consts + _BOOTSTRAP


def _drain(stream, cap: int, out: list[bytes]) -> None:
    """Read a pipe to its end, keeping the first `cap` bytes (reading on, so the child never blocks)."""
    kept = 0
    while chunk := stream.read1(65536):
        if kept < cap:
            out.append(chunk[:cap - kept])
            kept += len(out[-1])
    stream.close()


def _tail(text: str, lines: int = 3, chars: int = 400) -> str:
    rows = [r for r in text.strip().splitlines() if r.strip() and not r.startswith("__lmforge_sandbox")]
    return "\n".join(rows[-lines:])[-chars:]


def _marked(text: str, mark: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(mark):
            return line[len(mark):].strip()
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for what the program does."""
    limits = limits or SandboxLimits()
    limits.validate()
    with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as tmp:
        work = Path(tmp) / "work"  # the program's directory; the bootstrap stays outside it, out of reach
        work.mkdir()
        program, stdin_file, boot = work / "program.py", Path(tmp) / "stdin.txt", Path(tmp) / "bootstrap.py"
        program.write_text(code, encoding="utf-8")
        stdin_file.write_text(stdin, encoding="utf-8")
        cfg = dict(root=str(work), program=str(program), stdin=str(stdin_file), bootstrap=str(boot),
                   memory_mb=limits.memory_mb, cpu_s=limits.cpu_s, max_file_bytes=limits.max_file_bytes, **_CONFIG_KEYS)
        boot.write_text(_bootstrap(cfg), encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8"}
        start = time.perf_counter()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(boot)], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as e:
            return SandboxResult("error", None, "", "", 0.0, f"cannot start {sys.executable}: {e}")
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [threading.Thread(target=_drain, args=(proc.stdout, limits.max_output_bytes, out), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, limits.max_output_bytes, err), daemon=True)]
        for t in readers:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        finally:
            _kill_group(proc)  # whatever the program left behind in its group
            for t in readers:
                t.join(timeout=5)
        seconds = time.perf_counter() - start
    stdout = b"".join(out).decode("utf-8", "replace")
    stderr = b"".join(err).decode("utf-8", "replace")
    rc = proc.returncode

    def result(status, detail: str) -> SandboxResult:
        return SandboxResult(status, rc, stdout, stderr, seconds, detail)

    refused = _marked(stderr, REFUSED_MARK) or _marked(stdout, REFUSED_MARK)
    if refused is not None or rc == REFUSED_EXIT:
        return result("refused", f"refused: {refused or 'an operation outside the sandbox'}")
    if timed_out:
        return result("timeout", f"killed after {limits.timeout_s:g} s wall clock")
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and seconds >= limits.cpu_s):
        return result("timeout", f"CPU limit of {limits.cpu_s} s")
    if rc == MEMORY_EXIT or _marked(stderr, MEMORY_MARK) is not None or rc == -signal.SIGKILL:
        return result("memory", f"out of memory (limit {limits.memory_mb} MiB)")
    if rc == ERROR_EXIT and _marked(stderr, ERROR_MARK) is not None:
        return result("error", _marked(stderr, ERROR_MARK) or "sandbox error")
    if rc == 0:
        return result("passed", "")
    if rc < 0:
        return result("failed", f"killed by {signal.Signals(-rc).name}")
    return result("failed", _tail(stderr) or f"exit code {rc}")


def run_many(programs: Sequence[str], limits: SandboxLimits | None = None, workers: int = 2,
             stdin: str = "") -> list[SandboxResult]:
    """Run programs concurrently (each thread waits on its own child process); results in input order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, found {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, limits, stdin), programs))
