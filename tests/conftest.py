"""Fixtures and helpers shared by the test files (``from conftest import ...``)."""
import contextlib

import pytest
import torch
from torch import nn

from sparta.config import Config, from_dict, with_overrides
from sparta.rundir import RunDir

# Every BatchNorm network at a small size, for tests that build each one
SMALL_BN_MODELS = {
    "preact_resnet18": {"base_width": 8},
    "resnet18": {"base_width": 8},
    "vgg16_bn": {"base_width": 8},
    "vgg16_bn_hydra": {"base_width": 8},
    "wide_resnet": {"depth": 10, "widen_factor": 1},
}

# The small digits run of the in-process end-to-end tests: small_cnn, 512 training images in batches
# of 32 (16 steps an epoch), PGD-3 training, PGD-5 evaluation on 200 test images. Other files derive
# their variants with ``with_overrides(TINY, [...])``.
TINY = {
    "name": "tiny", "seed": 1, "epochs": 3, "batch_size": 32, "device": "cpu", "progress": "none",
    "data": {"name": "digits", "val_size": 100, "train_subset": 512, "augment": False},
    "model": {"name": "small_cnn", "base_width": 16},
    "optim": {"lr": 0.1, "schedule": "cosine", "warmup_epochs": 0.5},
    "attack": {"name": "pgd", "eps": 0.1, "alpha": 0.03, "steps": 3},
    "eval": {"eps": 0.1, "alpha": 0.03, "steps": 5, "test_subset": 200},
}

# The same idea as CLI overrides of configs/demo.yaml: one epoch of a width-8 small_cnn on 256 images
# (8 steps), PGD-2 training and evaluation on 64 test images. Files append their own overrides
# (a later ``key=value`` wins over an earlier one).
TINY_ARGS = ["epochs=1", "batch_size=32", "data.train_subset=256", "data.val_size=64", "model.name=small_cnn",
             "model.base_width=8", "attack.steps=2", "eval.steps=2", "eval.test_subset=64", "progress=none"]


def tiny_cfg(out_dir, *overrides: str, epochs: int | None = None, base: dict = TINY) -> Config:
    """``base`` (TINY) writing to ``out_dir``, with ``epochs`` set first (when given) and then the
    ``key=value`` ``overrides``, which may change it again."""
    first = [f"out_dir={out_dir}"] + ([f"epochs={epochs}"] if epochs is not None else [])
    return from_dict(with_overrides(base, [*first, *overrides]))


def checkpoint_of(cfg: Config, which: str = "last") -> dict:
    """The run's ``checkpoints/{which}.pt`` (``last`` or ``best``), loaded on CPU."""
    return torch.load(getattr(RunDir(cfg.run_dir), which), weights_only=True)


def untimed(records: list[dict]) -> list[dict]:
    """Metric records without their wall-clock fields, the only ones two identical runs may differ in."""
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "eval_time_s", "wall_time_s")} for r in records]


def tiny_net(seed: int = 0) -> nn.Module:
    """conv(3->8) + BN + ReLU + conv(8->16) + pooling + linear(16->10) for (N, 3, H, W) inputs, H, W >= 5;
    prunable: ``0.weight``, ``3.weight``, ``6.weight``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


class Crash(Exception):
    """Raised by the test hooks below to stop a run as a kill would."""


def crash_after(epoch: int, stage: str | None = None):
    """An ``on_epoch`` callback for ``train``: raises Crash once the record of epoch ``epoch`` (of
    stage ``stage``, when given) is reported."""
    def on_epoch(record):
        if record["epoch"] == epoch and (stage is None or record["stage"] == stage):
            raise Crash
    return on_epoch


@contextlib.contextmanager
def crash_at_step(at: int):
    """Inside the block ``sparta.train.train_step`` raises Crash when asked for optimizer step ``at``
    (a crash in the middle of an epoch), and the block must end with that Crash; the real step
    function is back afterwards."""
    import sparta.train as loop

    real_step = loop.train_step

    def crashing(*args, step, **kwargs):
        if step == at:
            raise Crash
        return real_step(*args, step=step, **kwargs)

    loop.train_step = crashing
    try:
        with pytest.raises(Crash):
            yield
    finally:
        loop.train_step = real_step


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run tiny models: one intra-op thread is fastest for them and immune to a busy
    machine, where two threads fighting over two cores slowed some tests 40x (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line_error(capsys, argv, expect: str) -> None:
    """``sparta argv`` (in this process) exits 2 with one ``error: ...`` line containing ``expect`` and no traceback."""
    from sparta.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert "Traceback" not in err[0]


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
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


@pytest.fixture(scope="module")
def digits():
    """The embedded 8x8 digits (scikit-learn's), all splits."""
    from sparta.data import load_dataset

    return load_dataset("digits", None)


def trained_digits_cnn(digits, steps: int = 200):
    """small_cnn (width 8) trained cleanly for ``steps`` SGD steps on the 8x8 digits (~97% clean accuracy
    after 200), in eval mode."""
    import torch.nn.functional as F

    from sparta.data.loader import DeviceLoader
    from sparta.models import create_model

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, mean=(0.5,), std=(0.5,), base_width=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = DeviceLoader(digits.train, 64, device="cpu", shuffle=True, augment=False)
    step, epoch = 0, 0
    while step < steps:
        for x, y in loader.epoch(epoch):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        epoch += 1
    return net.eval()
