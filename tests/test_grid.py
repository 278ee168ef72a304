"""``sparta grid``: the benchmark's sparsity grid as runs (plan checked exactly), and one smoke cell
trained, evaluated and reported end to end on a stand-in SVHN in the official format."""
import json
import pickle

import numpy as np
import pytest
import scipy.io

from sparta.cli import main
from sparta.config import load_config
from sparta.grid import CHANNEL_SPARSITIES, METHODS, UNSTRUCTURED_SPARSITIES, plan_grid


def test_the_plan_is_every_method_at_each_of_its_sparsities(tmp_path):
    runs = plan_grid("cifar10", "vgg16", tmp_path / "data", tmp_path / "out")
    assert len(runs) == 6 * len(UNSTRUCTURED_SPARSITIES) + len(CHANNEL_SPARSITIES) == 27
    assert {r.role for r in runs} == set(METHODS)
    for run in runs:
        cfg = load_config(run.configs, list(run.overrides))
        assert (cfg.data.name, cfg.model.name, cfg.epochs, cfg.attack.steps) == ("cifar10", "vgg16_bn_hydra", 200, 10)
        assert cfg.method.name == ("robust_bird" if run.role == "robust_bird_channel" else run.role)
        assert cfg.run_dir == tmp_path / "out" / "runs" / run.name
        sparsity = float(run.name.rsplit("-s", 1)[1]) / 100
        if run.role == "robust_bird_channel":
            # a share of the weights, met by the number of channels kept; the search compares masks at
            # sqrt(density) of the channels (the method's default, written into the config when built)
            assert (cfg.method.pruning, cfg.method.channel_budget) == ("channel", "weights")
            assert cfg.method.channel_density == pytest.approx((1 - sparsity) ** 0.5)
        assert cfg.method.density == pytest.approx(1 - sparsity)
        if run.role == "boosting_ticket":
            assert cfg.method.search_lr == 0.01  # the paper's VGG finder lr
    names = [r.name for r in runs]
    assert "hydra-s99" in names and "flying_bird-s80" in names and "robust_bird_channel-s75" in names
    density = {r.name: load_config(r.configs, list(r.overrides)).method.density for r in runs if r.role == "hydra"}
    # exact, no 1 - 0.95 residue
    assert density == {"hydra-s80": 0.2, "hydra-s90": 0.1, "hydra-s95": 0.05, "hydra-s99": 0.01}


def test_a_subset_of_methods_and_sparsities(tmp_path):
    runs = plan_grid("svhn", "preact_resnet18", tmp_path, tmp_path / "out",
                     methods=["magnitude", "robust_bird_channel"], sparsities=[0.5])
    assert [r.name for r in runs] == ["magnitude-s50", "robust_bird_channel-s50"]
    assert load_config(runs[0].configs, list(runs[0].overrides)).optim.lr == 0.01  # SVHN's protocol


@pytest.mark.parametrize("args,expect", [
    (["--methods", "magic"], "unknown method magic"),
    (["--sparsities", "0.9,x"], "--sparsities must be numbers"),
    (["--sparsities", "1.0"], "sparsity must be in (0, 1)"),
    (["--final-n", "0"], "--final-n must be >= 1"),
])
def test_bad_grid_input_is_one_line(tmp_path, capsys, args, expect):
    from conftest import one_line_error

    one_line_error(capsys, ["grid", "--dataset", "svhn", "--model", "preact_resnet18", "--data-root", str(tmp_path),
                            "--out", str(tmp_path / "out"), *args], expect)


def test_a_data_root_without_the_dataset_is_refused(tmp_path, capsys):
    from conftest import one_line_error

    one_line_error(capsys, ["grid", "--dataset", "svhn", "--model", "preact_resnet18", "--data-root", str(tmp_path),
                            "--out", str(tmp_path / "out")], "has no train_32x32.mat")
    assert not (tmp_path / "out").exists()


def write_svhn(root, n_train=100, n_test=40, seed=0):
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        scipy.io.savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})


def test_smoke_cell_trains_evaluates_and_reports(tmp_path, capsys):
    write_svhn(tmp_path)
    out = tmp_path / "out"
    argv = ["grid", "--dataset", "svhn", "--model", "resnet18", "--data-root", str(tmp_path), "--out", str(out),
            "--methods", "magnitude,flying_bird", "--sparsities", "0.9", "--smoke", "model.base_width=4"]
    assert main(argv) == 0
    grid = json.loads((out / "grid.json").read_text())
    assert [(r["run"], r["sparsity"]) for r in grid["runs"]] == [("magnitude-s90", 0.9), ("flying_bird-s90", 0.9)]
    for row in grid["runs"]:
        assert row["density_final"] == pytest.approx(0.1, abs=0.01) and row["train_flops"] > 0
        assert 0 <= row["autoattack"] <= row["clean"] and row["n"] == 8 and row["eps"] == 0.031
        assert row["model_key"] == (f"{'Magnitude' if row['method'] == 'magnitude' else 'FlyingBird'}"
                                    "_sparta_R18_SVHN_US_90")
        sub = json.loads((out / "submissions" / row["run"] / "submission.json").read_text())
        assert sub["model_key"] == row["model_key"] and sub["normalization"]["required"] is True
        assert sub["autoattack"]["robust_acc"] == row["autoattack"] and sub["autoattack"]["eps"] == 0.031
        assert (out / "submissions" / row["run"] / "model.pt").is_file()
        with open(out / "submissions" / row["run"] / f"{row['model_key']}.pickle", "rb") as f:
            distances = pickle.load(f)
        assert len(distances) == 8 and sub["hofmn"]["n"] == 8 and sub["hofmn"]["check"]["name"] == "fmn_le_autoattack"
        assert row["fmn_robust_acc"] == sub["hofmn"]["robust_acc_at"]["0.031"]
    board = (out / "leaderboard.md").read_text()
    assert "| Name | ResNet18 90% |" in board and "| magnitude | " in board and "eps 0.031" in board
    summary = json.loads((out / "runs" / "magnitude-s90" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "finetune"]  # the pretrain's cost is counted
    assert "Robustness per training FLOP" in (out / "report" / "report.md").read_text()
    assert len(grid["robustness_per_flop"]) == 2 and any(row["on_front"] for row in grid["robustness_per_flop"])
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    assert main(argv) == 0  # a second call keeps the finished runs and their evaluations
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")} == mtimes
