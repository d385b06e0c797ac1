"""Offline datasets as in-memory tensors, and the defense split carved out of the training set."""

from onp_env.data.datasets import DATASETS, Dataset, DatasetInfo, load_dataset
from onp_env.data.splits import Split, defense_split

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "Split", "defense_split", "load_dataset"]
