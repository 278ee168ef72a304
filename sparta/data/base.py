"""Dataset containers, the dataset registries (each reader and its dataset's facts) and the train/val/test split.

Every reader turns an official on-disk release into uint8 tensors held in memory (the largest,
Tiny-ImageNet, is 1.2 GB), so the training loader can keep them on the accelerator and never touch
the disk or Python per image again. Readers never download and never write into the data folder.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..registry import Registry


@dataclass
class ImageSet:
    """Images and labels of one split, as stored on disk: no normalisation, no augmentation."""

    images: torch.Tensor  # (N, C, H, W) uint8, contiguous
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},) int64, "
                             f"got {tuple(self.labels.shape)} {self.labels.dtype}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, start: int, stop: int) -> ImageSet:
        """Images start..stop-1 (views: slicing dim 0 of a contiguous tensor stays contiguous)."""
        return ImageSet(self.images[start:stop], self.labels[start:stop])

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: Iterable[int] | np.ndarray) -> ImageSet:
        """images (N, C, H, W) uint8 array (any strides), labels N ints."""
        a = np.ascontiguousarray(images, dtype=np.uint8)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())  # torch wants writable memory
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1).copy())
        return cls(x, y)


@dataclass
class RawDataset:
    """What a reader returns: the official train and test sets, before any validation split."""

    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]  # per channel, pixels in [0, 1]
    std: tuple[float, ...]
    default_val_size: int


@dataclass
class DatasetSplits:
    """The three splits used by training and evaluation (see ``load_dataset``)."""

    name: str
    train: ImageSet  # official train minus validation, then cut to train_subset
    val: ImageSet | None  # last val_size official training images; None when val_size == 0
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[2]  # all datasets here are square


@dataclass(frozen=True)
class DatasetFacts:
    """What is known of a dataset's official release without reading it, declared once by its reader
    (:func:`register_reader`). The reader builds its ``RawDataset`` from these numbers; commands that
    must work without the data on disk (``sparta flops CONFIG``) or check a data root before any work
    read them from ``DATASET_FACTS``."""

    name: str
    in_channels: int
    image_size: int  # pixels a side: every dataset here is square
    num_classes: int
    train_images: int  # the official training set, before the validation split
    default_val_size: int  # validation: the last this many official training images, unless data.val_size says
    # what data.root must hold (a folder or file the reader looks for); None where no single entry tells:
    # digits reads no root, MNIST takes plain or gzipped files, in the root or in MNIST/raw
    root_holds: str | None


Reader = Callable[[str | None], RawDataset]

# name -> reader(root: str | None) -> RawDataset, and name -> its facts; readers register in their modules.
DATASETS: Registry[Reader] = Registry("dataset")
DATASET_FACTS: Registry[DatasetFacts] = Registry("dataset")


def register_reader(facts: DatasetFacts) -> Callable[[Reader], Reader]:
    """Decorator: register a reader under ``facts.name`` in ``DATASETS`` and its facts in ``DATASET_FACTS``."""

    def add(reader: Reader) -> Reader:
        DATASET_FACTS.register(facts.name)(facts)
        return DATASETS.register(facts.name)(reader)

    return add


def load_dataset(name: str, root: str | os.PathLike | None, *, val_size: int | None = None,
                 train_subset: int | None = None) -> DatasetSplits:
    """Read dataset ``name`` from ``root`` and split it.

    Validation is the LAST ``val_size`` images of the official training set (default per dataset,
    5000 for the paper's 45k/5k CIFAR split); ``train_subset`` keeps only the FIRST N of the images
    left. The official test set is the test split.
    """
    reader = DATASETS.get(name)  # ConfigError listing valid names
    raw = reader(None if root is None else str(root))
    n = len(raw.train)
    val_size, n_train = split_sizes(name, n, val_size if val_size is not None else raw.default_val_size, train_subset)
    train = raw.train.subset(0, n_train)
    val = raw.train.subset(n - val_size, n) if val_size > 0 else None
    return DatasetSplits(name, train, val, raw.test, raw.num_classes, tuple(raw.mean), tuple(raw.std))


def split_sizes(name: str, n: int, val_size: int, train_subset: int | None) -> tuple[int, int]:
    """(validation images, training images) of ``n`` official training images split as
    :func:`load_dataset` splits them; one-line errors for sizes that do not fit. Also how ``sparta
    flops`` counts a dataset's training images from its facts, without reading it."""
    if not _is_int(val_size) or not 0 <= val_size < n:
        raise ConfigError(f"data.val_size must be an integer in [0, {n - 1}] for {name} "
                          f"({n} official training images, at least one must stay for training); got {val_size!r}")
    n_train = n - val_size
    if train_subset is not None:
        if not _is_int(train_subset) or not 1 <= train_subset <= n_train:
            raise ConfigError(f"data.train_subset must be an integer in [1, {n_train}] for {name} "
                              f"with val_size={val_size}; got {train_subset!r}")
        n_train = train_subset
    return val_size, n_train


def require_release(name: str, root: str | os.PathLike) -> None:
    """Refuse a data root without the folder or file ``name``'s reader looks for, before any work
    (a command's ``--data-root``; datasets whose facts name no single entry pass)."""
    holds = DATASET_FACTS.get(name).root_holds
    if holds is not None and not (Path(root) / holds).exists():
        what = holds if Path(holds).suffix else f"{holds}/ folder"
        raise DataError(f"--data-root {root} has no {what}; give the folder that holds the official {name} files")


@overload
def first_images(data: ImageSet, n: int | None) -> ImageSet: ...
@overload
def first_images(data: None, n: int | None) -> None: ...
@overload
def first_images(data: ImageSet | None, n: int | None) -> ImageSet | None: ...


def first_images(data: ImageSet | None, n: int | None) -> ImageSet | None:
    """The first ``n`` images of ``data`` (all of them when ``n`` is None or not smaller; None stays None)."""
    return data if data is None or n is None or n >= len(data) else data.subset(0, n)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# ---- helpers shared by the readers ----

def require_root(name: str, root: str | None, layout: str) -> Path:
    """The data root as a Path, or a DataError telling what folder ``data.root`` must name."""
    if root is None:
        raise DataError(f"{name}: data.root must be set to the folder containing the data, laid out as {layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{name}: expected {layout} under data.root, but {path} is not a directory")
    return path


def require_subdir(name: str, root: Path, folder: str, layout: str) -> Path:
    """root/folder, or a DataError (with a hint when root already IS the official folder)."""
    path = root / folder
    if not path.is_dir():
        hint = f" (data.root must be the folder that contains {folder}, not {folder} itself)"
        hint = hint if root.name == folder else ""
        raise DataError(f"{name}: expected {layout}; {path} does not exist{hint}")
    return path


def require_files(name: str, folder: Path, files: Iterable[str], layout: str) -> list[Path]:
    """Paths of ``files`` in ``folder``; a DataError naming the expected layout if any is missing."""
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: expected {layout} in {folder}; missing {', '.join(missing)}")
    return [folder / f for f in files]


def warn_on_md5_mismatch(name: str, expected: dict[Path, str]) -> None:
    """One warning naming every file whose md5 differs from the official release; never an error."""
    bad = [p.name for p, md5 in expected.items() if _md5(p) != md5]
    if bad:
        warnings.warn(f"{name}: md5 of {', '.join(bad)} differs from the official release "
                      "(a re-encoded or modified copy?); loading it anyway", stacklevel=3)


def _md5(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] pixel scale."""
    # Pixel-value histograms per channel: exact, and no float copy of the whole set (Tiny-ImageNet
    # would need 10 GB as float64).
    c = images.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.float64)
    for start in range(0, images.shape[0], 4096):
        chunk = images[start:start + 4096].transpose(0, 1).reshape(c, -1)  # (C, n*H*W)
        for ch in range(c):
            counts[ch] += torch.bincount(chunk[ch], minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)
    mean = (counts * v).sum(1) / n
    var = (counts * (v - mean[:, None]) ** 2).sum(1) / (n - 1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())
