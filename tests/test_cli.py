"""The CLI in-process: happy paths and bad input (one line on stderr, exit code 2)."""
import json
from pathlib import Path

import conftest
import pytest
import yaml
from conftest import one_line_error

from sparta.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = [*conftest.TINY_ARGS, "data.augment=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", str(ROOT / "configs" / "demo.yaml"), f"out_dir={out}", *TINY_ARGS]) == 0
    return out


def test_train_prints_table_and_writes_run(run_dir, capsys):
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["model"]["base_width"] == 8


def test_eval_writes_json_beside_checkpoint(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "best.pt"
    assert main(["eval", str(ckpt), "--attack", "cw", "--n-examples", "32", "eval.steps=3"]) == 0
    result = json.loads((run_dir / "checkpoints" / "best.eval-cw.json").read_text())
    assert result["n"] == 32 and result["protocol"]["steps"] == 3 and result["protocol"]["attack"] == "pgd-cw"
    assert result["robust_acc"] <= result["clean_acc"]
    assert "robust %" in capsys.readouterr().out


def test_resume_of_a_finished_run_with_more_epochs(run_dir):
    assert main(["train", "--resume", str(run_dir), "epochs=2", "--force"]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("overrides,expect", [
    (["model.name=resnet9000"], "unknown model 'resnet9000'; valid:"),
    (["data.name=imagenet"], "unknown dataset 'imagenet'; valid:"),
    (["method.name=magic"], "method.name must be one of"),
    (["optim.lrr=0.1"], "did you mean optim.lr"),
    # a setting of another method is refused, naming the chosen method's own settings
    (["method.name=robust_bird", "method.window=3"],
     "method.window is a setting of flying_bird_plus, not of robust_bird; robust_bird's settings: name, density"),
    (["batch_size=100000"], "larger than the"),
    (["data.name=mnist", "data.root=/nonexistent/folder"], "mnist"),
    (["device=cuda"], "CUDA is not available"),
])
def test_bad_train_input(tmp_path, capsys, overrides, expect):
    if "device=cuda" in overrides:
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    one_line_error(capsys, ["train", str(ROOT / "configs" / "demo.yaml"), f"out_dir={tmp_path / 'r'}", *TINY_ARGS,
                            *overrides], expect)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_existing_out_dir_is_not_touched(run_dir, capsys):
    before = (run_dir / "metrics.jsonl").read_text()
    one_line_error(capsys, ["train", str(ROOT / "configs" / "demo.yaml"), f"out_dir={run_dir}", *TINY_ARGS],
                   "already exists")
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_missing_config_and_bad_resume(tmp_path, capsys):
    one_line_error(capsys, ["train", str(tmp_path / "none.yaml")], "does not exist")
    one_line_error(capsys, ["train", "--resume", str(tmp_path)], "not a sparta run")
    one_line_error(capsys, ["eval", str(tmp_path / "missing.pt")], "does not exist")


def test_demo_says_what_its_comparison_means():
    from sparta.demo import comparison

    rows = [{"method": "dense", "density_final": 1.0, "train_flops": 100.0, "ra_final": 81.6},
            {"method": "flying_bird", "density_final": 0.2, "train_flops": 40.0, "ra_final": 79.2}]
    text = comparison(rows)
    assert text.startswith("Flying Bird kept 20% of the weights and trained at 40% of dense's training FLOPs; "
                           "its final")
    assert "2.4 points below dense's (79.2% vs 81.6%" in text and "sparta reproduce" in text


def test_table_formats_floats_and_marks_missing_values():
    from sparta.cli import table

    out = table([{"name": "a", "ra": 23.456, "n": 3}, {"name": "bb", "ra": None}],
                [("name", "run"), ("ra", "RA"), ("n", "n")])
    assert out.splitlines() == ["run    RA    n", "-----  ----  ---", "a      23.5  3", "bb     -     -"]


def test_progress_bar_only_where_asked():
    import io

    from sparta.cli import ConsoleProgress

    for mode, drawn in (("bar", True), ("auto", False), ("lines", False), ("none", False)):  # StringIO is no terminal
        stream = io.StringIO()
        assert list(ConsoleProgress(mode, stream).batches(iter(range(5)), 5, epoch=2)) == list(range(5))
        assert ("epoch 3" in stream.getvalue()) == drawn, mode
        assert drawn or stream.getvalue() == ""


def test_train_merges_several_config_files_in_order(tmp_path):
    from sparta.cli import config_files
    from sparta.config import load_config

    assert config_files("a.yaml", ["b.yml", "x=1", "c.yaml"]) == (["a.yaml", "b.yml"], ["x=1", "c.yaml"])
    cfg = load_config(*config_files(str(ROOT / "configs" / "svhn_pgd.yaml"),
                                    [str(ROOT / "configs" / "methods" / "flying_bird.yaml"), "method.density=0.05"]))
    assert (cfg.data.name, cfg.optim.lr, cfg.method.name, cfg.method.density, cfg.method.regrowth) == \
        ("svhn", 0.01, "flying_bird", 0.05, "authors")
