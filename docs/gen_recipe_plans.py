"""Write `codetune plan`'s figure into the header of every recipe that has a ``# Memory (codetune plan):`` line.

python docs/gen_recipe_plans.py          # rewrite the lines
python docs/gen_recipe_plans.py --check  # exit 1 when a header differs from the planner (tests do this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MARK = "# Memory (codetune plan):"


def memory_line(recipe: Path) -> str:
    from codetune.commands.plan import parse_recipe
    from codetune.planner import GiB, recipe_plan

    plan = recipe_plan(parse_recipe(str(recipe)))
    where = f"per GPU of {plan.sharded_over} (FSDP2)" if plan.sharded_over > 1 else "on one GPU"
    fits = "/".join("yes" if v else "no" for v in plan.verdicts().values())
    sizes = "/".join(k.removesuffix(" GB") for k in plan.verdicts())
    return f"{MARK} peak {plan.peak / GiB:.1f} GiB {where}; fits {sizes} GB: {fits}"


def planned_recipes() -> list[Path]:
    return [p for p in sorted(RECIPES.glob("*.yaml")) if MARK in p.read_text(encoding="utf-8")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for recipe in planned_recipes():
        text = recipe.read_text(encoding="utf-8")
        new = re.sub(rf"^{re.escape(MARK)}.*$", memory_line(recipe), text, count=1, flags=re.M)
        if new != text:
            stale.append(recipe.name)
            if not args.check:
                recipe.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"stale memory lines (run python docs/gen_recipe_plans.py): {stale}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
