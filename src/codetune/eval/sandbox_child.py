"""The runner: the first code that runs inside a sandbox, then the program, and, for tested programs, its tests.

:mod:`codetune.eval.sandbox` starts it as ``python -I -S -B runner.py key=value...`` inside bubblewrap (or, with
``unsafe_no_sandbox``, as a plain child). It imports only the standard library, so it starts fast and never
imports codetune (or torch) inside the sandbox. Its arguments hold limits and paths, nothing secret.

First: the resource limits (soft = hard, so the program cannot raise them) and a seccomp filter that refuses
``execve``. Then one of two modes; in both the exit status of this process is the verdict, which the parent
reads from bubblewrap (``--json-status-fd``, an fd the program never sees):

**A program** (``Sandbox.run(str)``): ``os._exit`` is routed through a guard and the program runs as
``__main__`` in this process. Exit ``0`` when it returned normally (at once: no ``atexit`` hook or finalizer of
the program runs after the verdict), :data:`EARLY_EXIT` for ``sys.exit(0)``/``os._exit(0)`` before the end, ``1``
for an uncaught exception. This catches accidents; a program *written* to fake a pass can still do so, since it
shares the interpreter with its tests (see docs/evaluation.md).

**A tested program** (``Sandbox.run(TestedProgram)``): the runner forks before it has read anything. The child
runs the untrusted solution and then only answers calls: arguments in, the entry point's return value out, both
as plain data (``ascii()`` of tagged tuples, parsed back as literals only: no code, no objects with
behaviour). The parent, this process, makes itself non-dumpable (so the child cannot read its memory or fds
through ``/proc``), reads the trusted test code from an fd the child closed before running anything, and runs
``check(candidate)`` with a proxy that calls into the child. It exits 0 only when ``check`` returned, so the
child cannot end the tests early, make an answer compare equal to anything, or reach the expected values.
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

INT_KEYS = ("memory_bytes", "cpu_seconds", "file_bytes", "processes", "tests_fd")
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 4, 38, 22, 2
MAX_MESSAGE = 64 << 20
"""Largest message between a tested program and its tests (arguments or one return value)."""

_real_exit = posix._exit


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    ctypes, libc = _libc()
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _install_filter(program: bytes) -> None:
    """Stack a seccomp filter (``struct sock_filter`` array) on this process; needs ``no_new_privs``."""
    ctypes, libc = _libc()

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    _prctl(PR_SET_NO_NEW_PRIVS, 1)
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


def _print_exception() -> None:
    try:
        import traceback

        traceback.print_exc()
    except BaseException:  # MemoryError while formatting, a broken stderr, ...
        os.write(2, b"uncaught exception\n")


def _status_of(e: SystemExit) -> int:
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


def parse_config(argv: list[str]) -> dict:
    """``key=value`` arguments (see ``codetune.eval.sandbox._runner_args``); parsed without importing json."""
    config: dict = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        config[key] = int(value) if key in INT_KEYS else value
    return config


def _exec_program(config: dict) -> dict:
    """Run the program file as ``__main__``; returns its namespace (exceptions propagate)."""
    program = config["program"]
    sys.argv = [program]
    sys.path.insert(0, config["workdir"])
    main_module = type(sys)("__main__")
    main_module.__file__ = program
    main_module.__builtins__ = __builtins__
    os._exit = posix._exit = _guarded_exit
    with open(program, "rb") as f:
        source = f.read()
    sys.modules["__main__"] = main_module  # so pickle & co. find the program's classes
    # compile() decodes the bytes as Python does a file (coding cookie, else UTF-8, strictly)
    exec(compile(source, program, "exec"), main_module.__dict__)
    return main_module.__dict__


def _run_program(config: dict) -> int:
    try:
        _exec_program(config)
    except SystemExit as e:
        return _status_of(e)
    except BaseException:
        _print_exception()
        return 1
    return 0


# -- tested programs: plain data across a pipe --------------------------------------------------------------


def encode(value, depth: int = 0):
    """``value`` as literals only: scalars as themselves, containers and floats as tagged tuples."""
    if depth > 200:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if kind in (int, str, bytes, bool, type(None)):
        return value
    if kind is float:
        return ("float", repr(value))
    if kind is complex:
        return ("complex", repr(value.real), repr(value.imag))
    if kind in (list, tuple, set, frozenset):
        return (kind.__name__, [encode(v, depth + 1) for v in value])
    if kind is dict:
        return ("dict", [(encode(k, depth + 1), encode(v, depth + 1)) for k, v in value.items()])
    # Library containers built on the plain ones (Counter, OrderedDict, defaultdict, namedtuple) cross as copies
    # of their base type, so the other side only ever sees plain data whatever their methods do.
    for base in (dict, list, tuple, set, frozenset):
        if isinstance(value, base):
            return encode(base(value), depth + 1)
    raise TypeError(f"a {kind.__name__} cannot pass between a program and its tests (only plain data)")


def decode(value, depth: int = 0):
    """The inverse of :func:`encode`, for input from the other side: anything else is refused."""
    if depth > 200:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if kind in (int, str, bytes, bool, type(None)):
        return value
    if kind is tuple and value and type(value[0]) is str:
        tag, rest = value[0], value[1:]
        if tag == "float" and len(rest) == 1 and type(rest[0]) is str:
            return float(rest[0])
        if tag == "complex" and len(rest) == 2 and all(type(r) is str for r in rest):
            return complex(float(rest[0]), float(rest[1]))
        if tag in ("list", "tuple", "set", "frozenset") and len(rest) == 1 and type(rest[0]) is list:
            items = [decode(v, depth + 1) for v in rest[0]]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and len(rest) == 1 and type(rest[0]) is list:
            pairs = rest[0]
            if all(type(p) is tuple and len(p) == 2 for p in pairs):
                return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
    raise ValueError(f"not a value: {ascii(value)[:100]}")


def _send(fd: int, message: tuple) -> None:
    data = ascii(message).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _literal(node, depth: int = 0):
    """The value of a parsed literal: constants (int, str, bytes, bool, None), negative ints, tuples, lists.

    Like ``ast.literal_eval`` but narrower, and without importing :mod:`ast` (tens of ms at start-up).
    """
    import _ast

    kind = type(node)
    if depth > 400:
        raise ValueError("value nested too deeply")
    if kind is _ast.Constant and type(node.value) in (int, str, bytes, bool, type(None)):
        return node.value
    if kind is _ast.UnaryOp and type(node.op) is _ast.USub and type(node.operand) is _ast.Constant:
        if type(node.operand.value) is int:
            return -node.operand.value
    if kind is _ast.Tuple:
        return tuple(_literal(e, depth + 1) for e in node.elts)
    if kind is _ast.List:
        return [_literal(e, depth + 1) for e in node.elts]
    raise ValueError(f"not a literal: {kind.__name__}")


def _receive(fd: int) -> tuple:
    """One message, parsed as literals only, so the other side cannot make this run code."""
    import _ast

    n = int.from_bytes(_read_exactly(fd, 4), "big")
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes is over {MAX_MESSAGE}")
    tree = compile(_read_exactly(fd, n).decode("ascii"), "<message>", "eval", _ast.PyCF_ONLY_AST)
    message = _literal(tree.body)
    if type(message) is not tuple or not message or type(message[0]) is not str:
        raise ValueError("malformed message")
    return message


class CandidateFailed(Exception):
    """The program's side ended, refused, or answered something that is not a return value."""


class _Candidate:
    """What the tests call: each call goes to the program's process as data and comes back as data."""

    def __init__(self, name: str, requests: int, replies: int, pid: int) -> None:
        self.__name__ = self.__qualname__ = name
        self._requests, self._replies, self._pid = requests, replies, pid

    def _reply(self) -> tuple:
        try:
            return _receive(self._replies)
        except EOFError:
            _, status = os.waitpid(self._pid, 0)
            raise CandidateFailed(f"the program's process ended (wait status {status})") from None

    def ready(self) -> None:
        reply = self._reply()
        if reply[0] == "error" and len(reply) == 2 and type(reply[1]) is str:
            raise CandidateFailed(reply[1][:1000])
        if reply != ("ready",):
            raise CandidateFailed("the program's process did not start")

    def __call__(self, *args, **kwargs):
        try:
            _send(self._requests, ("call", encode(args), encode(kwargs)))
        except BrokenPipeError:
            raise CandidateFailed("the program's process ended") from None
        reply = self._reply()
        if reply[0] == "ok" and len(reply) == 2:
            return decode(reply[1])
        if reply[0] == "raise" and len(reply) == 3 and all(type(r) is str for r in reply[1:]):
            import builtins

            kind = getattr(builtins, reply[1], None)
            if isinstance(kind, type) and issubclass(kind, Exception):  # never SystemExit & co.
                raise kind(reply[2][:1000])
            raise CandidateFailed(f"{reply[1][:100]}: {reply[2][:1000]}")
        raise CandidateFailed("malformed reply from the program's process")


def _serve(config: dict, requests: int, replies: int) -> None:
    """The program's side: run the solution, then answer calls of its entry point until the tests hang up."""
    try:
        namespace = _exec_program(config)
        function = namespace[config["entry_point"]]
    except BaseException as e:
        _flush()
        try:
            _send(replies, ("error", f"{type(e).__name__}: {e}"[:1000]))
        except BaseException:
            pass
        _real_exit(1)
    _flush()
    _send(replies, ("ready",))
    while True:
        try:
            _, args, kwargs = _receive(requests)
        except EOFError:
            _real_exit(0)
        try:
            reply = ("ok", encode(function(*decode(args), **decode(kwargs))))
        except BaseException as e:  # SystemExit included: answered, never acted on
            reply = ("raise", type(e).__name__, str(e)[:1000])
        _flush()
        _send(replies, reply)


def _run_tested(config: dict) -> int:
    # Imported once before the fork rather than once on each side: HumanEval prompts (the solution's start and
    # the tests' context) import typing, and _ast is what messages are parsed with.
    import _ast  # noqa: F401
    import typing  # noqa: F401

    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the program's side: it never sees the tests
        try:
            os.close(config["tests_fd"])
            os.close(requests_w)
            os.close(replies_r)
            _serve(config, requests_r, replies_w)
        finally:
            _real_exit(1)
    os.close(requests_r)
    os.close(replies_w)
    try:
        _prctl(PR_SET_DUMPABLE, 0)  # /proc/<this>/mem, /fd, /environ: closed to the program's side
        chunks = []
        while chunk := os.read(config["tests_fd"], 1 << 20):
            chunks.append(chunk)
        os.close(config["tests_fd"])
    except OSError as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        return SETUP_FAILED
    candidate = _Candidate(config["entry_point"], requests_w, replies_r, pid)
    try:
        candidate.ready()
        tests: dict = {"__name__": "__tests__", "__builtins__": __builtins__}
        exec(compile(b"".join(chunks), "<tests>", "exec"), tests)
        tests[config["entry_point"]] = candidate
        tests[config.get("check") or "check"](candidate)
    except SystemExit as e:
        return _status_of(e)
    except BaseException:
        _print_exception()
        return 1
    return 0


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
    return _run_tested(config) if "tests_fd" in config else _run_program(config)


if __name__ == "__main__":
    try:
        status = main(parse_config(sys.argv[1:]))
    except BaseException:  # whatever the program left behind (an exception whose __str__ exits, ...)
        status = 1
    _flush()
    _real_exit(status)
