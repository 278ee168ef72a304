"""CIFAR-10 and CIFAR-100 from the official "python version" pickles.

The official files were pickled by Python 2: their keys are py2 ``str``, which Python 3 reads as
``b'data'`` with ``encoding="bytes"`` (files re-pickled by Python 3 have ``'data'``). Keys are
decoded so both work. Unpickling is restricted to the numpy array globals such files need, so a
file from an untrusted source cannot run code.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import (
    DatasetFacts,
    ImageSet,
    RawDataset,
    register_reader,
    require_files,
    require_root,
    require_subdir,
    warn_on_md5_mismatch,
)

CIFAR10 = DatasetFacts("cifar10", in_channels=3, image_size=32, num_classes=10, train_images=50_000,
                       default_val_size=5000, root_holds="cifar-10-batches-py")
CIFAR100 = DatasetFacts("cifar100", in_channels=3, image_size=32, num_classes=100, train_images=50_000,
                        default_val_size=5000, root_holds="cifar-100-python")

CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR100_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}

# The only globals a CIFAR pickle references: numpy arrays, dtypes and scalars, whatever module
# path the writing numpy version used (numpy.core vs numpy._core), and the bytes encoding of
# Python-3 protocol-2 pickles.
_NUMPY = {"_reconstruct": np.zeros(1).__reduce__()[0], "_frombuffer": np.zeros(1).__reduce_ex__(5)[0],
          "scalar": np.float64(0).__reduce__()[0], "ndarray": np.ndarray, "dtype": np.dtype}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in _NUMPY:
            return _NUMPY[name]
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")


def _load_batch(name: str, path: Path, label_key: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) uint8 images and (N,) labels of one pickled batch."""
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
        data, labels = np.asarray(d["data"]), np.asarray(d[label_key], dtype=np.int64)
    except Exception as e:  # not a pickle, a pickle of something else, missing keys, ...
        raise DataError(f"{name}: {path} is not a CIFAR python-version pickle with keys 'data' and "
                        f"{label_key!r} (expected {layout}): {type(e).__name__}: {e}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{name}: {path} holds data {data.shape} {data.dtype} and {labels.size} labels; expected "
                        f"N x 3072 uint8 and N labels ({layout})")
    return data.reshape(-1, 3, 32, 32), labels  # rows are the R plane, then G, then B


def _read(facts: DatasetFacts, root: str | None, train_files: list[str], test_file: str, md5: dict[str, str],
          label_key: str, layout: str, mean: tuple[float, ...], std: tuple[float, ...]) -> RawDataset:
    name, num_classes, folder = facts.name, facts.num_classes, facts.root_holds
    assert folder is not None, f"{name}'s facts name no release folder"  # CIFAR10 and CIFAR100 above do
    base = require_subdir(name, require_root(name, root, layout), folder, layout)
    paths = require_files(name, base, train_files + [test_file], layout)
    warn_on_md5_mismatch(name, {p: md5[p.name] for p in paths})
    parts = [_load_batch(name, p, label_key, layout) for p in paths]
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    for (_, y), p in zip(parts, paths):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{name}: {p} has labels outside 0..{num_classes - 1} ({layout})")
    return RawDataset(ImageSet.from_numpy(train_x, train_y), ImageSet.from_numpy(*parts[-1]),
                      num_classes, mean, std, default_val_size=facts.default_val_size)


@register_reader(CIFAR10)
def read_cifar10(root: str | None) -> RawDataset:
    """50,000 train + 10,000 test 32x32 RGB images, 10 classes."""
    layout = "<root>/cifar-10-batches-py/data_batch_1..5 and test_batch (the official python version)"
    return _read(CIFAR10, root, [f"data_batch_{i}" for i in range(1, 6)], "test_batch", CIFAR10_MD5, "labels",
                 layout, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


@register_reader(CIFAR100)
def read_cifar100(root: str | None) -> RawDataset:
    """50,000 train + 10,000 test 32x32 RGB images, 100 fine classes."""
    layout = "<root>/cifar-100-python/train and test (the official python version)"
    return _read(CIFAR100, root, ["train"], "test", CIFAR100_MD5, "fine_labels", layout,
                 mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
