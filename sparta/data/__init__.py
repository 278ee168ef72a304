"""Datasets in their official on-disk formats, split into train/val/test, and the on-device loader.

>>> splits = load_dataset("cifar10", "/data", val_size=5000)      # 45k train, 5k val, 10k test
>>> loader = DeviceLoader(splits.train, 128, device="cuda", shuffle=True, augment=True)
>>> for x, y in loader.epoch(0): ...                                  # float [0, 1] batches on the device
"""
from . import cifar, digits, mnist, svhn, tinyimagenet  # noqa: F401  (register the readers)
from .base import (
                   DATASET_FACTS,
                   DATASETS,
                   DatasetFacts,
                   DatasetSplits,
                   ImageSet,
                   RawDataset,
                   first_images,
                   load_dataset,
                   require_release,
                   split_sizes,
)
from .loader import DeviceLoader

__all__ = ["DATASET_FACTS", "DATASETS", "DatasetFacts", "DatasetSplits", "DeviceLoader", "ImageSet", "RawDataset",
           "first_images", "load_dataset", "require_release", "split_sizes"]
