"""The bad-input catalogue, through the real CLI: each case is one line on stderr saying what is
wrong and how to fix it, exit code 2, no traceback, and nothing already written is changed.

One case of each kind (a config error, an argparse usage error, a data error, a checkpoint error
and an existing run folder: SUBPROCESS) runs as a real ``python -m sparta`` process, so the entry
point, exit status and stderr of a process stay tested. The rest call ``sparta.cli.main(argv)``
in-process: the same code, without the 2-3 s each process spends importing torch; a crash there is
recorded as a traceback and exit code 1, as a process would show it. One fixture runs them all;
each case is still its own test.
"""
import contextlib
import hashlib
import io
import os
import struct
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, write_cifar100

from sparta.cli import main
from sparta.config import from_dict, with_overrides
from sparta.experiment import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
TINY = [*TINY_ARGS, "eval.gap_subset=64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# the stand-in datasets hold 20 training images; the checkpoint's config asks for 64 val + 256 train
FEW = ["data.val_size=4", "data.train_subset=16"]

# id -> (argv with {run}, {tmp}, {new} placeholders, text the error line must contain)
CASES = {
    "missing_data_folder": (["train", DEMO, "data.name=mnist", "data.root={tmp}/nowhere"],
                            "{tmp}/nowhere is not a directory"),
    "no_data_root": (["train", DEMO, "data.name=mnist", "data.root=null"], "data.root"),
    "data_in_wrong_layout": (["train", DEMO, "data.name=cifar10", "data.root={tmp}/cifar",
                              "model.name=preact_resnet18"],
                             "cifar-10-batches-py/data_batch_1..5"),
    "wrong_dataset_for_the_models_classes": (["eval", "{run}/checkpoints/best.pt", "data.name=cifar100",
                                              "data.root={tmp}/cifar100", *FEW], "has 100 classes"),
    "wrong_image_size_for_the_model": (["eval", "{run}/checkpoints/best.pt", "data.name=mnist",
                                        "data.root={tmp}/mnist", *FEW], "28 pixels a side"),
    "unknown_model": (["train", DEMO, "model.name=resnet9000"], "unknown model 'resnet9000'; valid: "),
    "unknown_method": (["train", DEMO, "method.name=magic"], "method.name must be one of dense, static"),
    "unknown_attack": (["train", DEMO, "attack.name=cw"], "attack.name must be one of pgd, fgsm, none"),
    "unknown_dataset": (["train", DEMO, "data.name=imagenet"], "unknown dataset 'imagenet'; valid: "),
    "unknown_eval_attack": (["eval", "{run}/checkpoints/best.pt", "--attack", "fab"], "invalid choice: 'fab'"),
    "density_zero": (["train", DEMO, "method.name=static", "method.density=0"], "method.density must be in (0, 1]"),
    "density_above_one": (["train", DEMO, "method.name=static", "method.density=1.5"],
                          "method.density must be in (0, 1]"),
    "negative_eps": (["train", DEMO, "attack.eps=-8/255"], "attack.eps must be >= 0"),
    "negative_alpha": (["train", DEMO, "attack.alpha=-0.01"], "attack.alpha (step size) must be > 0"),
    "negative_steps": (["train", DEMO, "attack.steps=-1"], "attack.steps must be >= 0"),
    "batch_larger_than_dataset": (["train", DEMO, "batch_size=100000"], "larger than the 256 images"),
    "zero_epochs": (["train", DEMO, "epochs=0"], "epochs must be >= 1"),
    "malformed_yaml": (["train", "{tmp}/broken.yaml"], "is not valid YAML at line"),
    "yaml_not_a_mapping": (["train", "{tmp}/list.yaml"], "must hold a mapping"),
    "unknown_key_with_suggestion": (["train", DEMO, "optim.lrr=0.1"], "did you mean optim.lr?"),
    "wrong_value_type": (["train", DEMO, "optim.lr=fast"], "optim.lr must be of type float"),
    "override_without_equals": (["train", DEMO, "optim.lr"], "must look like key=value"),
    "out_dir_exists": (["train", DEMO, "out_dir={run}"], "already exists; pass --resume"),
    "resume_of_a_non_run": (["train", "--resume", "{tmp}"], "not a sparta run"),
    "resume_of_a_missing_folder": (["train", "--resume", "{tmp}/nowhere"], "the folder does not exist"),
    "resume_with_changed_config": (["train", "--resume", "{run}", "optim.lr=0.5", "attack.steps=7"],
                                   "resume would change optim.lr, attack.steps of"),
    "checkpoint_of_another_architecture": (["eval", "{tmp}/other_arch.pt"], "does not fit its recorded architecture"),
    "truncated_checkpoint": (["eval", "{tmp}/truncated.pt"], "cannot be read"),
    "checkpoint_without_a_config": (["eval", "{tmp}/no_config.pt"], "holds no config"),
    "not_a_checkpoint": (["eval", "{tmp}/broken.yaml"], "cannot be read"),
    "missing_checkpoint": (["eval", "{tmp}/missing.pt"], "does not exist"),
    "zero_eval_examples": (["eval", "{run}/checkpoints/best.pt", "--n-examples", "0"], "--n-examples must be >= 1"),
    "cuda_without_cuda": (["train", DEMO, "device=cuda"], "CUDA is not available"),
}
TRAIN_EXTRA = [*TINY, "out_dir={new}"]  # appended to `train CONFIG` cases (before the case's own overrides)
SUBPROCESS = {"unknown_key_with_suggestion", "unknown_eval_attack", "missing_data_folder", "truncated_checkpoint",
              "out_dir_exists"}


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_mnist(root: Path, rng: np.random.Generator) -> None:
    """20 train + 10 test random 28x28 images as the four official IDX files (big-endian headers)."""
    root.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4I", 2051, n, 28, 28) + images)
        labels = rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 2049, n) + labels)


def in_process(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` as a process would end: its exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors exit(2)
            code = e.code
        except BaseException:  # a crash must reach the "no Traceback" assertion, as from a process
            err.write(traceback.format_exc())
            code = 1
    return code, err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    run = tmp / "run"
    train(from_dict(with_overrides({}, [f"out_dir={run}", "data.name=digits", "device=cpu", *TINY])))
    (tmp / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    (tmp / "broken.yaml").write_text("epochs: [1, 2\nname: x\n")
    (tmp / "list.yaml").write_text("- epochs\n- 3\n")
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    state["model_spec"] = {**state["model_spec"], "kwargs": {"base_width": 16}}  # weights are base_width 8
    torch.save(state, tmp / "other_arch.pt")
    torch.save({k: v for k, v in state.items() if k != "config"}, tmp / "no_config.pt")
    data = (run / "checkpoints" / "best.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    rng = np.random.default_rng(0)
    write_cifar100(tmp / "cifar100")
    write_mnist(tmp / "mnist", rng)
    before = digest(run)

    def argv_of(case: str) -> list[str]:
        argv, _ = CASES[case]
        if argv[0] == "train" and argv[1] != "--resume":
            argv = [*argv[:2], *TRAIN_EXTRA, *argv[2:]]
        return [a.format(run=run, tmp=tmp, new=tmp / f"new_{case}") for a in argv]

    def launch(case: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "sparta", *argv_of(case)], env=ENV, capture_output=True,
                              text=True, timeout=300)
        return done.returncode, done.stderr

    # the processes start first and run while the in-process cases run here, in the main thread
    # (where main() may install signal handlers)
    with ThreadPoolExecutor(max_workers=2) as pool:
        launched = {case: pool.submit(launch, case) for case in CASES if case in SUBPROCESS}
        results = {case: in_process(argv_of(case)) for case in CASES if case not in SUBPROCESS}
        results.update({case: job.result() for case, job in launched.items()})
    return {"tmp": tmp, "run": run, "before": before, "results": results}


def test_catalogue_has_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(world, case):
    if case == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, err = world["results"][case]
    expect = CASES[case][1].format(tmp=world["tmp"], run=world["run"])
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert code == 2, err
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert expect in errors[0], err
    new = world["tmp"] / f"new_{case}"
    assert not (new / "checkpoints").exists()  # a refused run leaves no run behind


def test_nothing_already_written_changed(world):
    assert digest(world["run"]) == world["before"]


def test_large_step_warns_but_trains(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sparta", "train", DEMO, *TINY, f"out_dir={tmp_path / 'r'}",
                           "attack.eps=0.05", "attack.alpha=0.1"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning: attack.alpha 0.1 is larger than its eps 0.05" in done.stderr
