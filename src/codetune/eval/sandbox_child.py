"""The first code that runs inside a sandbox child: lock the view of the system, then run the program.

This file is executed as a script by :mod:`codetune.eval.sandbox` (``python -I sandbox_child.py CONFIG``),
usually as pid 1 of fresh mount, network and pid namespaces made by ``unshare``. It imports only the
standard library so it starts fast and never imports codetune (or torch) inside the sandbox.

Order matters: mount a tmpfs on the scratch dir and make every other mount read-only (which needs
``CAP_SYS_ADMIN``), *then* drop every capability so the program cannot undo it, then set resource limits,
then run the untrusted program in this process. A uid-0 process without capabilities still owns root's
files, so the read-only mounts, ``nodev`` and the pid namespace are what actually keep it in.

The program passes only if it returns normally: then this runner prints a nonce it read from stdin
before the program started, so a program that calls ``sys.exit(0)`` or ``os._exit(0)`` early does not pass.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import runpy
import sys

SETUP_FAILED = 121
"""Exit code that means the sandbox could not be set up; the program did not run."""

# <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND = 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
# Flags a bind remount must repeat; in a user namespace dropping a locked one fails with EPERM.
KEPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
# Device nodes a Python program may need; every other device node becomes unopenable (nodev).
ALLOWED_DEVICES = ("null", "zero", "full", "random", "urandom")

# <linux/prctl.h>, <linux/capability.h>
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(RuntimeError):
    """The sandbox could not be made as asked; refuse to run the program."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) for every mount this process sees, parents first."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mounts.append((_unescape(fields[4]), set(fields[5].split(","))))
    return mounts


def lock_filesystem(scratch: str, scratch_bytes: int, hide: list[str]) -> None:
    """Scratch becomes a private tmpfs; ``hide`` paths become empty; every other mount read-only, nosuid,
    nodev (bar a few devices)."""
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_bytes},mode=0700")
    for path in hide:  # credentials the evaluator's user can read (tokens, keys): not for generated code
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=4096,mode=0000")
        elif os.path.exists(path):
            _mount("/dev/null", path, None, MS_BIND, None)  # nodev below: opening it fails outright
    # A read-only mount does not stop writes to device nodes (/dev/vda stays writable for uid 0), so
    # /dev goes nodev; the harmless devices get their own bind mounts that keep working.
    devices = set()
    for name in ALLOWED_DEVICES:
        path = f"/dev/{name}"
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND, None)
            devices.add(path)
    mounts = [(t, o) for t, o in _mounts() if t != scratch]
    for target, options in mounts:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        flags |= sum(bit for opt, bit in KEPT_FLAGS.items() if opt in options)
        if target not in devices:
            flags |= MS_NODEV
        # Mounts hidden under another one (the host /proc under the new one) fail here; they cannot be
        # reached, which the check below confirms for every path.
        libc.mount(None, target.encode(), None, ctypes.c_ulong(flags), None)
    for target, _ in mounts:
        try:
            st = os.statvfs(target)
        except OSError:
            continue  # not reachable from here
        if not st.f_flag & os.ST_RDONLY or (target not in devices and not st.f_flag & os.ST_NODEV):
            raise SetupError(f"mount {target} is still writable or allows devices")


def drop_privileges() -> None:
    """Drop every capability, now and across exec, so nothing can remount, load modules or escape."""
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    cap = 0
    # The bounding set caps what exec can grant, also to uid 0: empty it (EINVAL past the last cap).
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words, all zero
    _check(libc.capset(header, data), "capset")
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if line.startswith("Cap"))
    if int(status["CapEff"], 16) or int(status["CapPrm"], 16) or int(status["CapBnd"], 16):
        raise SetupError(f"capabilities still held after dropping: {status}")


def set_limits(memory_bytes: int | None, cpu_seconds: int, file_bytes: int) -> None:
    """Address space, CPU time, file size and core dumps; soft = hard so the program cannot raise them."""
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main(config_json: str) -> int:
    config = json.loads(config_json)
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    with open(config["program"]) as f:
        source = f.read()
    scratch = config["scratch"]
    try:
        if config["isolate_fs"]:
            lock_filesystem(scratch, config["scratch_bytes"], config["hide"])
        if config["drop_privileges"]:
            drop_privileges()
        else:
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    except (SetupError, OSError) as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        return SETUP_FAILED
    program = os.path.join(scratch, "program.py")
    with open(program, "w") as f:
        f.write(source)
    os.chdir(scratch)
    set_limits(config["memory_bytes"], config["cpu_seconds"], config["file_bytes"])
    sys.argv = [program]
    sys.path.insert(0, scratch)
    runpy.run_path(program, run_name="__main__")
    sys.stdout.flush()
    os.write(1, f"\n{nonce}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
