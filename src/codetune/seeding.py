"""One seed varies a run: the model's initialisation and the row shuffle follow ``seed_everything`` unless set.

What stays pinned on purpose, whatever the run's seed: the train/validation split (``data.split.seed``), so a
changed seed never moves documents across it, and the FIM draws (``data.fim.seed``), so every run of a recipe
trains on the same FIM layouts of the same documents.
"""

from __future__ import annotations

import os


def run_seed(seed: int | None) -> int:
    """``seed`` when given, else the run's seed (``seed_everything``, which LightningCLI calls before building
    anything; it sets ``PL_GLOBAL_SEED``), else 0."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
