"""Code data: sources, curation, FIM, packing and the data module recipes configure."""

from codetune.data.datamodule import CodeDataModule

__all__ = ["CodeDataModule"]
