import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run tiny models: one intra-op thread is fastest for them and immune to a busy
    machine, where two threads fighting over two cores slowed some tests 40x (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_cifar100(root, n_train: int = 20, n_test: int = 10, seed: int = 0) -> None:
    """Random images and labels in the official CIFAR-100 python layout (``root/cifar-100-python/{train,test,meta}``;
    their md5s differ from the release's, which the reader only warns about): real files for the data path
    without ../shared."""
    import pickle
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),  # rows: R plane, G plane, B plane
                 "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": rng.integers(0, 20, n).tolist()}
        (folder / split).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
