"""A rejected recipe is one line naming the key, the problem and the fix — moved settings say where they went."""

import pytest

from codetune.cli import main
from tests.test_cli import QUICKSTART

TINY = ["--trainer.max_steps=1"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.sentinels=starcoder"], "model.init_args.sentinels: moved"),
        (["--data.init_args.fim.sentinels=starcoder"], "fim.init_args.sentinels: moved"),
        (["--trainer.max_stpes=3"], "--trainer.max_stpes (did you mean --trainer.max_steps?)"),
        (["--trainer.max_steps=abc"], "trainer.max_steps: Expected a <class 'int'>"),
        (["--model.init_args.model.init_sed=3"], "(did you mean --model.init_args.model.init_seed?)"),
        (
            ["--trainer.strategy=codetune.model.sharding.FSDP2Strategy"],
            "write codetune.strategies.FSDP2Strategy",
        ),
    ],
)
def test_a_rejected_recipe_is_one_line_with_the_fix(args, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICKSTART), *TINY, *args])
    message = str(exit_.value)
    assert expected in message and "\n" not in message, message
