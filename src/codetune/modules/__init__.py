"""LightningModules: the causal LM base and the stages that add to it."""

from codetune.modules.causal import CausalLM

__all__ = ["CausalLM"]
