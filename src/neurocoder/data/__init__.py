"""Data sets for the experiments. The core library (layers, memory) never imports this."""

from .idx import read_idx, write_idx
from .sources import DataSet, DataSetMissing, load_dataset, DATASETS

__all__ = ["read_idx", "write_idx", "DataSet", "DataSetMissing", "load_dataset", "DATASETS"]
