"""The sandboxed interpreter's first code: limits, seccomp, the audit hook, then one role.

Run as `python -I -S -B child.py CONFIG.json` from a folder holding this file, `seccomp.py` and `wire.py` (the
parent copies them there; nothing of lmforge is importable in the child). Roles:
- program: run the untrusted program; its exit status is the result.
- serve: run the untrusted program, then answer the judge's calls of its functions with plain values (wire.py),
  until the judge closes the pipe.
- judge: run the trusted context (e.g. the HumanEval prompt, for its helper functions) and tests, with the
  program's functions bound to calls into the serving process; write the verdict on a pipe only the judge holds.

Standard library only, and no lmforge imports.
"""

import sys


def _limits(cfg, write, exit_):
    import resource

    try:
        mb = cfg["memory_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mb, mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["max_file_bytes"], cfg["max_file_bytes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
    except (ValueError, OSError) as e:
        write(2, ("\n%s cannot set resource limits: %s\n" % (cfg["error_mark"], e)).encode())
        exit_(cfg["error_exit"])
    if cfg["seccomp"]:
        import ctypes  # noqa: F401  (seccomp.install needs it; loaded while the installation is still readable)
    if cfg.get("drop_to") is not None:  # before seccomp, which forbids changing ids
        import os

        try:
            os.setgroups([])
            os.setgid(cfg["drop_to"])
            os.setuid(cfg["drop_to"])
        except OSError as e:
            write(2, ("\n%s cannot drop privileges: %s\n" % (cfg["error_mark"], e)).encode())
            exit_(cfg["error_exit"])
    if cfg["seccomp"]:
        import seccomp  # already loaded by main()

        try:
            seccomp.install()
        except OSError as e:
            write(2, ("\n%s cannot load the seccomp filter: %s\n" % (cfg["error_mark"], e)).encode())
            exit_(cfg["error_exit"])
    for name in ("seccomp", "ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)


def _hook(cfg):
    """The audit hook (PEP 578). It refers only to immutable values and built-in functions bound as defaults, so
    nothing the program can reach (frames, modules, builtins) changes what it allows. It refuses path objects other
    than exact str, bytes and os.DirEntry (the hook cannot see which path their `__fspath__` gave the C code, and
    `isinstance` believes a lying `__class__`), '..' components, and changing directory, so that a path resolves
    the same in the hook and in the kernel whatever other threads do meanwhile."""
    import os.path
    import posix
    import _stat

    roots = (os.path.realpath(cfg["root"]),)
    readable = tuple(os.path.realpath(p) for p in list(sys.path) + [sys.prefix, sys.base_prefix] + cfg["readable"]
                     if p) + roots
    refused_events = set(cfg["refused_events"]) | {"os.chdir"}

    def hook(event, args, lstat=posix.lstat, readlink=posix.readlink, getcwd=posix.getcwd, fspath=posix.fspath,
             S_ISLNK=_stat.S_ISLNK, S_ISDIR=_stat.S_ISDIR, write=posix.write, type=type, str=str, bytes=bytes,
             int=int, len=len, any=any, tuple=tuple, hasattr=hasattr, BaseException=BaseException,
             PermissionError=PermissionError, roots=roots, readable=readable, exact=(str, bytes, posix.DirEntry),
             devices=("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"),
             refused_events=frozenset(refused_events), refused_prefixes=tuple(cfg["refused_prefixes"]),
             refused_imports=frozenset(cfg["refused_imports"]), write_events=frozenset(cfg["write_events"]),
             read_events=frozenset(cfg["read_events"]), mark=cfg["refused_mark"],
             write_flags=posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND):
        checks, reason = [], None  # (path, allowed roots, opening), or a reason to refuse outright
        try:
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                if path is not None and type(path) is not int:
                    writing = (type(mode) is str and any(c in mode for c in "wax+")) or \
                        (type(flags) is int and flags & write_flags)
                    checks.append((path, roots if writing else readable, True))
            elif event in refused_events or event.startswith(refused_prefixes):
                reason = event
            elif event == "import":
                if args[0] in refused_imports:
                    reason = "import " + args[0]
            elif event in write_events or event in read_events:
                allowed = roots if event in write_events else readable
                for a in args:
                    if a is not None and type(a) is not int and (type(a) in exact or hasattr(a, "__fspath__")):
                        checks.append((a, allowed, False))
            for path, allowed, is_open in checks:
                if type(path) not in exact:
                    reason = "%s with a path object of type %s (use str paths)" % (event, type(path).__name__)
                    break
                path = fspath(path)
                path = path.decode("utf-8", "surrogateescape") if type(path) is bytes else path
                if not path.startswith("/"):
                    path = getcwd() + "/" + path
                todo, done, hops = path.split("/"), [], 0
                if ".." in todo:
                    reason = "%s of a path with '..' (%s)" % (event, path)
                    break
                while todo:  # os.path.realpath, inlined: '.', '..' and symbolic links resolved
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
                if reason is not None:
                    break
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

    return hook


def _exec(path, namespace, cfg):
    """Run one source file in `namespace`; exits the process (with a traceback on stderr) if it fails."""
    import posix
    import traceback

    write, exit_ = posix.write, posix._exit
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, namespace)
    except SystemExit:
        raise
    except MemoryError:
        write(2, ("\n%s MemoryError\n" % cfg["memory_mark"]).encode())
        exit_(cfg["memory_exit"])
    except BaseException as e:
        refused = isinstance(e, PermissionError) and str(e).startswith("sandbox refused")
        try:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        except MemoryError:
            write(2, ("\n%s MemoryError\n" % cfg["memory_mark"]).encode())
            exit_(cfg["memory_exit"])
        except BaseException:
            pass
        exit_(cfg["refused_exit"] if refused else 1)


def _serve(namespace, cfg):
    """Answer the judge's calls of the program's functions until it closes the pipe."""
    import posix
    import wire

    requests, replies, cap = cfg["fds"]["requests"], cfg["fds"]["replies"], cfg["max_message_bytes"]
    names = sorted(k for k, v in namespace.items()
                   if not k.startswith("__") and callable(v) and not isinstance(v, type))
    wire.send(replies, {"ready": names})
    while True:
        try:
            msg = wire.receive(requests, cap)
        except wire.Unsupported:
            break
        if msg is None:
            break
        try:
            value = wire.decode(msg["args"])
            args, kwargs = value if type(value) is tuple and len(value) == 2 else ((), {})
            result = namespace[msg["call"]](*args, **kwargs)
            reply = {"id": msg["id"], "value": wire.encode(result)}
        except MemoryError:
            posix.write(2, ("\n%s MemoryError\n" % cfg["memory_mark"]).encode())
            posix._exit(cfg["memory_exit"])
        except BaseException as e:  # the call raised (or returned something that cannot cross)
            if isinstance(e, PermissionError) and str(e).startswith("sandbox refused"):
                posix._exit(cfg["refused_exit"])
            try:
                text = str(e)[:2000]
            except BaseException:
                text = ""
            kind = "Unsupported" if isinstance(e, wire.Unsupported) else type(e).__name__
            reply = {"id": msg.get("id"), "raised": str(kind)[:100], "message": text}
        try:
            wire.send(replies, reply)
        except (OSError, ValueError):
            break
    sys.stdout.flush()
    posix._exit(0)


def _names(code):
    """Every name a code object (and the functions and classes inside it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if type(const) is type(code):
            names |= _names(const)
    return names


def _judge(cfg):
    """Run the trusted context and tests against the serving program; the verdict goes to the verdict pipe."""
    import builtins
    import json
    import posix
    import traceback
    import wire

    requests, replies, verdict = cfg["fds"]["requests"], cfg["fds"]["replies"], cfg["fds"]["verdict"]
    cap, entry = cfg["max_message_bytes"], cfg["entry_point"]

    def report(status, detail=""):
        posix.write(verdict, json.dumps({"status": status, "detail": detail[-2000:]}).encode())
        sys.stdout.flush()
        posix._exit(0)

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    if cfg["context"]:
        try:
            exec(compile(open(cfg["context"], encoding="utf-8").read(), "context.py", "exec"), namespace)
        except BaseException:
            report("error", "the trusted context failed: " + traceback.format_exc(limit=2))
    try:
        ready = wire.receive(replies, cap)
    except wire.Unsupported as e:
        report("failed", "the program sent a malformed message: %s" % e)
    if ready is None or not isinstance(ready.get("ready"), list):
        report("failed", "the program ended before the tests ran")
    counter = [0]

    def bind(name):
        def call(*args, **kwargs):
            counter[0] += 1
            wire.send(requests, {"id": counter[0], "call": name, "args": wire.encode((args, kwargs))})
            reply = wire.receive(replies, cap)
            if reply is None:
                raise RuntimeError("the program's process ended during a call of %s" % name)
            if reply.get("id") != counter[0]:
                raise RuntimeError("the program answered out of turn")
            if reply.get("raised") == "Unsupported":
                raise wire.Unsupported("the program's %s returned %s" % (name, reply.get("message", "")))
            if "raised" in reply:
                kind = getattr(builtins, str(reply["raised"]), None)
                if not (isinstance(kind, type) and issubclass(kind, Exception)) or issubclass(kind, OSError):
                    kind = RuntimeError
                raise kind(str(reply.get("message", "")))
            return wire.decode(reply["value"])

        call.__name__ = call.__qualname__ = name
        return call

    try:
        tests = compile(open(cfg["tests"], encoding="utf-8").read(), "tests.py", "exec")
    except BaseException:
        report("error", "the tests do not compile: " + traceback.format_exc(limit=0))
    exported = set(str(n) for n in ready["ready"])
    # the program answers for the entry point and for the names the tests use that nothing trusted defines: never
    # for a context definition or a built-in (a program's `def abs` or `def range` must not reach the tests)
    for name in exported & _names(tests):
        if name == entry or (name not in namespace and name not in vars(builtins)):
            namespace[name] = bind(name)
    if entry:
        if entry not in exported:
            report("failed", "the program does not define %s" % entry)
        namespace[entry] = bind(entry)
    try:
        exec(tests, namespace)
        if entry and callable(namespace.get("check")):
            namespace["check"](namespace[entry])
    except wire.Unsupported as e:
        report("failed", "Unsupported: %s" % e)
    except BaseException as e:
        report("failed", "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next)))
    report("passed")


def main():
    import builtins
    import json
    import os
    import posix

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # wire.py and seccomp.py lie beside this file
    import seccomp  # noqa: F401
    import wire  # noqa: F401
    del sys.path[0]
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg = json.load(f)
    sys.stdin = open(cfg["stdin"], encoding="utf-8") if cfg.get("stdin") else sys.stdin
    _limits(cfg, posix.write, posix._exit)
    posix.chdir(cfg["root"])
    sys.addaudithook(_hook(cfg))
    sys.argv = [cfg.get("program") or "tests.py"]
    if cfg["role"] == "judge":
        _judge(cfg)
    namespace = {"__name__": "__main__", "__file__": cfg["program"], "__builtins__": builtins}
    _exec(cfg["program"], namespace, cfg)
    if cfg["role"] == "serve":
        _serve(namespace, cfg)


main()
