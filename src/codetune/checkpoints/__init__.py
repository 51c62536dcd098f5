"""Trained models on disk: the checkpoint format (``format``), where runs keep them (``locate``), and the one way
to load a trained model back (``trained.load_trained``)."""

from codetune.checkpoints.format import TrainedCheckpoint, read_checkpoint
from codetune.checkpoints.locate import Location, locate
from codetune.checkpoints.trained import load_trained

__all__ = ["Location", "TrainedCheckpoint", "load_trained", "locate", "read_checkpoint"]
