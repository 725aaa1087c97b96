"""Datasets (CIFAR-10, ImageFolder) and the labels that go with them."""
from .datasets import (
                       EXAMPLE_COLUMNS,
                       ImageSet,
                       Split,
                       SplitDataset,
                       load_dataset,
                       plant_label_noise,
)

__all__ = ["EXAMPLE_COLUMNS", "ImageSet", "Split", "SplitDataset", "load_dataset",
           "plant_label_noise"]
