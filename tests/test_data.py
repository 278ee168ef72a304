"""Dataset readers: tiny files written in each official on-disk format, plus the real data in
../shared/data when it is present."""
from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from sparta.data import DATASET_FACTS, DATASETS, load_dataset
from sparta.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- writers of the official formats

class Py2StrPickler(pickle._Pickler):
    """Writes bytes as Python-2 ``str`` (SHORT_BINSTRING/BINSTRING), as the official CIFAR files do."""

    def save_bytes(self, obj):
        n = len(obj)
        op = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")
        self.write(op + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def dump_cifar(path: Path, d: dict, style: str) -> None:
    """style: 'py2str' (like the official files), 'bytes_keys' (py3, protocol 2, b'data'), 'str_keys'."""
    with open(path, "wb") as f:
        if style == "py2str":
            Py2StrPickler(f, protocol=2).dump(d)
        elif style == "bytes_keys":
            pickle.dump(d, f, protocol=2)
        else:
            pickle.dump({k.decode(): v for k, v in d.items()}, f)


def write_cifar10(root: Path, style: str = "py2str", per_batch: int = 4) -> dict[str, tuple[np.ndarray, list]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, per_batch).tolist()
        dump_cifar(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data}, style)
        out[name] = (data, labels)
    return out


def write_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> dict[str, tuple[np.ndarray, list]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = RNG.integers(0, 100, n).tolist()
        dump_cifar(folder / name, {b"data": data, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]},
                   "py2str")
        out[name] = (data, fine)
    return out


def write_svhn(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name, n in (("train", 7), ("test", 3)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10, 1, 2, 9, 10, 5, 3][:n], dtype=np.uint8).reshape(n, 1)  # 10 means digit 0
        scipy.io.savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
        out[name] = (x, y)
    return out


TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]
TINY_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_tinyimagenet(root: Path, per_class=(3, 2, 3)) -> None:
    """Solid-colour 64x64 JPEGs: class c has colour TINY_COLORS[c]; one grayscale file tests convert("RGB")."""
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for c, (w, k) in enumerate(zip(TINY_WNIDS, per_class)):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(k):
            Image.new("RGB", (64, 64), TINY_COLORS[c]).save(folder / f"{w}_{i}.JPEG", quality=100)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i, c in enumerate([2, 0, 1, 0]):
        Image.new("RGB", (64, 64), TINY_COLORS[c]).save(base / "val" / "images" / f"val_{i}.JPEG", quality=100)
        lines.append(f"val_{i}.JPEG\t{TINY_WNIDS[c]}\t0\t0\t63\t63")
    Image.new("L", (64, 64), 77).save(base / "val" / "images" / "val_4.JPEG", quality=100)
    lines.append(f"val_4.JPEG\t{TINY_WNIDS[1]}\t1\t2\t3\t4")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def write_mnist(folder: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": (RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), 2051),
              "train-labels-idx1-ubyte": (RNG.integers(0, 10, n_train, dtype=np.uint8), 2049),
              "t10k-images-idx3-ubyte": (RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), 2051),
              "t10k-labels-idx1-ubyte": (RNG.integers(0, 10, n_test, dtype=np.uint8), 2049)}
    for name, (a, magic) in arrays.items():
        raw = idx_bytes(a, magic)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (folder / name).write_bytes(raw)
    return {k: a for k, (a, _) in arrays.items()}


def load_quiet(*args, **kw):
    """load_dataset, ignoring the md5 warning that every hand-made CIFAR file triggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*md5.*")
        return load_dataset(*args, **kw)


def data_error(match: str, *args, **kw) -> str:
    """The one-line DataError message of load_dataset(*args, **kw), checked against ``match``."""
    with pytest.raises(DataError, match=match) as e:
        load_quiet(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("style", ["py2str", "bytes_keys", "str_keys"])
def test_cifar10_pickle_styles(tmp_path, style):
    files = write_cifar10(tmp_path, style)
    s = load_quiet("cifar10", str(tmp_path), val_size=0)
    assert s.val is None and len(s.train) == 20 and len(s.test) == 4 and s.num_classes == 10
    assert s.train.images.shape == (20, 3, 32, 32) and s.train.images.dtype == torch.uint8
    assert s.train.labels.dtype == torch.int64 and s.train.images.is_contiguous()
    assert s.in_channels == 3 and s.image_size == 32 and len(s.mean) == len(s.std) == 3
    # Batches in order 1..5; row = R plane, then G, then B.
    data = np.concatenate([files[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((files[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(s.train.images.numpy(), data.reshape(20, 3, 32, 32))
    assert s.train.images[0, 1, 0, 0] == data[0, 1024]  # first green pixel
    assert s.train.labels.tolist() == labels
    assert s.test.labels.tolist() == files["test_batch"][1]


def test_cifar100_fine_labels(tmp_path):
    files = write_cifar100(tmp_path)
    s = load_quiet("cifar100", tmp_path, val_size=2)  # a Path works too
    assert s.num_classes == 100 and len(s.train) == 4 and len(s.val) == 2 and len(s.test) == 3
    assert s.train.labels.tolist() + s.val.labels.tolist() == files["train"][1]
    assert np.array_equal(s.test.images.numpy().reshape(3, -1), files["test"][0])


def test_md5_mismatch_is_one_warning(tmp_path):
    write_cifar10(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset("cifar10", str(tmp_path), val_size=0)
    md5 = [w for w in caught if "md5" in str(w.message)]
    assert len(md5) == 1 and "re-encoded" in str(md5[0].message) and "data_batch_3" in str(md5[0].message)


def test_cifar_errors(tmp_path):
    assert "data.root" in data_error("cifar-10-batches-py", "cifar10", None)
    data_error(r"expected <root>/cifar-10-batches-py/data_batch_1\.\.5", "cifar10", str(tmp_path))
    data_error("is not a directory", "cifar10", str(tmp_path / "nowhere"))
    write_cifar10(tmp_path)
    data_error("must be the folder that contains cifar-10-batches-py", "cifar10", str(tmp_path / "cifar-10-batches-py"))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    msg = data_error("missing data_batch_3", "cifar10", str(tmp_path))
    assert "test_batch" in msg and str(tmp_path) in msg
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    data_error("data_batch_3 is not a CIFAR python-version pickle", "cifar10", str(tmp_path))
    dump_cifar(tmp_path / "cifar-10-batches-py" / "data_batch_3",
               {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, "py2str")
    data_error("N x 3072 uint8", "cifar10", str(tmp_path))
    data_error("cifar-100-python/train and test", "cifar100", str(tmp_path))


def test_pickle_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    data_error("not allowed", "cifar10", str(tmp_path))
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- split semantics

def test_val_is_last_and_subset_is_first(tmp_path):
    write_cifar10(tmp_path)
    full = load_quiet("cifar10", str(tmp_path), val_size=0).train
    s = load_quiet("cifar10", str(tmp_path), val_size=5, train_subset=3)
    assert torch.equal(s.val.images, full.images[15:]) and torch.equal(s.val.labels, full.labels[15:])
    assert torch.equal(s.train.images, full.images[:3]) and torch.equal(s.train.labels, full.labels[:3])
    assert len(load_quiet("cifar10", str(tmp_path), val_size=19).train) == 1
    assert len(load_quiet("cifar10", str(tmp_path), val_size=5, train_subset=15).train) == 15
    for kw in ({"val_size": -1}, {"val_size": 20}, {}, {"val_size": 1, "train_subset": 0},
               {"val_size": 1, "train_subset": 20}, {"val_size": 2.5}):
        with pytest.raises(ConfigError) as e:  # the default val_size 5000 is larger than 20 images
            load_quiet("cifar10", str(tmp_path), **kw)
        assert "\n" not in str(e.value)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="valid: cifar10, cifar100, digits, mnist, svhn, tinyimagenet"):
        load_dataset("imagenet", "/data")
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "mnist", "svhn", "tinyimagenet"]


def test_every_reader_declares_its_facts_once(tmp_path):
    """DATASET_FACTS holds each reader's facts under the reader's name; digits (always present) agrees with
    them, and a data root without ``root_holds`` is refused by naming it."""
    assert DATASET_FACTS.names() == DATASETS.names()
    assert all(DATASET_FACTS.get(name).name == name for name in DATASET_FACTS)
    f, s = DATASET_FACTS.get("digits"), load_dataset("digits", None)
    assert (s.in_channels, s.image_size, s.num_classes, len(s.train) + len(s.val), len(s.val)) == \
        (f.in_channels, f.image_size, f.num_classes, f.train_images, f.default_val_size)
    for name in DATASET_FACTS:
        holds = DATASET_FACTS.get(name).root_holds
        if holds is not None:
            with pytest.raises(DataError, match=holds.replace(".", r"\.")):
                load_dataset(name, str(tmp_path))


# ---------------------------------------------------------------- SVHN

def test_svhn(tmp_path):
    files = write_svhn(tmp_path)
    s = load_dataset("svhn", str(tmp_path), val_size=2)
    x, y = files["train"]
    assert s.train.images.shape == (5, 3, 32, 32) and s.test.images.shape == (3, 3, 32, 32)
    assert s.train.labels.tolist() + s.val.labels.tolist() == [0, 1, 2, 9, 0, 5, 3]  # 10 -> 0
    assert np.array_equal(s.train.images.numpy(), x[..., :5].transpose(3, 2, 0, 1))  # images[n,c,h,w] = X[h,w,c,n]
    assert s.train.images[1, 2, 3, 4] == x[3, 4, 2, 1]


def test_svhn_errors(tmp_path):
    data_error(r"train_32x32\.mat and test_32x32\.mat.*missing train_32x32.mat", "svhn", str(tmp_path))
    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    data_error("variables X and y", "svhn", str(tmp_path), val_size=1)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    data_error("test_32x32.mat is not a MATLAB file", "svhn", str(tmp_path), val_size=1)


# ---------------------------------------------------------------- Tiny-ImageNet

def test_tinyimagenet(tmp_path):
    write_tinyimagenet(tmp_path)
    s = load_dataset("tinyimagenet", str(tmp_path), val_size=2)
    assert s.num_classes == 3 and s.in_channels == 3 and s.image_size == 64
    # Round-robin over classes: image 0 of classes 0,1,2, image 1 of 0,1,2, image 2 of 0,2.
    assert s.train.labels.tolist() + s.val.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 2]
    assert s.train.images.shape == (6, 3, 64, 64) and s.train.images.dtype == torch.uint8
    colors = torch.tensor(TINY_COLORS, dtype=torch.float32)
    mean_rgb = s.train.images.float().mean((2, 3))  # (N, 3)
    assert (mean_rgb - colors[s.train.labels]).abs().max() < 4  # JPEG is lossy, even at quality 100
    assert s.test.labels.tolist() == [2, 0, 1, 0, 1]  # official val = test, in annotation order
    assert (s.test.images[4].float() - 77).abs().max() < 3  # grayscale JPEG -> 3 equal channels
    assert len(s.mean) == 3 and all(0 < m < 1 for m in s.mean)


def test_tinyimagenet_errors(tmp_path):
    data_error(r"tiny-imagenet-200/ with wnids.txt.*tiny-imagenet-200 does not exist", "tinyimagenet", str(tmp_path))
    (tmp_path / "tiny-imagenet-200").mkdir()
    data_error(r"tiny-imagenet-200/ with wnids.txt.*missing .*wnids.txt", "tinyimagenet", str(tmp_path))
    (tmp_path / "tiny-imagenet-200").rmdir()
    write_tinyimagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    for f in (base / "train" / TINY_WNIDS[1] / "images").iterdir():
        f.unlink()
    data_error(f"no JPEGs in .*{TINY_WNIDS[1]}", "tinyimagenet", str(tmp_path))
    write_tinyimagenet(tmp_path / "b")
    (tmp_path / "b" / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG").unlink()
    data_error("missing .*val_2.JPEG", "tinyimagenet", str(tmp_path / "b"), val_size=1)
    write_tinyimagenet(tmp_path / "c")
    Image.new("RGB", (32, 32)).save(tmp_path / "c" / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG")
    data_error("expected 64x64", "tinyimagenet", str(tmp_path / "c"), val_size=1)


# ---------------------------------------------------------------- MNIST

@pytest.mark.parametrize("gz", [False, True])
def test_mnist(tmp_path, gz):
    a = write_mnist(tmp_path, gz)
    s = load_dataset("mnist", str(tmp_path), val_size=1)
    assert s.train.images.shape == (5, 1, 28, 28) and s.test.images.shape == (4, 1, 28, 28)
    assert np.array_equal(s.train.images[:, 0].numpy(), a["train-images-idx3-ubyte"][:5])
    assert s.val.labels.tolist() == a["train-labels-idx1-ubyte"][5:].tolist()
    assert s.test.labels.tolist() == a["t10k-labels-idx1-ubyte"].tolist()
    assert s.mean == (0.1307,) and s.in_channels == 1 and s.image_size == 28


def test_mnist_raw_subfolder_and_errors(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert len(load_dataset("mnist", str(tmp_path), val_size=1).test) == 4
    data_error("missing train-images-idx3-ubyte, train-labels", "mnist", str(tmp_path / "MNIST"))  # not MNIST/MNIST/raw
    bad = tmp_path / "bad"
    a = write_mnist(bad, gz=False)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(a["t10k-labels-idx1-ubyte"], 2051))
    data_error("magic number 2051, expected 2049", "mnist", str(bad), val_size=1)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(a["t10k-labels-idx1-ubyte"][:3], 2049))
    data_error("4 images but .* 3 labels", "mnist", str(bad), val_size=1)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(a["t10k-labels-idx1-ubyte"], 2049)[:-1])
    data_error("truncated", "mnist", str(bad), val_size=1)
    (bad / "train-images-idx3-ubyte").unlink()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    data_error("cannot read", "mnist", str(bad), val_size=1)


# ---------------------------------------------------------------- digits (bundled with scikit-learn)

def test_digits():
    s = load_dataset("digits", None)
    assert (len(s.train), len(s.val), len(s.test)) == (1097, 200, 500)
    assert s.train.images.shape == (1097, 1, 8, 8) and s.train.images.dtype == torch.uint8
    assert s.train.images.max() == 255 and s.num_classes == 10 and s.image_size == 8
    assert set(s.test.labels.tolist()) == set(range(10)) and 0 < s.mean[0] < 1 and 0 < s.std[0] < 1
    from sklearn.datasets import load_digits
    assert s.test.labels.tolist() == load_digits().target[1297:].tolist()


def test_the_digits_read_from_sklearns_file_equal_its_loader(monkeypatch):
    """The reader reads scikit-learn's CSV without importing scikit-learn; it holds what load_digits
    returns, and a release that moved the file is read through load_digits."""
    from sklearn.datasets import load_digits

    from sparta.data import digits

    d = load_digits()
    assert digits._digits_csv() is not None
    for _ in range(2):
        images, labels = digits.load_digits_arrays()
        assert np.array_equal(images, d.images) and np.array_equal(labels, d.target) and labels.dtype == np.int64
        monkeypatch.setattr(digits, "_digits_csv", lambda: None)


def test_loading_the_digits_imports_neither_scikit_learn_nor_scipy():
    """Each of the ~1 s of scikit-learn and ~0.2 s of scipy.io is paid by every process that loads the
    digits (demos, test workers, subprocess runs): neither is imported by ``import sparta.data`` or the digits."""
    code = ("import sys, sparta.data; sparta.data.load_dataset('digits', None); "
            "print(sorted(m for m in ('sklearn', 'scipy', 'scipy.io') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- real data in ../shared/data

def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    return path


def test_real_mnist():
    s = load_dataset("mnist", str(need(SHARED / "mnist")))
    assert (len(s.train), len(s.val), len(s.test)) == (55000, 5000, 10000)
    assert s.train.labels.min() == 0 and s.train.labels.max() == 9 and s.test.labels.max() == 9
    assert s.train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the famous first MNIST digits


def test_real_cifar100_subset():
    with pytest.warns(UserWarning, match="md5"):  # a prefix of the official files
        s = load_dataset("cifar100", str(need(SHARED / "cifar100-subset")), val_size=50)
    assert (len(s.train), len(s.val), len(s.test)) == (436, 50, 916)
    assert s.train.labels.max() < 100 and s.train.images.shape[1:] == (3, 32, 32)
    with open(SHARED / "cifar100-subset" / "cifar-100-python" / "test", "rb") as f:
        ref = pickle.load(f, encoding="latin1")
    assert s.test.labels.tolist() == ref["fine_labels"]
    assert np.array_equal(s.test.images.numpy().reshape(916, -1), ref["data"])


@pytest.fixture(scope="session")
def real_cifar10(tmp_path_factory) -> Path:
    script = need(SHARED / "prepare_cifar10.py")
    dest = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, str(script), str(dest)], check=True, capture_output=True)
    return dest


def test_real_cifar10(real_cifar10):
    with pytest.warns(UserWarning, match="md5"):  # JPEG re-encoded pixels: checksums differ
        s = load_dataset("cifar10", str(real_cifar10))
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000)
    with open(real_cifar10 / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        b1 = pickle.load(f, encoding="latin1")
    with open(real_cifar10 / "cifar-10-batches-py" / "data_batch_5", "rb") as f:
        b5 = pickle.load(f, encoding="latin1")
    assert s.train.labels[:100].tolist() == b1["labels"][:100]
    assert s.val.labels.tolist() == b5["labels"][5000:]  # the last 5000 of the official train set
    assert np.array_equal(s.train.images[:10].numpy().reshape(10, -1), b1["data"][:10])
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
