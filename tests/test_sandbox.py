"""The sandbox keeps generated code away from the disk, network, secrets and the evaluator.

Attacks go through the real scoring path (``evaluate_humaneval(completions=...)``): each is the canonical
solution of a HumanEval task with attack lines in front, so a sample passes exactly when its attack
succeeded silently. Where cheap, the same attack is first run *outside* the sandbox as a control, proving
the attack code works and the test could fail.
"""

from __future__ import annotations

import json
import logging
import os
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
from codetune.eval.sandbox import Sandbox, SandboxLimits

PROBLEMS = load_problems()


@pytest.fixture(scope="module")
def report():
    return Sandbox().report


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
    evaluate_humaneval(completions=str(path), out_dir=str(out), **kwargs)
    records = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    by_task: dict[str, list[dict]] = {}
    for rec in records:
        by_task.setdefault(rec["task_id"], []).append(rec)
    return [by_task[t].pop(0) for t, _ in rows]


def run_unsandboxed(task_id: str, completion: str) -> subprocess.CompletedProcess:
    """Control: the same program as a plain child process (the attack must work here)."""
    program = build_program(PROBLEMS[task_id], completion)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)


def test_infinite_loop_is_reported_timed_out_within_the_limit(tmp_path):
    start = time.monotonic()
    [rec] = score(
        tmp_path, [("HumanEval/0", attack_completion("HumanEval/0", "while True:\n    pass"))], timeout=1.0
    )
    assert rec["result"] == "timed out" and not rec["passed"]
    assert rec["seconds"] < 1.0 + 0.5
    assert time.monotonic() - start < 10


def test_writes_and_deletes_outside_the_scratch_dir_fail(tmp_path, report):
    if not report.filesystem_read_only:
        pytest.skip("no read-only filesystem view on this machine (needs unshare with mount namespaces)")
    canary = tmp_path / "canary.txt"
    attacks = {
        "delete": f"import os\nos.remove({str(canary)!r})",
        "overwrite": f"open({str(canary)!r}, 'w').write('pwned')",
        "new file": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('pwned')",
        # uid 0 could undo a read-only mount if it kept CAP_SYS_ADMIN
        "remount": f"""
            import subprocess
            subprocess.run(['mount', '-o', 'remount,rw', '/'], check=True, capture_output=True)
            open({str(canary)!r}, 'w').write('pwned')
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
    assert not (tmp_path / "new.txt").exists()


def test_environment_secrets_are_not_readable(tmp_path, monkeypatch, report):
    if not report.pid_namespace:
        pytest.skip("no pid namespace here: /proc/<evaluator>/environ would be readable")
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


def test_sockets_cannot_connect(tmp_path, report):
    if not report.network_isolated:
        pytest.skip("no network namespace on this machine (needs unshare --net)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        attack = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
        completion = attack_completion("HumanEval/0", attack)
        assert run_unsandboxed("HumanEval/0", completion).returncode == 0, (
            "control: connecting works unsandboxed"
        )
        server.accept()[0].close()
        server.setblocking(False)
        [rec] = score(tmp_path, [("HumanEval/0", completion)])
        assert not rec["passed"] and "unreachable" in rec["result"].lower()
        with pytest.raises(BlockingIOError):
            server.accept()


def test_huge_allocation_fails_alone(tmp_path):
    # 2 GiB is fine for a plain process on these machines (24 GiB) but over a 512 MiB address space.
    completion = attack_completion("HumanEval/0", "block = bytearray(2 * 1024**3)")
    rows = [(t, PROBLEMS[t]["canonical_solution"]) for t in ("HumanEval/1", "HumanEval/2")]
    records = score(tmp_path, [("HumanEval/0", completion), *rows], memory_mb=512)
    assert "MemoryError" in records[0]["result"] and not records[0]["passed"]
    assert [r["passed"] for r in records[1:]] == [True, True]


def test_fork_bomb_is_contained_and_cleaned_up(tmp_path, report):
    if not report.process_limit:
        pytest.skip("no process-count bound here (needs a writable cgroup-v1 pids controller)")
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
    leftovers = [p for p in sandbox_mod.PIDS_V1_ROOT.rglob(f"codetune-sandbox-{os.getpid()}-*")]
    assert leftovers == []


def test_credential_paths_are_hidden(tmp_path, report):
    if not report.filesystem_read_only:
        pytest.skip("no mount namespace here to hide paths in")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "token").write_text("hf_fake")
    (tmp_path / "netrc").write_text("machine x password fake")
    program = f"""
found = []
for path in ({str(tmp_path / "creds" / "token")!r}, {str(tmp_path / "netrc")!r}):
    try:
        found.append(open(path).read())
    except OSError:
        pass
assert found, 'nothing readable'
"""
    hide = [str(tmp_path / "creds"), str(tmp_path / "netrc")]
    assert Sandbox(SandboxLimits(timeout=5), hide=[]).run(program).passed, "control: readable when not hidden"
    result = Sandbox(SandboxLimits(timeout=5), hide=hide).run(program)
    assert not result.passed and "nothing readable" in result.result


def test_default_hidden_paths_cover_the_usual_credential_stores(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hidden = sandbox_mod.default_hidden_paths()
    for rel in (".ssh", ".netrc", ".cache/huggingface", ".aws"):
        assert str(tmp_path / rel) in hidden
    assert str(tmp_path / "hf") in hidden


def test_program_that_exits_early_does_not_pass():
    sandbox = Sandbox(SandboxLimits(timeout=5))
    results = sandbox.run_many(["import sys\nsys.exit(0)", "import os\nos._exit(0)", "pass"])
    assert [r.passed for r in results] == [False, False, True]


def test_detached_grandchild_does_not_survive_its_sample(report):
    if not (report.pid_namespace or report.process_limit):
        pytest.skip("neither a pid namespace nor a pids cgroup here to find detached processes")
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
    result = Sandbox(SandboxLimits(timeout=5)).run(program)
    assert result.passed
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


def test_missing_mechanisms_are_reported_loudly(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_mod.shutil, "which", lambda name: None)
    sandbox = Sandbox(SandboxLimits(timeout=1))
    with caplog.at_level(logging.WARNING, logger="codetune.eval.sandbox"):
        report = sandbox.report
    assert not report.network_isolated and not report.filesystem_read_only and not report.pid_namespace
    assert any("unshare" in w for w in report.warnings)
    assert any("network_isolated=False" in w for w in report.warnings)
    assert "network_isolated=False" in caplog.text
    # Degraded, the sandbox still runs programs and enforces the timeout.
    results = sandbox.run_many(["pass", "while True: pass"])
    assert [r.result for r in results] == ["passed", "timed out"]


def test_bad_limits_are_rejected_before_running():
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)
