"""LightningModules: the causal LM base and the stages that add to it."""

from codetune.modules.causal import CausalLM
from codetune.modules.fim import FIMStage
from codetune.modules.instruct import InstructStage
from codetune.modules.long_context import LongContextStage

__all__ = ["CausalLM", "FIMStage", "InstructStage", "LongContextStage"]
