"""Run untrusted Python (model-generated code) isolated, and judge it by tests it cannot reach or forge.

Layers, outermost first (docs/evaluation.md has the threat model):
1. operating-system isolation (`isolation.py`): namespaces, a private file system and a size-capped tmpfs where
   the machine allows them; the result says which tier ran;
2. a seccomp filter (`seccomp.py`): no new processes, no signals to others, no sockets, no namespaces or mounts;
3. rlimits (address space, CPU seconds, file size, no core files) and a wall clock that kills the process;
4. an audit hook (PEP 578, `child.py`) refusing processes, sockets, ctypes, and files outside the work folder.

`run_tests` runs the program in one sandboxed process and the tests in another (the judge): the judge calls the
program's functions over a pipe and gets plain values back (`wire.py`), so the program can neither read the tests,
nor print a verdict, nor return an object whose `__eq__` lies. Only the judge's own pipe says "passed".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

from . import isolation, seccomp

__all__ = ["SandboxLimits", "SandboxResult", "CodeTest", "run_python", "run_tests", "run_many"]

REFUSED_EXIT, MEMORY_EXIT, ERROR_EXIT = 77, 78, 70
MARKS = dict(refused_mark="__lmforge_sandbox_refused__", memory_mark="__lmforge_sandbox_memory__",
             error_mark="__lmforge_sandbox_error__")
MAX_MESSAGE_BYTES = 8 << 20
_CHILD_FILES = ("child.py", "seccomp.py", "wire.py")

_EVENTS = dict(
    refused_events=["subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                    "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.spawn", "resource.setrlimit",
                    "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
                    "sys.setprofile", "os.chroot", "webbrowser.open", "os.symlink", "os.link", "signal.pthread_kill",
                    "fcntl.ioctl", "sys.addaudithook"],
    refused_prefixes=["socket.", "ctypes.", "_winapi.", "msvcrt."],
    # C modules that touch files, processes or terminals without audit events of their own
    refused_imports=["_posixsubprocess", "_ctypes", "_testcapi", "_testinternalcapi", "_xxsubinterpreters",
                     "_multiprocessing", "ctypes", "readline", "_sqlite3", "_posixshmem", "spwd", "pwd", "grp", "_dbm",
                     "_gdbm", "_curses", "_curses_panel", "_tkinter", "nis", "ossaudiodev", "syslog", "termios",
                     "_testbuffer", "_testmultiphase", "_testimportmultiple", "_testsinglephase", "_xxtestfuzz",
                     "xxlimited", "xxlimited_35", "_testclinic"],
    write_events=["os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                  "os.utime", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.lchmod", "os.mkfifo",
                  "os.mknod", "os.chdir", "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
                  "shutil.copytree", "shutil.move", "shutil.make_archive", "shutil.unpack_archive", "tempfile.mkstemp",
                  "tempfile.mkdtemp"],
    read_events=["os.listdir", "os.scandir", "os.listxattr", "os.getxattr", "glob.glob", "glob.glob/2"],
)


@dataclass
class SandboxLimits:
    """Resources one sandboxed program may use, and the isolation it runs in."""

    timeout_s: float = 10.0
    """Wall-clock seconds before every process of the run is killed (status "timeout")."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU); exceeding them ends the program with status "timeout"."""
    memory_mb: int = 1024
    """Address space in MiB (RLIMIT_AS); allocations beyond it raise MemoryError (status "memory")."""
    max_output_bytes: int = 1_000_000
    """Bytes of stdout and of stderr kept each; the rest is read and dropped."""
    max_file_bytes: int = 10_000_000
    """Largest file the program may write (RLIMIT_FSIZE); larger writes fail with OSError."""
    max_disk_bytes: int = 64_000_000
    """Bytes all the program's files may take together (the size of its tmpfs; not capped in the "hook" tier)."""
    isolation: Literal["auto", "bwrap", "unshare", "hook"] = "auto"
    """auto: the strongest this machine offers; a named tier that is not available is an error (status "error")."""

    def validate(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s < 1 or self.memory_mb < 32 or self.max_output_bytes < 0 \
                or self.max_file_bytes < 0 or self.max_disk_bytes < 1 << 20:
            raise ValueError(f"sandbox limits must be positive (memory_mb >= 32, max_disk_bytes >= 1 MiB), "
                             f"found {self}")
        if self.isolation not in ("auto",) + isolation.TIERS:
            raise ValueError(f"sandbox isolation: expected auto or one of {', '.join(isolation.TIERS)}, "
                             f"found {self.isolation!r}")


@dataclass
class SandboxResult:
    """How one sandboxed program ended."""

    status: Literal["passed", "failed", "timeout", "memory", "refused", "error"]
    """passed: the judge ran every test (run_tests) or the program exited 0 (run_python); failed: a test or the
    program failed; timeout: wall clock or CPU limit; memory: out of address space; refused: the program attempted
    an operation the sandbox forbids; error: the sandbox itself could not run it."""
    returncode: int | None
    """Exit status of the program's process (negative: killed by that signal; None: never started)."""
    stdout: str
    """The program's standard output, truncated at max_output_bytes."""
    stderr: str
    """The program's standard error, truncated at max_output_bytes."""
    seconds: float
    """Wall-clock time of the run."""
    detail: str = ""
    """Short reason: the failing test's traceback tail, the refused operation, the limit hit."""
    isolation: str = ""
    """The tier that ran it: bwrap, unshare or hook (see sandbox/isolation.py); hook means no OS namespaces."""


@dataclass
class CodeTest:
    """A program and the tests that judge it."""

    code: str
    """The untrusted program (e.g. a HumanEval prompt + completion); its top-level functions are what tests call."""
    tests: str
    """Trusted test code (asserts, or a `def check(candidate)`), run in the judge process."""
    context: str = ""
    """Trusted code run in the judge before the tests (e.g. the HumanEval prompt, whose helper functions the tests
    call): its definitions are used, not the program's, except the entry point."""
    entry_point: str | None = None
    """The function under test: passed to the tests' `check(candidate)` when they define one."""


class _Child:
    """One sandboxed interpreter: started, its output drained on threads, waited for, killed."""

    def __init__(self, role: str, files: dict[str, str], limits: SandboxLimits, tier: str, tmp: Path,
                 fds: dict[str, int], extra: dict, stdin: str = ""):
        top, root = tmp / "top", tmp / "work"  # the child's files (read-only to it) and its working folder
        drop = role != "judge" and tier != "bwrap" and isolation.drops_privileges()  # the judge stays ours
        top.mkdir(mode=0o755 if drop else 0o700)
        root.mkdir(mode=0o700)
        if drop:  # NOBODY reads its files and writes its work folder (the tmpfs, in the unshare tier), nothing else
            os.chown(root, isolation.NOBODY, isolation.NOBODY)
        here = Path(__file__).parent
        for name in _CHILD_FILES:
            shutil.copyfile(here / name, top / name)
        for name, text in files.items():
            (top / name).write_text(text, encoding="utf-8")  # 0644 under the usual umask
        (top / "stdin.txt").write_text(stdin, encoding="utf-8")
        prefix, inside_top, inside_root = isolation.command(tier, top, root, limits.max_disk_bytes)
        cfg = dict(role=role, root=inside_root, readable=[inside_top], stdin=f"{inside_top}/stdin.txt",
                   program=f"{inside_top}/program.py" if "program.py" in files else None,
                   tests=f"{inside_top}/tests.py" if "tests.py" in files else None,
                   context=f"{inside_top}/context.py" if "context.py" in files else None,
                   memory_mb=limits.memory_mb, cpu_s=limits.cpu_s, max_file_bytes=limits.max_file_bytes,
                   seccomp=seccomp.supported(), drop_to=isolation.NOBODY if drop else None, fds=fds,
                   max_message_bytes=MAX_MESSAGE_BYTES, refused_exit=REFUSED_EXIT, memory_exit=MEMORY_EXIT,
                   error_exit=ERROR_EXIT, **MARKS, **_EVENTS, **extra)
        (top / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": inside_root, "TMPDIR": inside_root, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8"}
        self.tier, self.out, self.err, self.started = tier, [], [], time.perf_counter()
        self.proc = subprocess.Popen(
            prefix + [isolation.python_executable(), "-I", "-S", "-B", f"{inside_top}/child.py",
                      f"{inside_top}/config.json"],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True, pass_fds=tuple(fds.values()))
        self.readers = [threading.Thread(target=_drain, args=(s, limits.max_output_bytes, buf), daemon=True)
                        for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    def wait(self, deadline: float) -> bool:
        """Wait until the child exits or the deadline passes (then kill it); True if it had to be killed."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
            return False
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            return True

    def kill(self) -> None:
        for kill in (os.killpg, os.kill):  # the launcher's group; its children die with it (die-with-parent)
            try:
                kill(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def finish(self) -> tuple[int | None, str, str]:
        """(return code as a signal-aware status, stdout, stderr) once the child has exited."""
        self.kill()
        for t in self.readers:
            t.join(timeout=5)
        rc = self.proc.returncode
        if self.tier != "hook" and rc is not None and rc > 128 and rc - 128 in _SIGNALS:
            rc = -(rc - 128)  # bwrap and the shell report a child killed by signal N as 128 + N
        return rc, b"".join(self.out).decode("utf-8", "replace"), b"".join(self.err).decode("utf-8", "replace")


_SIGNALS = {int(s) for s in signal.valid_signals()}  # real-time ones included
_NAMED = {s.value for s in signal.Signals}


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


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A temporary folder (0711: NOBODY may pass through to the program's files), removed afterwards even when the
    program left a tree too deep for a recursive delete."""
    path = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        try:
            shutil.rmtree(path)
        except (OSError, RecursionError):
            subprocess.run(["rm", "-rf", "--", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)


def _tier(limits: SandboxLimits) -> tuple[str | None, str]:
    """(tier to use, or None with the reason it cannot run)."""
    if limits.isolation == "auto":
        return isolation.best(), ""
    if isolation.available(limits.isolation):
        return limits.isolation, ""
    return None, f"sandbox isolation {limits.isolation!r} is not available on this machine"


def _program_status(rc: int | None, stdout: str, stderr: str, seconds: float, timed_out: bool,
                    limits: SandboxLimits) -> tuple[str, str]:
    """(status, detail) of a program's process from its exit and its marks."""
    refused = _marked(stderr, MARKS["refused_mark"])
    if refused is not None or rc == REFUSED_EXIT:
        return "refused", f"refused: {refused or 'an operation outside the sandbox'}"
    if timed_out:
        return "timeout", f"killed after {limits.timeout_s:g} s wall clock"
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and seconds >= limits.cpu_s):
        return "timeout", f"CPU limit of {limits.cpu_s} s"
    if rc == MEMORY_EXIT or _marked(stderr, MARKS["memory_mark"]) is not None:
        return "memory", f"out of memory (limit {limits.memory_mb} MiB)"
    if rc == ERROR_EXIT and _marked(stderr, MARKS["error_mark"]) is not None:
        return "error", _marked(stderr, MARKS["error_mark"]) or "sandbox error"
    if rc == 0:
        return "passed", ""
    if rc is not None and rc < 0:
        return "failed", f"killed by {signal.Signals(-rc).name if -rc in _NAMED else f'signal {-rc}'}"
    return "failed", _tail(stderr) or f"exit code {rc}"


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in the sandbox ("passed" = exit status 0); never raises for what the
    program does."""
    limits = limits or SandboxLimits()
    limits.validate()
    tier, why = _tier(limits)
    if tier is None:
        return SandboxResult("error", None, "", "", 0.0, why)
    with _scratch() as tmp:
        try:
            child = _Child("program", {"program.py": code}, limits, tier, tmp, {}, {}, stdin)
        except OSError as e:
            return SandboxResult("error", None, "", "", 0.0, f"cannot start the sandbox: {e}", tier)
        timed_out = child.wait(child.started + limits.timeout_s)
        seconds = time.perf_counter() - child.started
        rc, stdout, stderr = child.finish()
    status, detail = _program_status(rc, stdout, stderr, seconds, timed_out, limits)
    return SandboxResult(status, rc, stdout, stderr, seconds, detail, tier)


def run_tests(test: CodeTest, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `test.code` in one sandboxed process and `test.tests` in a judge process that calls its functions;
    "passed" only when the judge ran every test. Never raises for what the program does."""
    limits = limits or SandboxLimits()
    limits.validate()
    tier, why = _tier(limits)
    if tier is None:
        return SandboxResult("error", None, "", "", 0.0, why)
    req_r, req_w = os.pipe()  # judge -> program: calls
    rep_r, rep_w = os.pipe()  # program -> judge: values
    ver_r, ver_w = os.pipe()  # judge -> us: the verdict
    verdict: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(os.fdopen(ver_r, "rb"), 1 << 16, verdict), daemon=True)
    reader.start()
    children: list[_Child] = []
    try:
        with _scratch() as tmp:
            (tmp / "program").mkdir(mode=0o711)
            (tmp / "judge").mkdir(mode=0o700)
            try:
                children.append(_Child("serve", {"program.py": test.code}, limits, tier, tmp / "program",
                                       {"requests": req_r, "replies": rep_w}, {}))
                judge_files = {"tests.py": test.tests} | ({"context.py": test.context} if test.context else {})
                children.append(_Child("judge", judge_files, limits, tier, tmp / "judge",
                                       {"requests": req_w, "replies": rep_r, "verdict": ver_w},
                                       {"entry_point": test.entry_point}))
            except OSError as e:
                return SandboxResult("error", None, "", "", 0.0, f"cannot start the sandbox: {e}", tier)
            finally:
                for fd in (req_r, req_w, rep_r, rep_w, ver_w):
                    os.close(fd)
            program, judge = children
            deadline = program.started + limits.timeout_s
            timed_out = judge.wait(deadline)
            program.wait(deadline if timed_out else min(deadline, time.perf_counter() + 2.0))  # ends at EOF
            seconds = time.perf_counter() - program.started
            rc, stdout, stderr = program.finish()
            _, _, judge_err = judge.finish()
    finally:
        for child in children:
            child.kill()
        reader.join(timeout=5)
    try:
        found = json.loads(b"".join(verdict) or b"null")
    except ValueError:
        found = None
    found = found if isinstance(found, dict) and found.get("status") in ("passed", "failed", "error") else None
    status, detail = _program_status(rc, stdout, stderr, seconds, timed_out, limits)
    if status in ("refused", "timeout", "memory", "error"):
        pass  # the program's own end says more than the judge's (which saw only a closed pipe)
    elif found is None:
        status, detail = "error", "the judge ended without a verdict: " + (_tail(judge_err) or "no output")
    elif found["status"] == "passed":
        status, detail = "passed", ""
    elif status != "failed":  # the program ran: the judge's failing test is the reason
        status, detail = found["status"], _tail(str(found.get("detail", "")), lines=4, chars=600)
    return SandboxResult(status, rc, stdout, stderr, seconds, detail, tier)


def run_many(items: Sequence[str | CodeTest], limits: SandboxLimits | None = None, workers: int = 2,
             stdin: str = "") -> list[SandboxResult]:
    """Run programs (str: `run_python`) or programs with tests (`run_tests`) concurrently; results in order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, found {workers}")

    def one(item):
        return run_tests(item, limits) if isinstance(item, CodeTest) else run_python(item, limits, stdin)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))
