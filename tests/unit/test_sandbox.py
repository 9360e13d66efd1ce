"""The code sandbox: outcomes are told apart, limits hold, and escapes (files, processes, sockets) are refused."""

from __future__ import annotations

import os
import uuid

import pytest

from lmforge.sandbox import SandboxLimits, run_many, run_python

FAST = SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=256)


def test_passed_and_stdout_captured():
    r = run_python("import math, re, hashlib, random, typing, collections\nprint('hello', math.factorial(5))", FAST)
    assert (r.status, r.returncode, r.stdout) == ("passed", 0, "hello 120\n")
    assert r.seconds > 0


def test_assertion_fails_with_traceback_tail():
    r = run_python("def f():\n    return 1\nassert f() == 2, 'wrong answer'\n", FAST)
    assert r.status == "failed" and r.returncode == 1
    assert "AssertionError: wrong answer" in r.detail and "Traceback" in r.stderr


@pytest.mark.parametrize("code", ["raise ValueError('x')", "def (", "import sys; sys.exit(3)"])
def test_errors_fail(code):
    assert run_python(code, FAST).status == "failed"


def test_stdin_is_given_to_the_program():
    assert run_python("print(input()[::-1])", FAST, stdin="abc\n").stdout == "cba\n"


def test_infinite_loop_times_out_within_the_wall_limit():
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=1.5, cpu_s=10, memory_mb=256))
    assert r.status == "timeout"
    assert 1.4 < r.seconds < 4.0


def test_cpu_limit_is_a_timeout():
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=20, cpu_s=1, memory_mb=256))
    assert r.status == "timeout" and r.seconds < 10


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))\n"])
def test_memory_bomb_is_stopped(code):
    r = run_python(code, FAST)
    assert r.status == "memory", (r.status, r.detail, r.stderr[-300:])


def test_writing_outside_the_temporary_directory_is_refused():
    target = f"/tmp/lmforge_sandbox_escape_{uuid.uuid4().hex}"
    r = run_python(f"open({target!r}, 'w').write('escaped')", FAST)
    assert r.status == "refused" and target in r.detail
    assert not os.path.exists(target)


def test_a_caught_refusal_is_still_refused():
    target = f"/tmp/lmforge_sandbox_escape_{uuid.uuid4().hex}"
    r = run_python(f"try:\n    open({target!r}, 'w')\nexcept OSError:\n    pass\nprint('done')", FAST)
    assert r.status == "refused" and r.stdout == "done\n" and not os.path.exists(target)


def test_symlink_out_of_the_directory_is_refused():
    r = run_python("import os\nos.symlink('/etc', 'etc')\nopen('etc/lmforge_x', 'w')", FAST)
    assert r.status == "refused"


def test_files_inside_the_temporary_directory_work():
    code = ("import os, tempfile, shutil\nopen('a.txt', 'w').write('data')\nos.mkdir('d')\n"
            "os.rename('a.txt', 'd/b.txt')\nprint(open('d/b.txt').read(), os.listdir('d'))\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\nshutil.rmtree('d')\n")
    r = run_python(code, FAST)
    assert (r.status, r.stdout) == ("passed", "data ['b.txt']\n"), r.stderr


def test_reading_outside_the_python_installation_is_refused():
    assert run_python("open('/etc/passwd').read()", FAST).status == "refused"
    assert run_python("import os\nos.listdir('/')", FAST).status == "refused"


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['echo', 'hi'])",
    "import os\nos.system('echo hi')",
    "import os\nos.execv('/bin/echo', ['echo', 'hi'])",
    "import os\nos.fork()",
    "import os\nos.kill(os.getppid(), 9)",
    "import socket\nsocket.create_connection(('127.0.0.1', 80))",
    "import socket\nsocket.socket()",
    "import ctypes",
    "import os\nos.remove('/tmp/lmforge-not-there')",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "import sys\nsys.settrace(lambda *a: None)",
])
def test_escapes_are_refused(code):
    r = run_python(code, FAST)
    assert r.status == "refused", (r.status, r.detail)
    assert "hi" not in r.stdout


def test_patching_modules_does_not_weaken_the_hook():
    target = f"/tmp/lmforge_sandbox_escape_{uuid.uuid4().hex}"
    code = ("import os, os.path, builtins\nos.path.realpath = lambda p: os.getcwd() + '/x'\n"
            "builtins.any = lambda *a: True\nbuiltins.isinstance = lambda *a: False\n"
            f"open({target!r}, 'w').write('escaped')\n")
    assert run_python(code, FAST).status == "refused"
    assert not os.path.exists(target)


def test_environment_is_minimal():
    os.environ["LMFORGE_SANDBOX_SECRET"] = "s3cret"
    try:
        r = run_python("import os\nprint(sorted(os.environ))", FAST)
    finally:
        del os.environ["LMFORGE_SANDBOX_SECRET"]
    assert r.status == "passed" and "LMFORGE_SANDBOX_SECRET" not in r.stdout


def test_output_is_truncated():
    r = run_python("print('x' * 100_000)\nimport sys\nsys.stderr.write('y' * 100_000)",
                   SandboxLimits(max_output_bytes=1000, memory_mb=256))
    assert r.status == "passed" and r.stdout == "x" * 1000 and r.stderr == "y" * 1000


def test_file_size_limit():
    r = run_python("open('big', 'wb').write(b'0' * 2_000_000)", SandboxLimits(max_file_bytes=1_000_000, memory_mb=256))
    assert r.status == "failed" and "File too large" in r.detail


def test_run_many_keeps_order():
    rs = run_many([f"print({i})" if i % 2 else f"assert {i} < 0" for i in range(6)], FAST, workers=2)
    assert [r.status for r in rs] == ["failed", "passed"] * 3
    assert [r.stdout for r in rs[1::2]] == ["1\n", "3\n", "5\n"]


def test_bad_limits():
    with pytest.raises(ValueError):
        run_python("pass", SandboxLimits(timeout_s=0))
