"""The runner: the first code that runs inside a sandbox, then the program in the same interpreter.

:mod:`codetune.eval.sandbox` starts it as ``python -I -S -B runner.py key=value...`` inside bubblewrap (or, with
``unsafe_no_sandbox``, as a plain child). It imports only the standard library, so it starts fast and never
imports codetune (or torch) inside the sandbox. Everything it knows comes from its arguments (limits and
paths, nothing secret): there is no pass marker to steal.

In order: set the resource limits (soft = hard, so the program cannot raise them), stack a seccomp filter
that refuses ``execve`` (so the program cannot swap the interpreter for one that exits 0), route ``os._exit``
through a guard, then run the program as ``__main__``. The exit status is the verdict, and the parent reads it
from bubblewrap (``--json-status-fd``, an fd the program never sees):

- ``0``: the program returned normally (the runner then exits at once: no ``atexit`` hook or finalizer of the
  program runs after the verdict);
- :data:`EARLY_EXIT`: ``sys.exit(0)``/``SystemExit(None)``/``os._exit(0)`` before the end;
- ``1``: an uncaught exception (traceback on stderr); any other status: what the program asked for.

A program written to fake a pass still can: it shares its interpreter with its tests (it can return objects
that compare equal to anything, or make the exit system call through ``ctypes``); see docs/evaluation.md.
"""

from __future__ import annotations

import os
import posix
import resource
import sys

SETUP_FAILED = 121
"""Exit status when the runner could not set up the limits or filter; the program did not run."""
EARLY_EXIT = 117
"""Exit status of a program that asked to exit with status 0 before its end."""

INT_KEYS = ("memory_bytes", "cpu_seconds", "file_bytes", "processes")
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2

_real_exit = posix._exit


def _install_filter(program: bytes) -> None:
    """Stack a seccomp filter (``struct sock_filter`` array) on this process; needs ``no_new_privs``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    fprog = SockFprog(len(program) // 8, program)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def _set_limits(config: dict) -> None:
    limits = {
        resource.RLIMIT_AS: config.get("memory_bytes", -1),
        resource.RLIMIT_CPU: config.get("cpu_seconds", -1),
        resource.RLIMIT_FSIZE: config.get("file_bytes", -1),
        resource.RLIMIT_NPROC: config.get("processes", -1),
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        if value >= 0:
            resource.setrlimit(which, (value, value))


def _guarded_exit(status: int) -> None:
    if status % 256 == 0:  # the exit status is the low byte: 256 reads as 0
        os.write(2, b"os._exit(0) before the program's end\n")
        status = EARLY_EXIT
    _real_exit(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # a program's own stream object may raise anything, SystemExit(0) included
            pass


def parse_config(argv: list[str]) -> dict:
    """``key=value`` arguments (see ``codetune.eval.sandbox._runner_args``); parsed without importing json."""
    config: dict = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        config[key] = int(value) if key in INT_KEYS else value
    return config


def main(config: dict) -> int:
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir(config["workdir"])
        _set_limits(config)
        if config.get("exec_filter"):
            _install_filter(bytes.fromhex(config["exec_filter"]))
    except (OSError, ValueError) as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        return SETUP_FAILED
    program = config["program"]
    sys.argv = [program]
    sys.path.insert(0, config["workdir"])
    main_module = type(sys)("__main__")
    main_module.__file__ = program
    main_module.__builtins__ = __builtins__
    os._exit = posix._exit = _guarded_exit
    try:
        with open(program, "rb") as f:
            source = f.read()
        sys.modules["__main__"] = main_module  # so pickle & co. find the program's classes
        # compile() decodes the bytes as Python does a file (coding cookie, else UTF-8, strictly)
        exec(compile(source, program, "exec"), main_module.__dict__)
    except SystemExit as e:
        if e.code is None or (type(e.code) is int and e.code % 256 == 0):
            print("sys.exit(0) before the program's end", file=sys.stderr)
            return EARLY_EXIT
        if type(e.code) is int:  # not a subclass: its own __mod__ could say anything
            return e.code % 256
        try:
            print(e.code, file=sys.stderr)
        except BaseException:
            pass
        return 1
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # MemoryError while formatting, a broken stderr, ...
            os.write(2, b"uncaught exception\n")
        return 1
    return 0


if __name__ == "__main__":
    try:
        status = main(parse_config(sys.argv[1:]))
    except BaseException:  # whatever the program left behind (an exception whose __str__ exits, ...)
        status = 1
    _flush()
    _real_exit(status)
