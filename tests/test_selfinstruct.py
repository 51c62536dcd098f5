"""Self-instruct (Code Llama §2.5): a scripted generator through the real sandbox, a tiny real model, resume, bad input.

The scripted generator answers each prompt with given texts (correct, wrong, hanging and escaping solutions,
vacuous and broken tests); every count the report gives is worked out by hand below from those texts.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from codetune.data.batch import IGNORE_INDEX
from codetune.data.chat import ChatEncoder, ChatFiles, conversation_messages
from codetune.eval.generate import Sample
from codetune.eval.humaneval import load_problems
from codetune.selfinstruct import execution, pipeline, testcases
from codetune.selfinstruct.backends import (
    VLLMBackend,
    load_backend,
    resolve_kind,
    vllm_sampling_params,
)
from codetune.selfinstruct.problems import read_problems_file
from codetune.selfinstruct.prompts import numbered_items
from codetune.selfinstruct.settings import (
    Execution,
    ProblemGeneration,
    ProblemsFile,
    Sampling,
    SolutionGeneration,
    UnitTestGeneration,
)
from codetune.selfinstruct.stage_log import StageLog

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1.0  # sandbox seconds per program: small, so the hanging candidate costs little


class Scripted:
    """A stand-in model: problem batches in order, tests and candidates by question; can fail on call K."""

    name = "scripted"
    model = "scripted"

    def __init__(self, batches=(), tests=None, solutions=None, fail_on_solutions_call=None, delay=0.0):
        self.batches = list(batches)
        self.tests = tests or {}
        self.solutions = solutions or {}
        self.fail_on = fail_on_solutions_call
        self.delay = delay
        self.calls: list[tuple[str, list[str]]] = []

    def generate(self, prompts, sampling, num_samples, stop, seed):
        kind = _kind(prompts[0])
        self.calls.append((kind, [_question(p) for p in prompts]))
        if kind == "solutions":
            time.sleep(self.delay)
            if self.fail_on is not None and sum(k == "solutions" for k, _ in self.calls) == self.fail_on:
                raise RuntimeError("injected crash")
        out = []
        for prompt in prompts:
            if kind == "probe":
                texts = ["x"]
            elif kind == "problems":
                texts = [self.batches.pop(0) for _ in range(num_samples)]
            elif kind == "tests":
                texts = [self.tests[_question(prompt)]]
            else:
                texts = list(self.solutions[_question(prompt)])
            assert len(texts) == num_samples, (kind, _question(prompt), len(texts), num_samples)
            out.append([Sample(t, 0, "stop") for t in texts])
        return out


def _kind(prompt: str) -> str:
    if prompt == "def":
        return "probe"
    if prompt.endswith("[TESTS]\n"):
        return "tests"
    if prompt.endswith("[PYTHON]\n"):
        return "solutions"
    return "problems"


def _question(prompt: str) -> str:
    return prompt.rsplit("Problem: ", 1)[-1].split("\n")[0] if "Problem: " in prompt else ""


def _plan(out_dir, **kwargs) -> pipeline.Plan:
    kwargs.setdefault("execution", Execution(timeout=TIMEOUT, memory_mb=512, workers=2))
    kwargs.setdefault("model", "scripted")
    return pipeline.Plan(out_dir=Path(out_dir), **kwargs)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the scripted world ---------------------------------------------------------------------------------

ADD = "Write a function add(a, b) that returns the sum of two integers."
EVEN = "Write a function is_even(n) that tells whether an integer is even."
SQUARE = "Write a function slow_square(x) that returns x squared."
REVERSE = "Write a function reverse_string(s) that reverses a string."
WORDS = "Write a function reverse_words(s) that reverses the order of the words of a sentence."
DOUBLE = "Write a function double(x) that returns twice x."
TRIPLE = "Write a function triple(x) that returns three times x."
BROKEN = "Write a function mean(xs) that returns the mean of a list of numbers."
HUMANEVAL_COPY = " ".join(load_problems()["HumanEval/0"]["prompt"].split('"""')[1].split()[:16])
PROMPT_ECHO = numbered_items(ProblemGeneration().prompt)[0]


def _batch(first: int, questions: list[str]) -> str:
    return "".join(f"{first + i}. {q}\n" for i, q in enumerate(questions)) + "\nThat is all."


BATCHES = [
    _batch(4, [ADD, EVEN, SQUARE, ADD, HUMANEVAL_COPY, PROMPT_ECHO]),
    _batch(4, [REVERSE, WORDS, ADD.replace("integers.", "integers!"), DOUBLE, TRIPLE, BROKEN]),
]

TESTS = {
    ADD: "# Test case 1:\nassert add(1, 2) == 3\n# Test case 2:\nassert add(-1, 1) == 0\n[/TESTS]\nchatter",
    EVEN: "assert is_even(2)\nassert not is_even(3)\nassert is_even(0)",
    SQUARE: "assert slow_square(3) == 9\nassert slow_square(-2) == 4",
    # Vacuous: every failure is swallowed, so a solution that does nothing passes.
    REVERSE: "try:\n    assert reverse_string('ab') == 'ba'\nexcept Exception:\n    pass",
    # Case 2 is wrong: no correct solution can pass it.
    WORDS: "assert reverse_words('a b') == 'b a'\nassert reverse_words('x y') == 'x y'\nassert reverse_words('') == ''",
    DOUBLE: "assert double(2) == 4\nassert double(0) == 0",
    TRIPLE: "assert triple(1) == 3\nassert triple(2) == 6\nassert triple(0) == 0",
    BROKEN: "assert mean([1, 2]) == 1.5\nassert mean([2) == 2",
}


def _escapes(markers: dict[str, Path], port: int) -> list[str]:
    correct = "def double(x):\n    return 2 * x\n"
    return [
        f"open({str(markers['write'])!r}, 'w').write('escaped')\n{correct}",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'escaped')\n{correct}",
        f"data = open('/etc/shadow').read()\nopen({str(markers['shadow'])!r}, 'w').write(data)\n{correct}",
        f"```python\n{correct}```",
    ]


def _solutions(markers, port) -> dict[str, list[str]]:
    return {
        ADD: ["def add(a, b):\n    return a - b", "def add(a, b):\n    return a + b[/PYTHON]junk",
              "def add(a, b):\n    return sum((a, b))", ""],
        EVEN: ["def is_even(n):\n    return n % 2 == 0", "def is_even(n):\n    return not n & 1",
               "def is_even(n):\n    return n % 2 == 1", "is_even = lambda n: n % 2 == 0"],
        SQUARE: ["def slow_square(x):\n    while True:\n        pass", "def slow_square(x):\n    return x * x",
                 "def slow_square(x):\n    return x + x", "def slow_square(x):\n    return x"],
        WORDS: ["def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
                "def reverse_words(s):\n    return ' '.join(s.split()[::-1])",
                "def reverse_words(s) return s",
                "def reverse_words(s):\n    words = s.split()\n    words.reverse()\n    return ' '.join(words)"],
        DOUBLE: _escapes(markers, port),
        TRIPLE: ["def triple(x):\n    return 4 if x == 1 else 3 * x", "def triple(x):\n    return 3 if x == 2 else 3 * x",
                 "raise ValueError('no')\ndef triple(x):\n    return 3 * x", "def triple(x):\n    return 0 if x == 1 else 3 * x"],
    }  # fmt: skip


class Listener:
    """A TCP server on the host's loopback: a sandboxed program that reaches it has escaped the network namespace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.marker.write_text("a sandboxed program connected")
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def world(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    markers = {
        "write": host / "escaped-write",
        "socket": host / "escaped-socket",
        "shadow": host / "escaped-shadow",
    }
    listener = Listener(markers["socket"])
    yield markers, listener.port
    listener.close()


def test_scripted_run_keeps_exactly_the_passing_pairs_and_counts_them(tmp_path, world, tokenizer):
    markers, port = world
    backend = Scripted(BATCHES, TESTS, _solutions(markers, port))
    out = tmp_path / "run"
    plan = _plan(out, generation=ProblemGeneration(batches=2), solutions=SolutionGeneration(candidates=4),
                 chunk_size=4)  # fmt: skip
    start = time.monotonic()
    report = pipeline.run(plan, lambda model: backend)
    seconds = time.monotonic() - start

    # Nothing escaped: no marker file on the host, no connection to the host's listener.
    assert not any(m.exists() for m in markers.values()), [m for m in markers.values() if m.exists()]

    # Exactly the correct pairs, in problem order, each with the first candidate that passes.
    kept = _lines(out / "selfinstruct.jsonl")
    assert [e["id"] for e in kept] == ["gen-0-0", "gen-0-1", "gen-0-2", "gen-1-3"]
    assert [e["messages"][0]["content"] for e in kept] == [ADD, EVEN, SQUARE, DOUBLE]
    answers = [e["messages"][1]["content"] for e in kept]
    assert answers == [
        "```python\ndef add(a, b):\n    return a + b\n```",  # candidate 1: cut at [/PYTHON]
        "```python\ndef is_even(n):\n    return n % 2 == 0\n```",
        "```python\ndef slow_square(x):\n    return x * x\n```",
        "```python\ndef double(x):\n    return 2 * x\n```",  # candidate 3, its fence removed
    ]

    # Problems: 12 generated; an exact copy, a near copy, a HumanEval copy and an echo of the prompt removed.
    problems = report["problems"]
    assert (problems["seen"], problems["unique"], problems["contaminated"], problems["kept"]) == (12, 9, 1, 8)
    assert problems["removed"] == {
        "prompt_example": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "contaminated": 1,
    }
    assert problems["examples"]["contaminated"] == ["gen-0-4 (HumanEval/0)"]
    assert problems["examples"]["exact_duplicate"] == ["gen-0-3"]
    assert problems["examples"]["near_duplicate"][0].startswith("gen-1-2")

    # Tests: 8 problems; REVERSE's are vacuous, BROKEN's do not parse; 7 suites x 3 trivial solutions run.
    tests = report["tests"]
    assert tests["status"] == {"ok": 6, "syntax_error": 1, "vacuous": 1}
    assert tests["vacuous_ids"] == ["gen-1-0"] and tests["trivial_solutions_run"] == 21

    # Solutions: 6 problems x 4 candidates; one empty (not run); passing 2 + 3 + 1 + 1.
    s = report["solutions"]
    assert (s["candidates_generated"], s["candidates_run"], s["candidates_passing"]) == (24, 23, 7)
    assert s["outcomes"] == {"failed": 15, "not run": 1, "passed": 7, "timed out": 1}
    assert s["problems_with_a_passing_candidate"] == 4 and s["problems_without_a_passing_candidate"] == 2
    # WORDS: case 2 failed by every candidate that reached the tests (its third does not parse) -> a wrong test;
    # TRIPLE: candidates fail different cases -> wrong solutions.
    assert s["tests_failing_every_candidate"] == 1 and s["tests_failing_every_candidate_cases"] == {
        "gen-1-1": [2]
    }
    assert s["candidates_wrong"] == 1
    rates = {p["id"]: p["pass_rate"] for p in s["per_problem"]}
    assert rates == {
        "gen-0-0": 0.5,
        "gen-0-1": 0.75,
        "gen-0-2": 0.25,
        "gen-1-1": 0.0,
        "gen-1-3": 0.25,
        "gen-1-4": 0.0,
    }
    assert s["passing_histogram"] == {"0": 2, "1": 2, "2": 1, "3": 1, "4": 0}
    assert report["examples"]["kept"] == 4
    assert (out / "passing_per_problem.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["solutions"]["candidates_passing"] == 7

    # Every escape attempt failed inside the sandbox, and the hang cost its timeout, no more.
    double = {r["id"]: r for r in _lines(out / "solutions.jsonl")}["gen-1-3"]["candidates"]
    assert [c["passed"] for c in double] == [False, False, False, True]
    hang = {r["id"]: r for r in _lines(out / "solutions.jsonl")}["gen-0-2"]["candidates"][0]
    assert hang["result"] == "timed out"
    if hang["seconds"] is not None:  # the sandbox's own clock, where it reports one (timed alone below)
        assert TIMEOUT <= hang["seconds"] < TIMEOUT + 1.0
    print(f"scripted run: {seconds:.1f}s; sandbox {report['sandbox']}")

    # What training reads: ChatFiles takes the file as it is; only the solution (and the end token) is trained.
    docs = list(ChatFiles(str(out / "selfinstruct.jsonl"), id_field="id").documents())
    assert [conversation_messages(d.text) for d in docs] == [e["messages"] for e in kept]
    ids, labels = ChatEncoder(tokenizer).encode(kept[0]["messages"])
    trained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert trained == answers[0] + tokenizer.eos_token

    # Provenance: model, backend, sampling, seed and times on every record.
    record = _lines(out / "tests.jsonl")[0]
    assert (
        record["provenance"]["backend"] == "scripted" and record["provenance"]["sampling"]["temperature"] == 0
    )
    assert {"seed", "started", "generated", "finished"} <= set(record["provenance"])
    assert json.loads((out / "solutions.settings.json").read_text())["candidates"] == 4


def test_a_hanging_candidate_costs_its_timeout_only(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "sq", "question": SQUARE}) + "\n")
    backend = Scripted(
        tests=TESTS, solutions={SQUARE: ["def slow_square(x):\n    while True:\n        pass"]}
    )
    out = tmp_path / "run"
    kw = dict(
        problems_file=ProblemsFile(str(problems)), solutions=SolutionGeneration(candidates=1), plot=False
    )
    pipeline.run(_plan(out, stages=("problems", "tests"), **kw), lambda m: backend)
    start = time.monotonic()
    report = pipeline.run(_plan(out, stages=("solutions",), **kw), lambda m: backend)
    stage = report["seconds"]["solutions"]
    print(f"one hanging candidate: solutions stage {stage:.2f}s, run {time.monotonic() - start:.2f}s")
    assert report["solutions"]["outcomes"] == {"timed out": 1}
    assert TIMEOUT <= stage < TIMEOUT + 1.0


# --- a real model -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_real_model_runs_and_reports_honestly(tmp_path, tiny_model_dir):
    from codetune.commands.selfinstruct import selfinstruct

    short = Sampling(temperature=0.8, max_new_tokens=24)
    common = dict(
        model=str(tiny_model_dir),
        tests=UnitTestGeneration(sampling=Sampling(temperature=0.0, max_new_tokens=24)),
        solutions=SolutionGeneration(candidates=2, sampling=short),
        execution=Execution(timeout=2.0, workers=2),
        batch_size=4,
        device="cpu",
    )
    generated = selfinstruct(
        str(tmp_path / "gen"), problems=ProblemGeneration(batches=2, sampling=short), **common
    )
    batches = _lines(tmp_path / "gen" / "problem_batches.jsonl")
    assert len(batches) == 2 and all(b["provenance"]["backend"] == "transformers" for b in batches)
    assert generated["problems"]["seen"] == sum(len(b["problems"]) for b in batches)

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": ADD}) + "\n" + json.dumps({"question": EVEN}) + "\n")
    report = selfinstruct(str(tmp_path / "file"), problems_file=ProblemsFile(str(problems)), **common)
    tests = report["tests"]
    assert tests["done"] == 2 and sum(tests["status"].values()) == 2
    s = report["solutions"]
    assert s["candidates_generated"] == 2 * tests["usable"]
    assert report["examples"]["kept"] == s["problems_with_a_passing_candidate"]
    assert len(_lines(tmp_path / "file" / "selfinstruct.jsonl")) == report["examples"]["kept"]
    print("tiny model:", tests["status"], "kept", report["examples"]["kept"])


# --- resume -------------------------------------------------------------------------------------------------

RESUME_QUESTIONS = {"p1": ADD, "p2": EVEN, "p3": SQUARE, "p4": DOUBLE}


def _resume_inputs(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(json.dumps({"id": k, "question": q}) + "\n" for k, q in RESUME_QUESTIONS.items())
    )
    correct = {ADD: "def add(a, b):\n    return a + b", EVEN: "def is_even(n):\n    return n % 2 == 0",
               SQUARE: "def slow_square(x):\n    return x * x", DOUBLE: "def double(x):\n    return 2 * x"}  # fmt: skip
    solutions = {q: ["def nope(:", correct[q]] for q in RESUME_QUESTIONS.values()}
    tests = {q: TESTS[q] for q in RESUME_QUESTIONS.values()}
    return problems, tests, solutions


def _resume_plan(out, problems):
    return _plan(out, problems_file=ProblemsFile(str(problems)), solutions=SolutionGeneration(candidates=2),
                 chunk_size=1, plot=False)  # fmt: skip


def test_resume_after_a_crash_in_solutions_redoes_nothing_and_loses_nothing(tmp_path):
    problems, tests, solutions = _resume_inputs(tmp_path)
    reference = tmp_path / "reference"
    pipeline.run(_resume_plan(reference, problems), lambda m: Scripted(tests=tests, solutions=solutions))

    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected crash"):
        crashing = Scripted(tests=tests, solutions=solutions, fail_on_solutions_call=2)
        pipeline.run(_resume_plan(out, problems), lambda m: crashing)
    assert [r["id"] for r in _lines(out / "solutions.jsonl")] == ["p1"]
    with open(out / "solutions.jsonl", "a") as f:  # and a kill mid-write: half a record
        f.write('{"id": "p2", "question": "Write a fun')

    again = Scripted(tests=tests, solutions=solutions)
    report = pipeline.run(_resume_plan(out, problems), lambda m: again)
    ids = [r["id"] for r in _lines(out / "solutions.jsonl")]
    assert ids == ["p1", "p2", "p3", "p4"]  # no duplicate, none lost, the partial line gone
    asked = [q for kind, qs in again.calls if kind in ("tests", "solutions") for q in qs]
    assert asked == [EVEN, SQUARE, DOUBLE]  # tests all done before; p1's solutions not redone
    assert report["resumed"]["partial_lines_dropped"] == [str(out / "solutions.jsonl")]
    assert _lines(out / "selfinstruct.jsonl") == _lines(reference / "selfinstruct.jsonl")
    assert report["solutions"]["candidates_passing"] == 4


KILL_SCRIPT = """
import json, sys
from pathlib import Path
from tests.test_selfinstruct import Scripted, _resume_inputs, _resume_plan
from codetune.selfinstruct import pipeline
tmp = Path(sys.argv[1])
problems, tests, solutions = _resume_inputs(tmp)
pipeline.run(_resume_plan(tmp / "killed", problems), lambda m: Scripted(tests=tests, solutions=solutions, delay=2.0))
"""


@pytest.mark.slow
def test_resume_after_a_kill_during_solutions(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    log = tmp_path / "killed" / "solutions.jsonl"
    deadline = time.monotonic() + 60
    while not (log.is_file() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # during the next problem's (slow) generation
    proc.wait()
    proc.stderr.close()
    assert [r["id"] for r in _lines(log)] == ["p1"]
    problems, tests, solutions = _resume_inputs(tmp_path)
    again = Scripted(tests=tests, solutions=solutions)
    pipeline.run(_resume_plan(tmp_path / "killed", problems), lambda m: again)
    assert [r["id"] for r in _lines(log)] == ["p1", "p2", "p3", "p4"]
    assert [q for kind, qs in again.calls if kind == "solutions" for q in qs] == [EVEN, SQUARE, DOUBLE]


def test_stage_log_drops_a_partial_tail_completes_a_cut_newline_and_names_damage(tmp_path):
    path = tmp_path / "x.jsonl"
    log_ = StageLog(path, "id", {"a": 1})
    log_.append([{"id": "1"}, {"id": "2"}])
    assert json.loads((tmp_path / "x.settings.json").read_text()) == {"a": 1}
    path.write_bytes(path.read_bytes() + b'{"id": "3"}')  # whole record, newline lost
    assert list(StageLog(path, "id", {"a": 1}).records) == ["1", "2", "3"]
    assert path.read_bytes().endswith(b'{"id": "3"}\n')
    path.write_bytes(path.read_bytes() + b'{"id": "4", "x"')
    reopened = StageLog(path, "id", {"a": 1})
    assert reopened.dropped_partial_line and list(reopened.records) == ["1", "2", "3"]
    with pytest.raises(ValueError, match="other settings \\(a changed\\)"):
        StageLog(path, "id", {"a": 2})
    path.write_bytes(b'{"id": "1"}\nnot json\n{"id": "2"}\n')
    with pytest.raises(ValueError, match="x.jsonl:2: not JSON"):
        StageLog(path, "id", {"a": 1})


# --- bad input ----------------------------------------------------------------------------------------------


def test_malformed_problem_lines_are_counted_and_named_by_line(tmp_path, caplog):
    path = tmp_path / "problems.jsonl"
    lines = [
        json.dumps({"id": "a", "question": ADD}),
        '{"id": "b", "question": "unterminated',
        "[1, 2]",
        json.dumps({"id": "c", "text": "no question key"}),
        "",
        json.dumps({"id": "a", "question": EVEN}),
        json.dumps({"question": SQUARE}),
    ]
    path.write_text("\n".join(lines) + "\n")
    problems, report = read_problems_file(ProblemsFile(str(path)))
    assert [p.id for p in problems] == ["a", "line-7"]
    assert report.bad_lines == {
        "malformed_json": [2],
        "not_an_object": [3],
        "no_question": [4],
        "duplicate_id": [6],
    }
    assert (report.lines, report.malformed) == (6, 4)
    assert "malformed_json at line 2" in caplog.text and "duplicate_id at line 6" in caplog.text

    out = tmp_path / "run"
    pipeline.run(_plan(out, stages=("problems",), problems_file=ProblemsFile(str(path))), lambda m: None)
    summary = json.loads((out / "problems.summary.json").read_text())
    assert summary["source"]["malformed"] == 4 and summary["source"]["bad_lines"]["not_an_object"] == [3]
    with pytest.raises(ValueError, match=r"problems.jsonl:2: malformed JSON"):
        read_problems_file(ProblemsFile(str(path), on_error="raise"))


def test_a_model_that_cannot_generate_fails_in_one_line_before_any_work(tmp_path, tiny_model_dir):
    from codetune.commands.selfinstruct import selfinstruct

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": ADD}) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        selfinstruct(str(out), model=str(no_weights), problems_file=ProblemsFile(str(problems)))
    message = str(err.value)
    assert (
        "\n" not in message
        and message.startswith(f"model {no_weights} cannot generate:")
        and "weights" in message
    )
    assert not out.exists()  # before any work: not even the output folder

    with pytest.raises(ValueError, match="cannot generate: .*no such checkpoint"):
        load_backend("transformers", str(tmp_path / "missing"))


def test_no_sandbox_no_run_and_nothing_executed(tmp_path, monkeypatch):
    marker = tmp_path / "ran-outside-the-sandbox"
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": ADD}) + "\n")
    evil = f"open({str(marker)!r}, 'w').write('ran')\nassert add(1, 2) == 3"
    backend = Scripted(tests={ADD: evil}, solutions={ADD: [f"open({str(marker)!r}, 'w')\n"] * 10})

    def unavailable(*args, **kwargs):
        raise RuntimeError("bubblewrap (bwrap) cannot create a user namespace here")

    monkeypatch.setattr(execution, "Sandbox", unavailable)
    out = tmp_path / "run"
    with pytest.raises(
        execution.SandboxUnavailable, match="bubblewrap .* nothing was generated or run"
    ) as err:
        pipeline.run(_plan(out, problems_file=ProblemsFile(str(problems))), lambda m: backend)
    assert "\n" not in str(err.value)
    assert backend.calls == [] and not marker.exists() and not out.exists()

    class Unconfined:  # a sandbox that reports it cannot keep programs off the network
        def __init__(self, *args, **kwargs):
            self.report = types.SimpleNamespace(
                network_isolated=False, filesystem_read_only=True, warnings=("no netns",)
            )

    monkeypatch.setattr(execution, "Sandbox", Unconfined)
    with pytest.raises(execution.SandboxUnavailable, match="network_isolated"):
        pipeline.run(_plan(out, problems_file=ProblemsFile(str(problems))), lambda m: backend)
    assert backend.calls == [] and not marker.exists()


def test_bad_arguments_fail_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match="temperature 0 would sample the same solution 10 times"):
        pipeline.run(_plan(tmp_path, solutions=SolutionGeneration(sampling=Sampling(temperature=0.0))), None)
    with pytest.raises(ValueError, match="run the problems stage first"):
        pipeline.run(_plan(tmp_path, stages=("tests",)), None)
    with pytest.raises(ValueError, match=r"tests.prompt: the prompt template has no \{question\}"):
        pipeline.run(_plan(tmp_path, tests=UnitTestGeneration(prompt="Write tests. [TESTS]\n")), None)


# --- pieces -------------------------------------------------------------------------------------------------


def test_test_cases_harness_reports_which_cases_failed(tmp_path):
    from codetune.eval.sandbox import Sandbox, SandboxLimits

    suite, status, _ = testcases.parse_tests(
        'assert f(1) == 1\nx = """a\nb"""\nassert f(x) == x\nassert f(2) == 3\n'
    )
    assert status == "ok" and suite.entry_points == ("f",) and len(suite.cases) == 3
    assert suite.first_test == "assert f(1) == 1"
    identity = testcases.candidate_program("def f(v):\n    return v", suite)
    result = Sandbox(SandboxLimits(timeout=5.0), workers=1).run_many([identity])[0]
    assert not result.passed and testcases.failed_cases(result.result) == [3]
    assert testcases.parse_tests("assert f(")[1] == "syntax_error"
    assert testcases.parse_tests("print(1)")[1] == "no_asserts"
    assert testcases.parse_tests("import math\ndef g(y):\n    return h(y)\nassert g(math.pi)")[
        0
    ].entry_points == ("h",)


def test_vllm_backend_maps_the_same_settings(monkeypatch, tiny_model_dir):
    made = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            made["llm"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            made["prompts"], made["params"] = prompts, params
            out = types.SimpleNamespace(text="x", token_ids=[1, 2], finish_reason="length")
            return [types.SimpleNamespace(outputs=[out] * params.kwargs["n"]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kwargs: types.SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)

    backend = VLLMBackend(str(tiny_model_dir), seed=3, options={"dtype": "bfloat16"})
    assert made["llm"] == {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir),
                           "trust_remote_code": False, "seed": 3, "dtype": "bfloat16"}  # fmt: skip
    samples = backend.generate(
        ["a", "b"], Sampling(temperature=0.8, top_p=0.9, max_new_tokens=7), 3, ["[/T]"], 11
    )
    assert made["params"].kwargs == {"n": 3, "temperature": 0.8, "top_p": 0.9, "max_tokens": 7, "stop": ["[/T]"],
                                     "include_stop_str_in_output": False, "seed": 11}  # fmt: skip
    assert [[s.finish for s in ss] for ss in samples] == [["length"] * 3] * 2
    assert vllm_sampling_params(Sampling(temperature=0.0), 1, (), 0)["top_p"] == 1.0  # greedy, as generate()

    assert resolve_kind("auto", str(tiny_model_dir)) == "transformers"  # installed, but no GPU here
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert resolve_kind("auto", str(tiny_model_dir)) == "vllm"
    monkeypatch.delitem(sys.modules, "vllm")
    assert resolve_kind("auto", str(tiny_model_dir)) == "transformers"
    with pytest.raises(ValueError, match=r"vLLM is not installed \(pip install 'codetune\[vllm\]'\)"):
        load_backend("vllm", str(tiny_model_dir))


def test_shipped_selfinstruct_recipe_parses():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from codetune.commands.selfinstruct import selfinstruct

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(selfinstruct)
    config = parser.parse_args(["--config", str(REPO / "recipes" / "selfinstruct-tiny.yaml")])
    init = parser.instantiate_classes(config)
    assert init.model == "runs/quickstart" and init.solutions.candidates == 10
    assert isinstance(init.problems, ProblemGeneration) and init.problems.batches >= 1
