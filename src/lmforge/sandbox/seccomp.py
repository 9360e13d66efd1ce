"""A seccomp-BPF filter for sandboxed programs: the kernel refuses the system calls that reach outside the process.

Denied (EPERM): new processes (fork, vfork, execve, clone without CLONE_THREAD or with namespace flags; clone3 gets
ENOSYS so the C library falls back to clone and threads still work), signals to any process but this one (kill,
tgkill and rt_sigqueueinfo only for our own pid; tkill and pidfd_* never), tracing and other processes' memory
(ptrace, process_vm_*, kcmp), namespaces and mounts, sockets, raising resource limits or changing ids, TIOCSTI,
choosing who gets SIGIO (fcntl F_SETOWN / F_SETSIG / F_SETOWN_EX, FIOSETOWN, SIOCSPGRP), and kernel interfaces a
program has no use for (bpf, perf_event_open, io_uring, keyrings, modules, clocks, ...).
A call from another architecture's ABI (x32 on x86_64, or a foreign audit arch) kills the process.

This file is self-contained (standard library only): the sandbox child imports it from its own folder before the
program runs, and the parent imports it to tell whether the filter is supported here.
"""

import os
import platform
import struct

__all__ = ["supported", "build", "install"]

# system call numbers per machine (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h)
_ARCHES = {
    "x86_64": (0xC000003E, dict(
        fork=57, vfork=58, execve=59, execveat=322, clone=56, clone3=435, kill=62, tkill=200, tgkill=234,
        rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
        ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312, process_madvise=440, unshare=272,
        setns=308, mount=165, umount2=166, pivot_root=155, chroot=161, move_mount=429, open_tree=428, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, socket=41, bpf=321, perf_event_open=298,
        keyctl=250, add_key=248, request_key=249, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, personality=135, kexec_load=246, kexec_file_load=320, init_module=175,
        finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163, settimeofday=164,
        clock_settime=227, clock_adjtime=305, adjtimex=159, sethostname=170, setdomainname=171, iopl=172, ioperm=173,
        open_by_handle_at=304, name_to_handle_at=303, quotactl=179, syslog=103, vhangup=153, mbind=237,
        migrate_pages=256, move_pages=279, setrlimit=160, prlimit64=302, setuid=105, setgid=106, setreuid=113,
        setregid=114, setresuid=117, setresgid=119, setfsuid=122, setfsgid=123, setgroups=116, capset=126,
        ioctl=16, fcntl=72)),
    "aarch64": (0xC00000B7, dict(
        execve=221, execveat=281, clone=220, clone3=435, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138,
        rt_tgsigqueueinfo=240, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, ptrace=117,
        process_vm_readv=270, process_vm_writev=271, kcmp=272, process_madvise=440, unshare=97, setns=268,
        mount=40, umount2=39, pivot_root=41, chroot=51, move_mount=429, open_tree=428, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, mount_setattr=442, socket=198, bpf=280, perf_event_open=241, keyctl=219,
        add_key=217, request_key=218, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, personality=92, kexec_load=104, kexec_file_load=294, init_module=105,
        finit_module=273, delete_module=106, reboot=142, swapon=224, swapoff=225, acct=89, settimeofday=170,
        clock_settime=112, clock_adjtime=266, adjtimex=171, sethostname=161, setdomainname=162,
        open_by_handle_at=265, name_to_handle_at=264, quotactl=60, syslog=116, vhangup=58, mbind=235,
        migrate_pages=238, move_pages=239, setrlimit=164, prlimit64=261, setuid=146, setgid=144, setreuid=145,
        setregid=143, setresuid=147, setresgid=149, setfsuid=151, setfsgid=152, setgroups=159, capset=91,
        ioctl=29, fcntl=25)),
}
_DENIED = ("fork", "vfork", "execve", "execveat", "tkill", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
           "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "process_madvise", "unshare", "setns", "mount",
           "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
           "mount_setattr", "socket", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
           "io_uring_setup", "io_uring_enter", "io_uring_register", "personality", "kexec_load", "kexec_file_load",
           "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "settimeofday",
           "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl", "ioperm",
           "open_by_handle_at", "name_to_handle_at", "quotactl", "syslog", "vhangup", "mbind", "migrate_pages",
           "move_pages", "setrlimit", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
           "setfsuid", "setfsgid", "setgroups", "capset")
_SELF_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")  # first argument: our pid (kill: or 0)

# classic BPF opcodes and seccomp return values
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_KILL, _ALLOW, _ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 \
    | 0x00000080  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_IOCTL_DENIED = (0x5412, 0x8901, 0x8902)  # TIOCSTI; FIOSETOWN, SIOCSPGRP (choose who gets SIGIO)
_FCNTL_DENIED = (8, 10, 15)  # F_SETOWN, F_SETSIG, F_SETOWN_EX: a signal of our choice to any process on I/O
_X32_BIT = 0x40000000


def supported() -> bool:
    """Whether this machine's architecture has a filter here (Linux on x86_64 or aarch64)."""
    return platform.system() == "Linux" and platform.machine() in _ARCHES


def _arg_lo(i: int) -> int:
    return 16 + 8 * i  # offset of the low 32 bits of argument i in struct seccomp_data (little-endian)


def build(pid: int) -> bytes:
    """The filter program (struct sock_filter[]) for a process whose pid is `pid`."""
    arch, nr = _ARCHES[platform.machine()]
    code: list[tuple] = []  # (opcode, jump-if-true label, jump-if-false label, k); labels resolve to offsets

    def emit(op, k, jt=None, jf=None):
        code.append((op, jt, jf, k))

    emit(_LD_ABS, 4)  # seccomp_data.arch
    emit(_JEQ, arch, None, "kill")
    emit(_LD_ABS, 0)  # seccomp_data.nr
    if platform.machine() == "x86_64":
        emit(_JGE, _X32_BIT, "kill", None)
    for name in _DENIED:
        if name in nr:
            emit(_JEQ, nr[name], "eperm", None)
    emit(_JEQ, nr["clone3"], "enosys", None)
    emit(_JEQ, nr["clone"], "clone", None)
    emit(_JEQ, nr["ioctl"], "ioctl", None)
    emit(_JEQ, nr["fcntl"], "fcntl", None)
    emit(_JEQ, nr["prlimit64"], "prlimit", None)
    for name in _SELF_ONLY:
        emit(_JEQ, nr[name], "self_only", None)
    emit(_RET, _ALLOW)
    code.append("clone")
    emit(_LD_ABS, _arg_lo(0))  # flags
    emit(_JSET, _CLONE_NAMESPACES, "eperm", None)
    emit(_JSET, _CLONE_THREAD, "allow", "eperm")
    code.append("ioctl")
    emit(_LD_ABS, _arg_lo(1))  # request
    for request in _IOCTL_DENIED:
        emit(_JEQ, request, "eperm", None)
    emit(_RET, _ALLOW)
    code.append("fcntl")
    emit(_LD_ABS, _arg_lo(1))  # command
    for command in _FCNTL_DENIED:
        emit(_JEQ, command, "eperm", None)
    emit(_RET, _ALLOW)
    code.append("prlimit")
    emit(_LD_ABS, _arg_lo(2))  # new limit: only reading (NULL) is allowed
    emit(_JEQ, 0, None, "eperm")
    emit(_LD_ABS, _arg_lo(2) + 4)
    emit(_JEQ, 0, "allow", "eperm")
    code.append("self_only")
    emit(_LD_ABS, _arg_lo(0))  # pid (pid_t: the kernel reads the low 32 bits)
    emit(_JEQ, pid, "allow", None)
    emit(_JEQ, 0, None, "eperm")
    emit(_LD_ABS, 0)  # kill(0, sig) is our own process group; tgkill(0, ...) is invalid anyway
    emit(_JEQ, nr["kill"], "allow", "eperm")
    code.append("allow")
    emit(_RET, _ALLOW)
    code.append("eperm")
    emit(_RET, _ERRNO | _EPERM)
    code.append("enosys")
    emit(_RET, _ERRNO | _ENOSYS)
    code.append("kill")
    emit(_RET, _KILL)

    labels, pos = {}, 0
    for item in code:
        if isinstance(item, str):
            labels[item] = pos
        else:
            pos += 1
    out, pos = [], 0
    for item in code:
        if isinstance(item, str):
            continue
        op, jt, jf, k = item
        jumps = [0 if j is None else labels[j] - pos - 1 for j in (jt, jf)]
        if not all(0 <= j < 256 for j in jumps):
            raise AssertionError(f"seccomp filter: jump out of range at instruction {pos}")
        out.append(struct.pack("<HBBI", op, jumps[0], jumps[1], k))
        pos += 1
    return b"".join(out)


def install() -> None:
    """Set no_new_privs and load the filter for this process (and every thread it starts); raises OSError."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    program = build(os.getpid())
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)):
        if libc.prctl(*args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"prctl({args[0]}): {os.strerror(e)}")
