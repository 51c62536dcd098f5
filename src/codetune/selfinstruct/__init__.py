"""Self-instruct for code (Code Llama - Instruct, Rozière et al. 2023 §2.5): problems, tests, solutions, filter.

1. **problems** — a model writes numbered lists of interview-style problems, each solvable by one Python
   function (or a user's JSONL of problems is read); exact and near duplicates and problems sharing a long
   n-gram with an evaluation set (HumanEval) are removed (:mod:`.problems`, :mod:`.filtering`).
2. **tests** — a model writes unit tests per problem; tests that a trivial solution (``pass``, ...) passes are
   vacuous and rejected, run in the sandbox like everything generated (:mod:`.testcases`, :mod:`.stages`).
3. **solutions** — N candidates per problem run against its tests in the sandbox; the first that passes joins
   the instruct data set with its question (:mod:`.stages`, :mod:`.output`).

Every stage appends to a JSONL log keyed by problem id (:mod:`.stage_log`), so a crashed run continues where
it stopped; :mod:`.report` counts everything from those logs.
"""
