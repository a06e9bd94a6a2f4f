"""Offline datasets and the partitioners that split them into non-IID sites."""

from fedloom.data.datasets import (
    DATASET_NAMES,
    Dataset,
    load_dataset,
    synthetic_site,
    synthetic_split,
    synthetic_test_set,
)
from fedloom.data.partition import (
    PartitionKind,
    PartitionSpec,
    dirichlet,
    iid,
    parse_partition,
    partition,
    quantity_skew,
    shards,
    train_val_split,
)

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "PartitionKind",
    "PartitionSpec",
    "dirichlet",
    "iid",
    "load_dataset",
    "parse_partition",
    "partition",
    "quantity_skew",
    "shards",
    "synthetic_site",
    "synthetic_split",
    "synthetic_test_set",
    "train_val_split",
]
