"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn without replacement from ``n`` (``c`` correct) passes.

    1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) so large ``n`` never
    overflows or loses precision in the binomials (Chen et al. 2021, Fig. 3).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= samples, got correct={c}, samples={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per task, got n={n}: sample more or lower k")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over tasks}`` from per-task ``(samples, correct)`` counts."""
    counts = list(counts)
    if not counts:
        raise ValueError("pass@k over zero tasks is undefined")
    n_min = min(n for n, _ in counts)
    for k in ks:
        if k > n_min:
            raise ValueError(f"pass@{k} needs at least {k} samples per task, but a task has only {n_min}")
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}
