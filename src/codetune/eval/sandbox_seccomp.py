"""Seccomp-BPF filters for the sandbox, assembled with the standard library (no libseccomp needed).

:func:`sandbox_filter` is handed to ``bwrap --seccomp FD`` and applies to everything in the sandbox: it refuses
the system calls generated code never needs and that reach past the namespaces (the kernel keyrings, ptrace and
cross-process memory access, new namespaces, mounts, module and kexec loading, eBPF, perf, userfaultfd and
io_uring), and sockets of any family but ``AF_UNIX``, ``AF_INET``, ``AF_INET6`` and ``AF_NETLINK`` (so no
``AF_VSOCK`` to the hypervisor, no ``AF_ALG``, ...). :func:`exec_filter` is installed by the runner on itself just
before the program starts, so the program cannot ``execve`` (bwrap itself needs one ``execve`` to start the
runner, which is why that rule cannot be part of the first filter).

The filters check the architecture first and kill a process that uses another system-call ABI (i386 via
``int 0x80``, x32), whose numbers the tables below do not cover. Numbers come from the kernel's
``asm/unistd_64.h`` (x86_64) and ``asm-generic/unistd.h`` (aarch64).
"""

from __future__ import annotations

import errno
import platform
import struct

# <linux/filter.h> BPF opcodes
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

# <linux/seccomp.h>
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0 = 0, 4, 16  # struct seccomp_data (args[0] low word on little endian)

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
ALLOWED_SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
CLONE_NEW_FLAGS = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
)

DENIED = (
    "keyctl add_key request_key "  # kernel keyrings (root's keys are readable by any uid-0 process)
    "ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd "  # other processes' memory and fds
    "unshare setns mount umount2 pivot_root chroot fsopen fsconfig fsmount fspick move_mount open_tree "
    "mount_setattr "  # namespaces and mounts
    "bpf perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register "  # kernel attack surface
    "kexec_load kexec_file_load init_module finit_module delete_module swapon swapoff reboot syslog acct "
    "quotactl quotactl_fd open_by_handle_at name_to_handle_at fanotify_init lookup_dcookie "
    "settimeofday clock_settime clock_adjtime adjtimex vhangup uselib iopl ioperm"
).split()

ARCHES = {
    # machine: (AUDIT_ARCH_*, first number of another ABI sharing this arch value or None, syscall table)
    "x86_64": (
        0xC000003E,
        0x40000000,  # x32 syscalls have this bit set
        {
            "keyctl": 250, "add_key": 248, "request_key": 249, "ptrace": 101, "process_vm_readv": 310,
            "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438, "unshare": 272, "setns": 308,
            "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "fsopen": 430, "fsconfig": 431,
            "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442,
            "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
            "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320,
            "init_module": 175, "finit_module": 313, "delete_module": 176, "swapon": 167, "swapoff": 168,
            "reboot": 169, "syslog": 103, "acct": 163, "quotactl": 179, "quotactl_fd": 443,
            "open_by_handle_at": 304, "name_to_handle_at": 303, "fanotify_init": 300, "lookup_dcookie": 212,
            "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "vhangup": 153,
            "uselib": 134, "iopl": 172, "ioperm": 173,
            "clone": 56, "clone3": 435, "socket": 41, "socketpair": 53, "execve": 59, "execveat": 322,
        },
    ),
    "aarch64": (
        0xC00000B7,
        None,
        {
            "keyctl": 219, "add_key": 217, "request_key": 218, "ptrace": 117, "process_vm_readv": 270,
            "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438, "unshare": 97, "setns": 268,
            "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "fsopen": 430, "fsconfig": 431,
            "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442,
            "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425,
            "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 104, "kexec_file_load": 294,
            "init_module": 105, "finit_module": 273, "delete_module": 106, "swapon": 224, "swapoff": 225,
            "reboot": 142, "syslog": 116, "acct": 89, "quotactl": 60, "quotactl_fd": 443,
            "open_by_handle_at": 265, "name_to_handle_at": 264, "fanotify_init": 262, "lookup_dcookie": 18,
            "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171, "vhangup": 58,
            "clone": 220, "clone3": 435, "socket": 198, "socketpair": 199, "execve": 221, "execveat": 281,
        },
    ),
}  # fmt: skip


class UnsupportedArchitecture(RuntimeError):
    """No syscall table for this machine: the sandbox refuses rather than run without its filter."""


class _Program:
    """A straight-line BPF program with forward jumps to labels, resolved by :meth:`assemble`."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.code.append((BPF_LD_W_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: str | int = 0, false: str | int = 0) -> None:
        self.code.append((op, true, false, k))

    def ret(self, value: int) -> None:
        self.code.append((BPF_RET_K, 0, 0, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (op, jt, jf, k) in enumerate(self.code):
            offsets = [self.labels[t] - i - 1 if isinstance(t, str) else t for t in (jt, jf)]
            if not all(0 <= o < 256 for o in offsets):
                raise ValueError(f"BPF jump out of range at instruction {i}")
            out += struct.pack("=HBBI", op, offsets[0], offsets[1], k)
        return bytes(out)


def _arch(machine: str | None) -> tuple[int, int | None, dict[str, int]]:
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise UnsupportedArchitecture(
            f"sandbox: no seccomp syscall table for {machine!r} (supported: {', '.join(ARCHES)})"
        )
    return ARCHES[machine]


def _prologue(prog: _Program, audit_arch: int, other_abi: int | None) -> None:
    prog.load(OFFSET_ARCH)
    prog.jump(BPF_JEQ_K, audit_arch, 0, "kill")
    prog.load(OFFSET_NR)
    if other_abi is not None:
        prog.jump(BPF_JGE_K, other_abi, "kill", 0)


def sandbox_filter(machine: str | None = None) -> bytes:
    """The filter for everything in the sandbox (``struct sock_filter`` array, as ``bwrap --seccomp`` reads it)."""
    audit_arch, other_abi, table = _arch(machine)
    prog = _Program()
    _prologue(prog, audit_arch, other_abi)
    for name in DENIED:
        if name in table:
            prog.jump(BPF_JEQ_K, table[name], "eperm", 0)
    prog.jump(
        BPF_JEQ_K, table["clone3"], "enosys", 0
    )  # its flags are in memory: make libc fall back to clone
    prog.jump(BPF_JEQ_K, table["clone"], "clone", 0)
    prog.jump(BPF_JEQ_K, table["socket"], "socket", 0)
    prog.jump(BPF_JEQ_K, table["socketpair"], "socket", 0)
    prog.ret(SECCOMP_RET_ALLOW)
    prog.label("clone")
    prog.load(OFFSET_ARG0)
    prog.jump(BPF_JSET_K, CLONE_NEW_FLAGS, "eperm", "allow")
    prog.label("socket")
    prog.load(OFFSET_ARG0)
    for family in ALLOWED_SOCKET_FAMILIES:
        prog.jump(BPF_JEQ_K, family, "allow", 0)
    prog.ret(SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT)
    prog.label("allow")
    prog.ret(SECCOMP_RET_ALLOW)
    prog.label("eperm")
    prog.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    prog.label("enosys")
    prog.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    prog.label("kill")
    prog.ret(SECCOMP_RET_KILL_PROCESS)
    return prog.assemble()


def exec_filter(machine: str | None = None) -> bytes:
    """A filter that refuses ``execve``/``execveat`` (EPERM); stacked by the runner before the program starts."""
    audit_arch, other_abi, table = _arch(machine)
    prog = _Program()
    _prologue(prog, audit_arch, other_abi)
    prog.jump(BPF_JEQ_K, table["execve"], "eperm", 0)
    prog.jump(BPF_JEQ_K, table["execveat"], "eperm", 0)
    prog.ret(SECCOMP_RET_ALLOW)
    prog.label("eperm")
    prog.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    prog.label("kill")
    prog.ret(SECCOMP_RET_KILL_PROCESS)
    return prog.assemble()
