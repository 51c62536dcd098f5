"""Run untrusted generated code in a child process that cannot reach the network, the disk or the evaluator.

What is enforced where (detected at run time; anything missing is logged as a warning and recorded in
:attr:`Sandbox.report`, which every eval writes into its results JSON):

- **Wall-clock timeout** — here, in the parent: the child's process group and its process cgroup are
  SIGKILLed; with a pid namespace, killing its init (``unshare --kill-child``) takes every descendant too.
- **Network** — ``unshare --net``: a new network namespace with only a loopback that is down.
- **Filesystem** — ``unshare --mount --propagation private`` plus :mod:`sandbox_child`: a size-limited
  tmpfs on the per-sample scratch dir (the cwd), every other mount remounted read-only, ``nosuid`` and
  ``nodev`` (a few harmless devices such as ``/dev/null`` kept), then all capabilities dropped so even
  uid 0 cannot remount.
- **Processes** — ``unshare --pid --mount-proc``: the program sees only its own processes, so it cannot
  signal the evaluator or read other processes' environments; a per-sample pids cgroup with ``pids.max``
  bounds the process count (``RLIMIT_NPROC`` does not bind uid 0).
- **Memory, CPU time, file size** — ``setrlimit`` in the child (``RLIMIT_AS``, ``RLIMIT_CPU``,
  ``RLIMIT_FSIZE``), so a huge allocation fails with ``MemoryError`` in that sample only.
- **Environment** — the child gets a minimal environment (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = scratch);
  nothing of the evaluator's (tokens, credentials) is inherited. With the mount namespace, the usual
  credential stores of the evaluator's user (``~/.ssh``, ``~/.cache/huggingface``, ``~/.netrc``, ...,
  :func:`default_hidden_paths`) are also masked; the rest of the filesystem stays readable.
- **Passing** — a program passes only if it runs to its end: the runner then prints a nonce it read from
  stdin before the program started (not in its argv, environment or files), so ``sys.exit(0)`` or
  ``os._exit(0)`` before the tests does not pass. This guards against accidents, not against code written
  to dig the nonce out of the runner's frames.

As root, all of the above work with ``unshare`` alone; as another user, ``unshare --user --map-root-user``
gives the same namespaces where user namespaces are allowed. Without ``unshare`` only the timeout, limits,
scrubbed environment and a temp cwd remain, and every sample runs with full access to the filesystem and
network: the report says so loudly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from codetune.eval import sandbox_child

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(sandbox_child.__file__)
PIDS_V1_ROOT = Path("/sys/fs/cgroup/pids")
OUTPUT_TAIL_BYTES = 4096
CREDENTIAL_PATHS = (
    ".ssh", ".aws", ".azure", ".netrc", ".git-credentials", ".pypirc", ".docker", ".kube", ".gnupg",
    ".huggingface", ".cache/huggingface", ".config/gcloud", ".config/gh", ".config/huggingface",
)  # fmt: skip
# --kill-child: when unshare dies (we SIGKILL it on timeout), its child, the namespace's init, is killed,
# and with it every process in the pid namespace.
NAMESPACE_FLAGS = (
    "--mount",
    "--net",
    "--pid",
    "--fork",
    "--kill-child",
    "--propagation",
    "private",
    "--mount-proc",
)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sample limits for running generated code."""

    timeout: float = 3.0
    """Wall-clock seconds per sample (HumanEval's reference uses 3.0); a sample over it is "timed out"."""
    memory_mb: int = 1024
    """Address-space limit (``RLIMIT_AS``) in MiB; larger allocations raise ``MemoryError``."""
    max_processes: int = 16
    """Process/thread count bound of one sample, interpreter included (cgroup ``pids.max``)."""
    file_mb: int = 16
    """Largest file a sample may write (``RLIMIT_FSIZE``), its captured output included."""
    scratch_mb: int = 64
    """Size of the private tmpfs the sample gets as its working directory."""

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.memory_mb <= 0 or self.max_processes < 4 or self.file_mb <= 0:
            raise ValueError(
                f"bad sandbox limits {self}: timeout, memory_mb, file_mb must be > 0 and max_processes >= 4"
            )


@dataclass(frozen=True)
class SandboxReport:
    """Which isolation mechanisms are in force on this machine (written into every results JSON)."""

    network_isolated: bool
    filesystem_read_only: bool
    privileges_dropped: bool
    pid_namespace: bool
    process_limit: bool
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: ``result`` is "passed", "timed out" or "failed: <reason>"."""

    passed: bool
    result: str
    seconds: float


@dataclass
class _Mode:
    command: list[str]
    """Prefix that starts the child (the unshare invocation, or nothing)."""
    isolate_fs: bool
    drop_privileges: bool
    pids_parent: Path | None
    report: SandboxReport | None = None


def default_hidden_paths() -> list[str]:
    """Where this user's credentials usually live: masked in the sandbox's view of the filesystem."""
    home = Path.home()
    paths = [home / p for p in CREDENTIAL_PATHS]
    for var in ("HF_HOME", "HF_TOKEN_PATH", "XDG_CONFIG_HOME"):
        if os.environ.get(var):
            paths.append(Path(os.environ[var]))
    return [str(p) for p in paths]


class Sandbox:
    """Runs programs (prompt + completion + tests) in isolated child processes, in parallel.

    The first use probes which mechanisms work here by running a probe program through the real path.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        hide: Sequence[str] | None = None,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.workers = workers or max(1, min(os.cpu_count() or 1, 8))
        self.hide = list(default_hidden_paths() if hide is None else hide)
        self._mode: _Mode | None = None

    @property
    def report(self) -> SandboxReport:
        return self._probe().report

    def run(self, program: str) -> ExecutionResult:
        """Run one program; it passes if it runs to the end without an exception within the limits."""
        return _execute(self._probe(), program, self.limits, self.hide)[0]

    def run_many(self, programs: list[str]) -> list[ExecutionResult]:
        """Run programs on a small worker pool; results in input order. One bad sample affects only itself."""
        mode = self._probe()
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool:
            return list(pool.map(lambda p: _execute(mode, p, self.limits, self.hide)[0], programs))

    # -- probing -------------------------------------------------------------------------------------------

    def _probe(self) -> _Mode:
        if self._mode is None:
            self._mode = _probe_mode(self.limits)
            for warning in self._mode.report.warnings:
                log.warning("sandbox: %s", warning)
        return self._mode


def _execute(
    mode: _Mode, program: str, limits: SandboxLimits, hide: Sequence[str] = ()
) -> tuple[ExecutionResult, str]:
    """Run one program in a fresh child; returns its result and the tail of what it printed."""
    start = time.monotonic()
    host = Path(tempfile.mkdtemp(prefix="codetune-sandbox-"))
    cgroup = _make_pids_cgroup(mode.pids_parent, limits.max_processes) if mode.pids_parent else None
    try:
        (host / "program.py").write_text(program)
        scratch = host / "work"
        scratch.mkdir()
        config = {
            "program": str(host / "program.py"),
            "scratch": str(scratch),
            "isolate_fs": mode.isolate_fs,
            "drop_privileges": mode.drop_privileges,
            "memory_bytes": limits.memory_mb << 20,
            "cpu_seconds": math.ceil(limits.timeout) + 1,
            "file_bytes": limits.file_mb << 20,
            "scratch_bytes": limits.scratch_mb << 20,
            "hide": _maskable(hide, keep=(Path(sys.prefix), Path(sys.base_prefix), CHILD_SCRIPT, host)),
        }
        command = [*mode.command, sys.executable, "-I", str(CHILD_SCRIPT), json.dumps(config)]
        if cgroup is not None:
            # Join the cgroup before unshare forks, so every descendant is counted.
            command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *command]
        nonce = secrets.token_hex(16)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(scratch),
            "TMPDIR": str(scratch),
        }
        with open(host / "stdout", "wb") as out, open(host / "stderr", "wb") as err:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, cwd=scratch,
                start_new_session=True,
            )  # fmt: skip
            try:
                proc.stdin.write(f"{nonce}\n".encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            timed_out = not _wait_exit(proc, limits.timeout)
            # The child is not reaped yet, so its pid (= process group id) cannot have been reused.
            _kill(proc, cgroup)
            proc.wait()
        seconds = time.monotonic() - start
        stdout = _tail(host / "stdout")
        if timed_out:
            return ExecutionResult(False, "timed out", seconds), stdout
        if proc.returncode == 0 and stdout.rstrip().endswith(nonce):
            return ExecutionResult(True, "passed", seconds), stdout.rstrip()[: -len(nonce)]
        reason = _reason(proc.returncode, _tail(host / "stderr"))
        if proc.returncode == sandbox_child.SETUP_FAILED and reason.startswith("sandbox setup failed"):
            log.warning("sandbox: %s (the program did not run)", reason)
        return ExecutionResult(False, f"failed: {reason}", seconds), stdout
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(host, ignore_errors=True)


def _maskable(paths: Sequence[str], keep: Sequence[Path]) -> list[str]:
    """Existing ``paths`` that can be hidden without hiding the interpreter, the runner or the scratch dir."""
    out = []
    for p in paths:
        if not os.path.lexists(p):
            continue
        path = Path(p).resolve()
        if not any(k.resolve().is_relative_to(path) for k in keep):
            out.append(str(path))
    return out


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child to exit without reaping it; False on timeout.

    A pidfd wakes us the moment the child exits (``Popen.wait(timeout)`` polls with sleeps of up to 50 ms,
    which doubled the time of short programs).
    """
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


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - OUTPUT_TAIL_BYTES))
        return f.read().decode(errors="replace")


def _reason(returncode: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if returncode == 0:
        return "exited before the tests finished"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else -returncode
        return f"killed by signal {name}" + (f" ({lines[-1][:200]})" if lines else "")
    return lines[-1][:300] if lines else f"exit code {returncode}"


def _kill(proc: subprocess.Popen, cgroup: Path | None) -> None:
    """SIGKILL the child's session and everything in its cgroup (a setsid'ed grandchild included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup is not None:
        _kill_cgroup(cgroup)


def _kill_cgroup(cgroup: Path, deadline_seconds: float = 5.0) -> None:
    # A fork bomb can fork between our reads: loop until the group is empty (pids.max bounds each round).
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
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
    log.warning("sandbox: processes left in %s after %.0fs", cgroup, deadline_seconds)


# -- process-count cgroup ----------------------------------------------------------------------------------


def _pids_cgroup_parent() -> Path | None:
    """This process's cgroup-v1 pids directory if we may create child groups there, else None."""
    if not (PIDS_V1_ROOT / "cgroup.procs").exists():
        return None
    own = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            own = path
    parent = PIDS_V1_ROOT / own.lstrip("/")
    parent = parent if parent.is_dir() else PIDS_V1_ROOT
    return parent if os.access(parent, os.W_OK) else None


def _remove_stale_cgroups(parent: Path) -> None:
    """Remove groups left behind by evaluators that died mid-run (their pid is in the group's name)."""
    for group in parent.glob("codetune-sandbox-*-*"):
        try:
            owner = int(group.name.split("-")[2])
            os.kill(owner, 0)
        except ProcessLookupError:
            _remove_cgroup(group)
        except (ValueError, PermissionError):
            continue


def _make_pids_cgroup(parent: Path, max_processes: int) -> Path:
    group = parent / f"codetune-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    group.mkdir()
    (group / "pids.max").write_text(str(max_processes))
    return group


def _remove_cgroup(group: Path) -> None:
    _kill_cgroup(group)
    for _ in range(200):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last killed tasks are being reaped
            time.sleep(0.01)
    log.warning("sandbox: could not remove cgroup %s", group)


# -- probing -----------------------------------------------------------------------------------------------

_PROBE_PROGRAM = """
import errno, json, os, socket
obs = {"pid": os.getpid()}
try:
    open(os.path.join(os.path.dirname(os.getcwd()), "probe-outside"), "w").close()
    obs["outside_write"] = True
except OSError:
    obs["outside_write"] = False
s = socket.socket()
try:
    s.settimeout(1)
    s.connect(("127.0.0.1", 9))
    obs["network"] = "connected"
except OSError as e:
    obs["network"] = errno.errorcode.get(e.errno, str(e.errno))
with open("/proc/self/status") as f:
    obs["cap_eff"] = [int(l.split()[1], 16) for l in f if l.startswith("CapEff")][0]
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
print(json.dumps(obs))
"""


def _probe_mode(limits: SandboxLimits) -> _Mode:
    """Find the strongest isolation that works here, verified by running a probe program through it."""
    warnings: list[str] = []
    is_root = os.geteuid() == 0
    pids_parent = _pids_cgroup_parent()
    if pids_parent is not None:
        _remove_stale_cgroups(pids_parent)
    unshare = shutil.which("unshare")
    candidates: list[_Mode] = []
    if unshare:
        # As root the namespaces need no user namespace; otherwise map this user to root inside one.
        user = [] if is_root else ["--user", "--map-root-user"]
        command = [unshare, *user, *NAMESPACE_FLAGS]
        candidates.append(_Mode(command, isolate_fs=True, drop_privileges=True, pids_parent=pids_parent))
    else:
        warnings.append("`unshare` (util-linux) not found: no network, filesystem or pid isolation")
    candidates.append(_Mode([], isolate_fs=False, drop_privileges=is_root, pids_parent=pids_parent))
    probe_limits = SandboxLimits(timeout=10.0, memory_mb=max(limits.memory_mb, 512), max_processes=8)
    for mode in candidates:
        result, observed = _run_probe(mode, probe_limits)
        if observed is None:
            warnings.append(
                f"sandbox mode {' '.join(mode.command) or '(plain process)'} failed: {result.result}"
            )
            continue
        network = observed["network"] == "ENETUNREACH"
        report = SandboxReport(
            network_isolated=network,
            filesystem_read_only=not observed["outside_write"],
            privileges_dropped=observed["cap_eff"] == 0,
            pid_namespace=observed["pid"] == 1,
            process_limit=observed["forked"] < 12,
            warnings=(),
        )
        missing = {
            "network_isolated": "generated code can use the network",
            "filesystem_read_only": "generated code can write anywhere this user can",
            "pid_namespace": "generated code can see and signal other processes",
            "process_limit": "a fork bomb is bounded only by the timeout (no writable cgroup-v1 pids controller)",
            "privileges_dropped": "generated code keeps this user's capabilities",
        }
        warnings += [
            f"{key}=False: {message}" for key, message in missing.items() if not getattr(report, key)
        ]
        mode.report = SandboxReport(**{**asdict(report), "warnings": tuple(warnings)})
        return mode
    raise RuntimeError("sandbox: could not run even a plain child process: " + "; ".join(warnings))


def _run_probe(mode: _Mode, limits: SandboxLimits) -> tuple[ExecutionResult, dict | None]:
    result, stdout = _execute(mode, _PROBE_PROGRAM, limits)
    if not result.passed:
        return result, None
    return result, json.loads(stdout.strip().splitlines()[-1])
