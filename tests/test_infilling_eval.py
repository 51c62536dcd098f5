"""HumanEval infilling: task derivation, the removed-text oracle, training-identical prompts, bad input."""

from __future__ import annotations

import json
import os

import pytest

from codetune.checkpoints import load_trained
from codetune.commands.evaluate import evaluate_infilling
from codetune.commands.infill import infill
from codetune.data.tokenizer import SENTINEL_SETS
from codetune.eval import infilling
from codetune.eval.humaneval import load_problems
from codetune.eval.infilling import (
    MODES,
    build_infill_prompts,
    derive_tasks,
    exact_match,
    require_sentinels,
    score_infills,
)
from codetune.eval.sandbox import Sandbox

PROBLEMS = load_problems()
FIRST_40 = dict(list(PROBLEMS.items())[:40])


@pytest.fixture(scope="module")
def tokenizer_without_sentinels():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [p["prompt"] for p in PROBLEMS.values()],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# -- task derivation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_tasks_split_the_original_program_exactly(mode):
    for task in derive_tasks(PROBLEMS, mode):
        problem = PROBLEMS[task.problem_id]
        assert task.prefix + task.middle + task.suffix == problem["prompt"] + problem["canonical_solution"]
        assert task.prefix.startswith(problem["prompt"]) and task.middle.strip()


def test_task_shapes_follow_the_mode():
    for task in derive_tasks(PROBLEMS, "single-line"):
        assert task.middle.count("\n") == 1 and task.middle.endswith("\n")
        assert task.prefix.endswith("\n") or task.prefix == PROBLEMS[task.problem_id]["prompt"]
    for task in derive_tasks(PROBLEMS, "multi-line"):
        lines = len(PROBLEMS[task.problem_id]["canonical_solution"].splitlines())
        assert task.middle.count("\n") >= min(2, lines)
    spans = derive_tasks(PROBLEMS, "random-span")
    assert any(not t.middle.endswith("\n") for t in spans)  # character spans, not whole lines


def test_derivation_is_deterministic_and_seeded():
    for mode in MODES:
        assert derive_tasks(PROBLEMS, mode, seed=3) == derive_tasks(PROBLEMS, mode, seed=3)
        assert derive_tasks(PROBLEMS, mode, seed=3) != derive_tasks(PROBLEMS, mode, seed=4)
    # A task does not depend on which other problems were derived alongside it.
    limited = derive_tasks(FIRST_40, "random-span")
    assert limited == derive_tasks(PROBLEMS, "random-span")[: len(limited)]


def test_per_problem_tasks_have_distinct_gaps():
    tasks = derive_tasks(FIRST_40, "single-line", per_problem=3)
    by_problem = {}
    for t in tasks:
        by_problem.setdefault(t.problem_id, []).append(len(t.prefix))
    assert all(len(set(v)) == len(v) for v in by_problem.values())
    assert len(tasks) > 2 * len(FIRST_40)


# -- scoring oracles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_removed_text_as_the_infill_scores_full_marks(mode):
    tasks = derive_tasks(FIRST_40, mode)
    scores, records = score_infills(tasks, [t.middle for t in tasks], Sandbox())
    assert scores == {"pass@1": 1.0, "exact_match": 1.0}
    assert len(records) == len(tasks) == 40


@pytest.mark.slow
def test_removed_text_scores_full_marks_on_all_164_problems():
    # The first 40 problems run above on every CI run; since the official sets are the default, all 164
    # derived ones are opt-in like the big official sets.
    if os.environ.get("CODETUNE_FULL_BENCHMARK_CHECK") != "1":
        pytest.skip("3 x 164 derived tasks (~30 s on 2 cores): set CODETUNE_FULL_BENCHMARK_CHECK=1")
    sandbox = Sandbox()
    for mode in MODES:
        tasks = derive_tasks(PROBLEMS, mode)
        scores, _ = score_infills(tasks, [t.middle for t in tasks], sandbox)
        assert scores == {"pass@1": 1.0, "exact_match": 1.0}, mode


def test_empty_infills_neither_match_nor_mostly_pass():
    tasks = derive_tasks(FIRST_40, "multi-line")
    scores, records = score_infills(tasks, [""] * len(tasks), Sandbox())
    assert scores["exact_match"] == 0.0 and scores["pass@1"] < 0.5
    assert all(r["generated"] == "" and r["expected"] for r in records)


def test_exact_match_ignores_only_trailing_whitespace():
    assert exact_match("    return x", "    return x\n")
    assert not exact_match("return x\n", "    return x\n")


# -- prompts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fim_format", ["psm", "spm"])
def test_eval_prompt_is_the_start_of_the_training_sequence(tokenizer, fim_format):
    from codetune.data.fim import FIMConfig, FIMSplit, FIMTransform

    tasks = derive_tasks(FIRST_40, "random-span")[:10]
    sentinels = require_sentinels(tokenizer, None)
    prompts, transform = build_infill_prompts(
        tokenizer, [(t.prefix, t.suffix) for t in tasks], fim_format, sentinels
    )
    train = FIMTransform(FIMConfig(), tokenizer, "codellama")
    for task, prompt in zip(tasks, prompts, strict=True):
        seq = train.encode_split(FIMSplit(task.prefix, task.middle, task.suffix, fim_format)).input_ids
        assert seq[: len(prompt)] == prompt
        # ...and the rest of the training sequence is the middle the model must write, then the end sentinel.
        assert seq[-1] == transform.end_id == tokenizer.convert_tokens_to_ids("<EOT>")
        assert transform.decode_middle(seq[len(prompt) : -1]) == task.middle


def test_sentinels_are_detected_from_the_tokenizer(tokenizer):
    assert require_sentinels(tokenizer, None) == SENTINEL_SETS["codellama"]
    with pytest.raises(ValueError, match=r"\['<fim_prefix>', '<fim_suffix>', '<fim_middle>'\]"):
        require_sentinels(tokenizer, "starcoder")


def test_tokenizer_without_fim_sentinels_names_the_missing_tokens(tokenizer_without_sentinels):
    with pytest.raises(ValueError, match=r"no FIM sentinel tokens \['<PRE>', '<SUF>', '<MID>', '<EOT>'\]"):
        require_sentinels(tokenizer_without_sentinels, None)


def test_tokenizer_without_sentinels_fails_the_eval_before_generating(
    tmp_path, tiny_model_dir, tokenizer_without_sentinels, monkeypatch
):
    """Checked from the tokenizer, before any weights load (minutes for a 7B; issue 14 #7), by eval and infill."""
    import shutil

    import codetune.commands.evaluate as evaluate_module
    import codetune.commands.infill as infill_module
    from codetune.commands.infill import infill

    def boom(*args, **kwargs):
        raise AssertionError("the weights were loaded before the FIM tokens were checked")

    monkeypatch.setattr(evaluate_module, "load_trained", boom)
    monkeypatch.setattr(infill_module, "load_trained", boom)

    folder = tmp_path / "no-fim"
    shutil.copytree(tiny_model_dir, folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    tokenizer_without_sentinels.save_pretrained(folder)
    with pytest.raises(ValueError, match="<PRE>"):
        evaluate_infilling(model=str(folder), tasks="derived", limit=1, out_dir=str(tmp_path))
    (tmp_path / "pre.py").write_text("def f():\n")
    with pytest.raises(ValueError, match="<PRE>"):
        infill(str(folder), str(tmp_path / "pre.py"), str(tmp_path / "pre.py"))


def test_unknown_mode_or_format_is_rejected_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown infilling mode 'whole-file'"):
        evaluate_infilling(model=str(tmp_path / "never-loaded"), mode="whole-file")
    with pytest.raises(ValueError, match="unknown FIM format 'pms'"):
        evaluate_infilling(model=str(tmp_path / "never-loaded"), format="pms")


# -- generation path -------------------------------------------------------------------------------------


def test_generation_stops_at_the_end_of_middle_sentinel(tokenizer, tiny_model_dir, monkeypatch):
    import codetune.eval.generate as gen

    seen = {}
    real = gen.generate

    def spy(model, tok, prompts, **kwargs):
        seen.update(kwargs)
        return real(model, tok, prompts, **kwargs)

    monkeypatch.setattr(infilling, "generate", spy)  # where infilling looks it up
    model, tok = load_trained(str(tiny_model_dir))
    tasks = derive_tasks(FIRST_40, "single-line")[:2]
    infilling.generate_infills(
        model, tok, [(t.prefix, t.suffix) for t in tasks], "psm", SENTINEL_SETS["codellama"], max_new_tokens=3
    )
    assert seen["stop_token_ids"] == [tokenizer.convert_tokens_to_ids("<EOT>")]


@pytest.mark.parametrize("fim_format", ["psm", "spm"])
def test_tiny_model_infilling_runs_end_to_end(tmp_path, tiny_model_dir, fim_format):
    results = evaluate_infilling(
        model=str(tiny_model_dir),
        format=fim_format,
        tasks="derived",
        limit=3,
        max_new_tokens=6,
        out_dir=str(tmp_path),
    )
    assert results["num_tasks"] == 3 and results["settings"]["format"] == fim_format
    assert results["settings"]["sentinels"]["prefix"] == "<PRE>"
    saved = json.loads((tmp_path / "infilling_results.json").read_text())
    assert saved["scores"] == results["scores"]
    records = [json.loads(line) for line in (tmp_path / "infilling_samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all("<EOT>" not in r["generated"] for r in records)


def test_infill_reads_prefix_and_suffix_files(tmp_path, tiny_model_dir):
    (tmp_path / "pre.py").write_text("def add(a, b):\n    return ")
    (tmp_path / "suf.py").write_text("\n\nprint(add(1, 2))\n")
    middle = infill(str(tiny_model_dir), str(tmp_path / "pre.py"), str(tmp_path / "suf.py"), max_new_tokens=5)
    assert isinstance(middle, str)
    with pytest.raises(FileNotFoundError, match="--suffix"):
        infill(str(tiny_model_dir), str(tmp_path / "pre.py"), str(tmp_path / "missing.py"))
