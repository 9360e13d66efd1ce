"""Attacks on the sandbox, each in every isolation tier this machine offers: escapes (files, processes, signals),
resource exhaustion, and forged verdicts. Every attack must end refused, failed, stopped, or harmless."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from lmforge.data.code_problems import code_test, load_problems
from lmforge.sandbox import CodeTest, SandboxLimits, available, run_python, run_tests

TIERS = [t for t in ("bwrap", "unshare", "hook") if available(t)]
NAMESPACED = [t for t in TIERS if t != "hook"]
NOT_PASSED = ("failed", "refused", "timeout", "memory")


def limits(tier: str, **kw) -> SandboxLimits:
    return SandboxLimits(**{"timeout_s": 8.0, "cpu_s": 5, "memory_mb": 256, "isolation": tier, **kw})


@pytest.fixture
def secret(tmp_path):
    """A file outside the sandbox whose content must never reach the program, and a path it must never write."""
    token = f"lmforge-secret-{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(token)
    return str(tmp_path / "secret.txt"), token, str(tmp_path / "escaped.txt")


@pytest.mark.skipif(not os.environ.get("LMFORGE_REQUIRE_NAMESPACES"), reason="set by CI, whose setup installs bwrap")
def test_this_machine_offers_namespaces():
    """CI installs bubblewrap: the structural layer must be exercised there, not skipped."""
    assert "bwrap" in TIERS, "bubblewrap (bwrap) is not usable here: the sandbox runs without OS namespaces"


# ---- the escapes of the issue


@pytest.mark.parametrize("tier", TIERS)
def test_fspath_that_changes_between_calls_reads_and_writes_nothing(tier, secret):
    path, token, target = secret
    code = textwrap.dedent(f"""
        import io
        open('harmless.txt', 'w').write('ok')
        class P:
            def __init__(self, evil, good, n):
                self.evil, self.good, self.n, self.calls = evil, good, n, 0
            def __fspath__(self):
                self.calls += 1
                return self.evil if self.calls == self.n else self.good
        for n in (1, 2, 3):
            try:
                print(io.FileIO(P({path!r}, 'harmless.txt', n)).read())
            except Exception as e:
                print('E', type(e).__name__)
            try:
                io.FileIO(P({target!r}, 'harmless2.txt', n), 'w').write(b'escaped')
            except Exception as e:
                print('E', type(e).__name__)
    """)
    r = run_python(code, limits(tier))
    assert token not in r.stdout and not os.path.exists(target), (r.status, r.stdout)


def _in_subprocess(code: str, tier: str) -> tuple[int, dict]:
    """Run the sandbox from a disposable evaluator process (attacks on the evaluator must not take pytest down)."""
    driver = textwrap.dedent(f"""
        import json, sys
        from lmforge.sandbox import SandboxLimits, run_python
        r = run_python({code!r}, SandboxLimits(timeout_s=8, cpu_s=5, memory_mb=256, isolation={tier!r}))
        print(json.dumps({{"status": r.status, "stdout": r.stdout, "detail": r.detail}}))
    """)
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60)
    lines = done.stdout.strip().splitlines()
    return done.returncode, json.loads(lines[-1]) if lines else {}


@pytest.mark.parametrize("tier", TIERS)
def test_the_evaluator_cannot_be_killed(tier):
    code = textwrap.dedent("""
        import os, signal
        for attempt in (lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9),
                        lambda: os.kill(os.getppid(), 9), lambda: os.killpg(os.getpgid(os.getppid()), 9),
                        lambda: os.kill(-1, 9)):
            try:
                attempt()
            except Exception as e:
                print('E', type(e).__name__)
        print('survived')
    """)
    rc, result = _in_subprocess(code, tier)
    assert rc == 0 and result, "the evaluator process was killed"
    assert result["status"] in ("refused", "passed") and "survived" in result["stdout"]


@pytest.fixture
def sentinel():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("tier", TIERS)
def test_no_other_process_can_be_signalled(tier, sentinel):
    code = textwrap.dedent(f"""
        import os, signal
        pid = {sentinel}
        def sigio():  # the kernel signals the pipe's owner when it becomes readable
            import fcntl
            r, w = os.pipe()
            fcntl.fcntl(r, fcntl.F_SETOWN, pid)
            fcntl.fcntl(r, 10, 9)  # F_SETSIG: SIGKILL
            fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)
            os.write(w, b'x')
        for attempt in (lambda: signal.pidfd_send_signal(os.pidfd_open(pid), 9), lambda: os.kill(pid, 9),
                        lambda: os.killpg(pid, 9), lambda: signal.pthread_kill(pid, 9), sigio):
            try:
                attempt()
            except Exception as e:
                print('E', type(e).__name__)
    """)
    run_python(code, limits(tier))
    time.sleep(0.1)
    os.kill(sentinel, 0)  # still alive (raises ProcessLookupError otherwise)
    assert os.waitpid(sentinel, os.WNOHANG) == (0, 0)


@pytest.mark.parametrize("tier", TIERS)
def test_symlink_race_with_renaming_threads_reads_nothing(tier, secret):
    path, token, _ = secret
    code = textwrap.dedent(f"""
        import os, threading, time
        os.makedirs('a/b/c/d', exist_ok=True)
        stop = False
        def flip():
            while not stop:
                try:
                    os.rename('a', 'x'); os.rename('x', 'a')
                except OSError:
                    pass
        t = threading.Thread(target=flip); t.start()
        end = time.time() + 1.0
        hits = 0
        while time.time() < end:
            for attempt in (lambda: os.symlink('../../../../..{path}', 'a/b/c/d/t'),
                            lambda: os.chdir('a/b/c/d'), lambda: print(open('t').read()),
                            lambda: os.chdir('/'), lambda: print(open('a/b/c/d/../../../../..{path}').read())):
                try:
                    attempt()
                except Exception:
                    pass
        stop = True; t.join()
    """)
    r = run_python(code, limits(tier))
    assert token not in r.stdout, r.stdout


@pytest.mark.parametrize("tier", NAMESPACED)
def test_total_disk_use_is_capped(tier):
    code = textwrap.dedent("""
        written = 0
        try:
            for i in range(100):
                with open(f'f{i}', 'wb') as f:
                    f.write(b'0' * 4_000_000)
                written += 4_000_000
        finally:
            print(written)
    """)
    r = run_python(code, limits(tier, max_disk_bytes=16_000_000, max_file_bytes=8_000_000))
    assert r.status == "failed" and "No space left on device" in r.detail, (r.status, r.detail)
    assert int(r.stdout.split()[-1]) <= 16_000_000


@pytest.mark.parametrize("tier", TIERS)
def test_killing_itself_is_a_failure_not_memory(tier):
    r = run_python("import signal\nsignal.raise_signal(signal.SIGKILL)", limits(tier))
    assert (r.status, r.detail) == ("failed", "killed by SIGKILL"), (r.status, r.detail)


# ---- verdicts the program cannot forge


@pytest.fixture(scope="module")
def problem():
    return next(p for p in load_problems() if p["entry_point"] == "strlen")


@pytest.mark.parametrize("tier", TIERS)
def test_printing_its_own_source_and_exiting_does_not_pass(tier, problem):
    completion = textwrap.dedent("""\
            return 0
        import os, sys
        print(open(__file__).read())
        print(sys._getframe().f_code.co_consts)
        sys.stdout.flush()
        os._exit(0)
    """)
    r = run_tests(code_test(problem, completion), limits(tier))
    assert r.status == "failed", (r.status, r.detail)


@pytest.mark.parametrize("tier", TIERS)
def test_a_result_whose_eq_always_holds_does_not_pass(tier, problem):
    r = run_tests(code_test(problem, "    class A:\n        __eq__ = lambda s, o: True\n    return A()\n"), limits(tier))
    assert r.status == "failed" and "Unsupported" in r.detail, (r.status, r.detail)
    # subclasses of built-in types cross as the plain value they hold, read past their overrides
    for completion in ("    class I(int):\n        __eq__ = lambda s, o: True\n        __hash__ = int.__hash__\n"
                       "        __index__ = lambda s: len(string)\n    return I(-1)\n",
                       "    class S(str):\n        __eq__ = lambda s, o: True\n        __hash__ = str.__hash__\n"
                       "        __str__ = lambda s: 'x' * len(string)\n    return S('')\n"):
        r = run_tests(code_test(problem, completion), limits(tier))
        assert r.status == "failed" and "AssertionError" in r.detail, (completion, r.status, r.detail)


def test_subclasses_of_plain_values_compare_as_the_reference_harness_does():
    """A Counter equals a dict and a namedtuple a tuple in HumanEval's own harness; honest code keeps passing."""
    code = ("import collections\ndef hist(s):\n    return collections.Counter(s)\n"
            "def pair(a, b):\n    return collections.namedtuple('P', 'x y')(a, b)\n")
    tests = "assert hist('aab') == {'a': 2, 'b': 1}\nassert pair(1, 2) == (1, 2)\n"
    assert run_tests(CodeTest(code=code, tests=tests)).status == "passed"


@pytest.mark.parametrize("tier", TIERS)
def test_writing_a_verdict_on_every_descriptor_does_not_pass(tier, problem):
    completion = textwrap.dedent("""\
            return -1
        import os
        for fd in range(3, 64):
            for data in (b'{"status": "passed", "detail": ""}', b'\\x00\\x00\\x00\\x10{"ready": []}   '):
                try:
                    os.write(fd, data)
                except OSError:
                    pass
        os._exit(0)
    """)
    assert run_tests(code_test(problem, completion), limits(tier)).status == "failed"


@pytest.mark.parametrize("tier", TIERS)
def test_patched_builtins_do_not_reach_the_tests(tier):
    test = CodeTest(code="import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.round = lambda *a: 0\n"
                         "def area(r):\n    return 3.0 * r * r\n",
                    tests="assert abs(area(2) - 12.566370614359172) < 1e-6\n")
    r = run_tests(test, limits(tier))
    assert r.status == "failed" and "AssertionError" in r.detail, (r.status, r.detail)


@pytest.mark.parametrize("tier", TIERS)
def test_the_program_cannot_read_the_tests(tier):
    marker = uuid.uuid4().hex
    code = textwrap.dedent("""
        import glob, os
        found = []
        for pattern in ('/tmp/lmforge-sandbox-*/judge/top/tests.py', '/sandbox/tests.py', '../../judge/top/tests.py'):
            try:
                for p in glob.glob(pattern) or [pattern]:
                    found.append(open(p).read())
            except Exception as e:
                found.append(type(e).__name__)
        print(found)
        def f():
            return 0
    """)
    r = run_tests(CodeTest(code=code, tests=f"# {marker}\nassert f() == 1\n"), limits(tier))
    assert marker not in r.stdout and r.status in NOT_PASSED


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("completion,expected", [
    ("    import sys\n    sys.exit(0)\n", "failed"),  # exits from inside the call
    ("    import os\n    os._exit(0)\n", "failed"),
    ("    return iter([len(string)])\n", "failed"),  # not plain data
    ("    x = []\n    x.append(x)\n    return x\n", "failed"),  # a cycle
    ("    return 'x' * 50_000_000\n", "failed"),  # larger than a message may be
    ("    return strlen(string)\n", "failed"),  # infinite recursion
    ("    import time\n    time.sleep(100)\n", "timeout"),
    ("    import signal\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    while True:\n        pass\n", "timeout"),
    ("    x = []\n    while True:\n        x.append(bytearray(10**6))\n", "memory"),
    ("    import threading\n    ts = [threading.Thread(target=__import__('time').sleep, args=(5,)) for _ in "
     "range(100_000)]\n    [t.start() for t in ts]\n", NOT_PASSED),  # a thread bomb
])
def test_misbehaving_completions_end_as_expected(tier, problem, completion, expected):
    r = run_tests(code_test(problem, completion), limits(tier, timeout_s=4.0, cpu_s=3))
    assert r.status in ((expected,) if isinstance(expected, str) else expected), (r.status, r.detail)
    assert r.seconds < 10


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("code", [
    "open('/proc/self/mem', 'r+b')",  # rewriting the interpreter's memory would disarm the hook
    "open('/dev/tty', 'w')",
    "import os\nos.symlink('x', 'y')",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import importlib\nc = importlib.import_module('ctypes')\nc.CDLL(None).kill(1, 9)",  # import_module skips the
    # import event, but ctypes cannot be used
    "import sys\nsys.addaudithook(lambda *a: None)",
    "import readline\nreadline.read_history_file('/etc/hostname')",  # C modules that open files unaudited
    "import sqlite3\nsqlite3.connect('/tmp/lmforge-escape.db')",
    "import _posixshmem\n_posixshmem.shm_open('/lmforge-escape', 0o102)",
    "import spwd\nspwd.getspnam('root')",
])
def test_more_escapes_are_refused(tier, code):
    r = run_python(code, limits(tier))
    assert r.status == "refused", (r.status, r.detail)


# ---- each layer on its own


def test_seccomp_filter_alone_denies_processes_signals_and_sockets():
    from lmforge.sandbox import seccomp

    if not seccomp.supported():
        pytest.skip("no seccomp filter for this machine")
    here = os.path.dirname(seccomp.__file__)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {here!r})
        import os, signal, socket, threading, seccomp
        seccomp.install()
        t = threading.Thread(target=lambda: None); t.start(); t.join()  # threads still work
        os.kill(os.getpid(), 0)
        out = []
        for name, f in [('fork', os.fork), ('kill', lambda: os.kill(os.getppid(), 0)),
                        ('pidfd', lambda: os.pidfd_open(os.getppid())), ('socket', socket.socket),
                        ('exec', lambda: os.execv('/bin/true', ['true']))]:
            try:
                f(); out.append(name + ' allowed')
            except OSError as e:
                out.append(name + ' ' + str(e.errno))
        print(out)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == str(["fork 1", "kill 1", "pidfd 1", "socket 1", "exec 1"]), done.stderr


@pytest.mark.parametrize("tier", NAMESPACED)
def test_namespaces_alone_hide_the_host(tier, tmp_path, secret):
    """The structural layer without the audit hook: no network, no host processes, and (bwrap) no host files."""
    import socket

    from lmforge.sandbox import isolation

    path, token, target = secret
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    top, root = tmp_path / "top", tmp_path / "work"
    top.mkdir()
    root.mkdir()
    code = textwrap.dedent(f"""
        import os, socket
        out = {{}}
        try:
            socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2); out['net'] = 'connected'
        except OSError as e:
            out['net'] = 'refused'
        try:
            os.kill({os.getpid()}, 0); out['host pid'] = 'visible'
        except ProcessLookupError:
            out['host pid'] = 'not found'
        out['pid'] = os.getpid()
        try:
            out['secret'] = open({path!r}).read()
        except OSError:
            out['secret'] = None
        print(out)
    """)
    argv, _, _ = isolation.command(tier, top, root, 1 << 20)
    done = subprocess.run(argv + [isolation.python_executable(), "-I", "-S", "-c", code], capture_output=True,
                          text=True, timeout=30, cwd=root)
    server.close()
    out = ast.literal_eval(done.stdout)  # the dict the child printed
    assert out["net"] == "refused" and out["host pid"] == "not found" and out["pid"] < 10, (out, done.stderr)
    if tier == "bwrap":
        assert out["secret"] is None


def test_an_unavailable_tier_is_an_error_not_a_silent_downgrade(monkeypatch):
    from lmforge.sandbox import isolation

    monkeypatch.setattr(isolation, "available", lambda tier: tier == "hook")
    r = run_python("print(1)", SandboxLimits(isolation="bwrap"))
    assert r.status == "error" and "not available" in r.detail
    r = run_python("print(1)", SandboxLimits(isolation="hook"))
    assert (r.status, r.isolation) == ("passed", "hook")


def test_results_say_which_isolation_ran():
    r = run_python("print(1)")
    assert r.isolation == TIERS[0]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="needs root and a system "
                    "Python that nobody can read")
@pytest.mark.parametrize("tier", [t for t in NAMESPACED + ["hook"] if t != "bwrap"])
def test_as_root_the_program_runs_as_nobody_where_it_can(tier, monkeypatch):
    """With an interpreter every user can read, the program drops to nobody (the judge stays ours): the host's
    files are then guarded by their permissions too, not by the audit hook alone."""
    from lmforge.sandbox import isolation

    monkeypatch.setattr(isolation, "python_executable", lambda: os.path.realpath("/usr/bin/python3"))
    monkeypatch.setattr(isolation, "drops_privileges", lambda: True)
    r = run_python("import os\nopen('x', 'w').write('1')\nprint(os.getuid(), os.getgid(), open('x').read())",
                   limits(tier))
    assert (r.status, r.stdout) == ("passed", "65534 65534 1\n"), (r.status, r.detail)
    test = CodeTest(code="import os\ndef uid():\n    return os.getuid()\n",
                    tests="import os\nassert uid() == 65534 and os.getuid() == 0\n")
    assert run_tests(test, limits(tier)).status == "passed"


# ---- found by a red-team review


@pytest.mark.parametrize("tier", TIERS)
def test_a_program_shadowing_builtins_the_tests_use_does_not_pass(tier):
    problem = {p["task_id"]: p for p in load_problems()}["HumanEval/2"]  # truncate_number; check() calls abs()
    assert run_tests(code_test(problem, "    return number % 1.0\n"), limits(tier)).status == "passed"
    r = run_tests(code_test(problem, "    return 0.5\n\ndef abs(x):\n    return 0\n"), limits(tier))
    assert r.status == "failed", (r.status, r.detail)
    mbpp = CodeTest("def f(x):\n    return 42\ndef sorted(x):\n    return 1\ndef len(x):\n    return 3\n",
                    "assert sorted(f([3, 1, 2])) == sorted([1, 2, 3])\nassert len(f('abc')) == 3\n", entry_point="f")
    assert run_tests(mbpp, limits(tier)).status == "failed"


@pytest.mark.parametrize("tier", TIERS)
def test_a_path_object_lying_about_its_class_reads_and_writes_nothing(tier, secret):
    path, token, target = secret
    code = textwrap.dedent(f"""
        import io
        open('harmless', 'w').write('ok')
        class P:
            __class__ = property(lambda self: str)
            def __init__(self, evil):
                self.evil, self.calls = evil, 0
            def __fspath__(self):
                self.calls += 1
                return self.evil if self.calls == 1 else 'harmless'
        for attempt in (lambda: print(io.FileIO(P({path!r})).read()),
                        lambda: io.FileIO(P({target!r}), 'w').write(b'escaped'),
                        lambda: io.FileIO(P('/proc/self/mem'), 'r+')):
            try:
                attempt()
            except Exception as e:
                print('E', type(e).__name__)
    """)
    r = run_python(code, limits(tier))
    assert token not in r.stdout and not os.path.exists(target) and r.status == "refused", (r.status, r.stdout)


@pytest.mark.parametrize("tier", TIERS)
def test_the_program_cannot_rewrite_the_judges_tests(tier, problem):
    completion = textwrap.dedent("""\
            return -1

        import glob, io, os
        for p in glob.glob('/tmp/lmforge-sandbox-*/judge/top/*.py') + [__file__.rsplit('/', 3)[0] + '/judge/top/tests.py']:
            for attempt in (lambda: open(p, 'w').write('pass\\n'), lambda: io.FileIO(p, 'w').write(b'pass\\n')):
                try:
                    attempt()
                except Exception:
                    pass
    """)
    assert run_tests(code_test(problem, completion), limits(tier)).status in NOT_PASSED


@pytest.mark.parametrize("tier", TIERS)
def test_odd_signals_and_deep_trees_do_not_break_the_evaluator(tier):
    r = run_python("import signal\nsignal.raise_signal(40)", limits(tier))  # a real-time signal: no Signals name
    assert r.status == "failed" and "40" in r.detail, (r.status, r.detail)
    before = set(os.listdir("/tmp"))
    code = ("import os\nfd = os.open('.', os.O_RDONLY)\nfor i in range(1200):\n    os.mkdir('d', dir_fd=fd)\n"
            "    fd = os.open('d', os.O_RDONLY, dir_fd=fd)\n")
    r = run_python(code, limits(tier))
    assert r.status in ("passed", "failed", "refused")
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("lmforge-sandbox-")}
