"""Reliability: kills, stop signals and faults lose no work; a resumed run equals an uninterrupted one.

The kill tests run real ``sparta train`` subprocesses (one intra-op thread, as the in-process
tests) and compare their final checkpoints and metrics with an uninterrupted subprocess run.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY as BASE
from conftest import TINY_ARGS, crash_at_step, tiny_cfg, untimed

from sparta import checkpoint
from sparta.cli import main
from sparta.config import with_overrides
from sparta.errors import DivergedError, Interrupted
from sparta.experiment import prepare_resume, train
from sparta.rundir import RunDir
from sparta.signals import StopRequests

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
# 16 steps an epoch, 2 epochs; a checkpoint after every step so a kill can land anywhere
ARGS = [*TINY_ARGS, "epochs=2", "data.train_subset=512", "attack.steps=3", "eval.gap_subset=64",
        "checkpoint.every_steps=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def sparta(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparta", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def saved_step(run: Path) -> int:
    """Steps in checkpoints/last.pt, or -1 while there is none (it is replaced atomically, so any
    file found there is whole)."""
    try:
        return int(torch.load(RunDir(run).last, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while saved_step(run) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"no checkpoint at step {step} within 120 s"
        time.sleep(0.01)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights and optimizer state, identical metrics and summary numbers."""
    sa, sb = (torch.load(RunDir(p).last, weights_only=True) for p in (a, b))
    assert sa["step"] == sb["step"]
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    ma, mb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)
    assert untimed(RunDir(a).read_metrics()) == untimed(RunDir(b).read_metrics())
    ja, jb = (json.loads(RunDir(p).summary.read_text()) for p in (a, b))
    for key in ("sa_best", "ra_best", "sa_final", "ra_final", "best_epoch", "steps", "robust_gap", "train_flops"):
        assert ja[key] == jb[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted subprocess run the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    code, err = finish(sparta("train", DEMO, f"out_dir={out}", *ARGS))
    assert code == 0, err
    return out


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path):
    kill_at = random.Random().randrange(1, 30)  # of 32 steps; printed on failure
    out = tmp_path / "run"
    proc = sparta("train", DEMO, f"out_dir={out}", *ARGS)
    wait_for_step(proc, out, kill_at)
    proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written is cut off
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = saved_step(out)
    assert killed_at >= kill_at  # last.pt is loadable whatever instant the kill hit
    code, err = finish(sparta("train", "--resume", str(out)))
    assert code == 0, f"killed after step {killed_at}: {err}"
    assert not list((out / "checkpoints").glob(".*.tmp")), "a temporary checkpoint was left behind"
    assert_same_run(reference, out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_and_exits_cleanly(reference, tmp_path, signum):
    out = tmp_path / "run"
    proc = sparta("train", DEMO, f"out_dir={out}", *ARGS)
    wait_for_step(proc, out, 5)
    proc.send_signal(signum)
    code, err = finish(proc)
    assert code == 128 + signum, err
    lines = err.strip().splitlines()
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {name} after step ") and "--resume" in lines[0], err
    assert "Traceback" not in err
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert saved_step(out) == step and 5 <= step < 32
    code, err = finish(sparta("train", "--resume", str(out)))
    assert code == 0, err
    assert_same_run(reference, out)


def test_a_signal_after_the_boundary_decision_is_honoured_at_the_next_boundary():
    # under torchrun one rank stopping on a signal the others did not agree on would leave them waiting
    stop = StopRequests()
    assert not stop.agree(lambda received: received)
    stop._handle(signal.SIGTERM, None)  # lands during the save that follows the decision
    stop.raise_if_requested(3, "run")  # no stop: this boundary decided to go on
    assert stop.agree(lambda received: received)
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM after step 4; .* --resume run$") as e:
        stop.raise_if_requested(4, "run")
    assert e.value.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):  # a second signal does not wait for the boundary
        stop._handle(signal.SIGINT, None)
    quiet = StopRequests()  # a rank that got nothing stops on another rank's signal
    assert quiet.agree(lambda received: max(received or 0, signal.SIGINT))
    with pytest.raises(Interrupted, match="stopped by SIGINT after step 7"):
        quiet.raise_if_requested(7, "run")


# ------------------------------------------------------------------ in-process: mid-epoch resume per method

# 12 steps an epoch (384 images), 2 epochs, a checkpoint every 5 steps; lr 0.1 without decay
TINY = with_overrides(BASE, ["seed=3", "epochs=2", "data.train_subset=384", "data.augment=true", "model.base_width=8",
                             "optim.schedule=multistep", "optim.warmup_epochs=0", "attack.steps=2", "eval.steps=2",
                             "eval.test_subset=64", "eval.gap_subset=64", "checkpoint.every_steps=5"])
ROBUST_BIRD = ["method.name=robust_bird", "method.density=0.3", "method.max_search_epochs=2",
               "model.name=preact_resnet18", "model.base_width=4"]
METHODS = {
    "dense": [],
    "flying_bird": ["method.name=flying_bird", "method.density=0.3", "method.update_every=4"],
    "robust_bird": ROBUST_BIRD,
    # the ticket is drawn from weights the search stage trained in NHWC (at base_width 4 the strided 1x1
    # shortcuts are too narrow for oneDNN's NHWC kernels: refused, see tests/test_train.py)
    "robust_bird_channels_last": [*ROBUST_BIRD, "model.base_width=16", "train.channels_last=true"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_crash_mid_epoch_resumes_from_the_step_checkpoint(tmp_path, method):
    """12 steps an epoch, a checkpoint every 5 steps: a crash at step 18 resumes from step 15, in
    the middle of epoch 2 (of the search stage, for Robust Bird)."""
    train(tiny_cfg(tmp_path / "a", *METHODS[method], base=TINY))
    with crash_at_step(18):
        train(tiny_cfg(tmp_path / "b", *METHODS[method], base=TINY))
    state = torch.load(RunDir(tmp_path / "b").last, weights_only=True)
    assert state["step"] == 15 and state["train_state"]["batch"] == 3  # mid-epoch
    torn = tmp_path / "b" / "checkpoints" / ".last.pt.k1ll3d.tmp"  # as a kill during a write leaves it
    torn.write_bytes(b"half a checkpoint")
    train(prepare_resume(tmp_path / "b", [], force=False), resume=True)
    assert not torn.exists()
    assert_same_run(tmp_path / "a", tmp_path / "b")


# ------------------------------------------------------------------------------------------------ faults

SMALL = [*ARGS, "epochs=1"]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", DEMO, f"out_dir={out}", *SMALL, "optim.lr=1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "NaN or infinite at step " in err[0], err
    bad = int(err[0].split("at step ")[1].split()[0])
    state = checkpoint.load(RunDir(out).last)
    assert state.step == bad  # everything before the bad step, nothing of it
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())
    assert not RunDir(out).summary.exists()


def test_nonfinite_loss_is_caught_without_step_checkpoints(tmp_path):
    cfg = tiny_cfg(tmp_path / "r", "optim.lr=1e30", "checkpoint.every_steps=null", base=TINY)
    with pytest.raises(DivergedError, match=r"at step \d+ \(epoch 1\)"):
        train(cfg)
    assert not RunDir(cfg.run_dir).last.exists()  # nothing non-finite was ever written


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the 4th checkpoint: write part of it, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code = main(["train", DEMO, f"out_dir={out}", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert ("could not write checkpoint" in err[0] and "No space left" in err[0]
            and "previous checkpoint is intact" in err[0])
    assert checkpoint.load(RunDir(out).last).step == 3  # the 3rd write, at step 3, is whole
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the torn temporary file is gone
