"""`sparta report` on hand-made run directories with known numbers (no training)."""
import json
import sys
from pathlib import Path

import pytest
import yaml

from sparta.cli import add_report_arguments, cmd_report
from sparta.errors import SpartaError
from sparta.report import PLOTS_SKIPPED, config_key, group_runs, load_run, stage_axis, time_to_robustness, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROTOCOL = {"attack": "pgd", "norm": "linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 20, "restarts": 1,
            "random_start": True, "val_subset": 500, "test_subset": 1000, "bn": "eval", "precision": "fp32"}


def config(name, seed, method="dense", **method_extra):
    return {"name": name, "seed": seed, "out_dir": f"runs/{name}", "epochs": 4, "progress": "none",
            "device": "cpu", "data": {"name": "cifar10", "root": f"/data/{seed}", "val_size": 5000},
            "attack": {"name": "pgd", "eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "bn_mode": "train"},
            "eval": {"attack": "pgd", "steps": 20}, "method": {"name": method, **method_extra}}


def record(stage, epoch, ra, sa, val_ra, wall, flops, density=1.0, **extra):
    return {"stage": stage, "epoch": epoch, "step": epoch * 10, "lr": 0.1, "train_loss": 1.0,
            "train_robust_acc": None if ra is None else ra + 5, "val_clean_acc": None if sa is None else sa + 1,
            "val_robust_acc": val_ra, "val_robust_loss": 1.5, "test_clean_acc": sa, "test_robust_acc": ra,
            "test_robust_loss": 1.6, "density": density, "epoch_time_s": 1.0, "eval_time_s": 0.5,
            "wall_time_s": wall, "train_flops": flops, **extra}


def write_run(path: Path, cfg, records, summary=None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def summary_of(cfg, records, best_epoch, **extra):
    best = next(r for r in records if r["epoch"] == best_epoch and r["stage"] == records[-1]["stage"])
    final = records[-1]
    return {"name": cfg["name"], "method": cfg["method"]["name"], "dataset": "cifar10", "model": "preact_resnet18",
            "seed": cfg["seed"], "sa_best": best["test_clean_acc"], "ra_best": best["test_robust_acc"],
            "sa_final": final["test_clean_acc"], "ra_final": final["test_robust_acc"],
            "robust_overfitting": best["test_robust_acc"] - final["test_robust_acc"], "best_epoch": best_epoch,
            "best_selected_on": "val_robust_acc", "epochs": 4, "steps": 40, "wall_time_s": final["wall_time_s"],
            "density_final": final["density"], "params": 1000, "eval_protocol": PROTOCOL,
            "train_attack": config("x", 0)["attack"], "device": "cpu", "torch": "2.13.0", "python": "3.11",
            **extra}


# dense, seeds 0 and 1: test RA at the best epoch (3, highest val RA) 45 / 44, final 42 / 43
DENSE = {
    0: [record("train", 1, 30, 60, 31, 10, 1e15), record("train", 2, 40, 70, 41, 20, 2e15),
        record("train", 3, 45, 75, 46, 30, 3e15), record("train", 4, 42, 74, 43, 40, 4e15)],
    1: [record("train", 1, 32, 61, 31, 11, 1.1e15), record("train", 2, 41, 71, 41, 22, 2.2e15),
        record("train", 3, 44, 77, 46, 33, 3.3e15), record("train", 4, 43, 76, 43, 44, 4.4e15)],
}
# FB+ after a 2-epoch search stage: density moves, prune-more in train epochs 2 and 3, grow-more in 4
FBPLUS = [
    record("search", 1, None, None, None, 2, 0.1e15), record("search", 2, None, None, None, 4, 0.2e15),
    record("train", 1, 35, 65, 36, 10, 0.6e15, 0.2, fbplus_prune_more=0, fbplus_grow_more=0),
    record("train", 2, 43, 72, 45, 16, 1.0e15, 0.18, fbplus_prune_more=1, fbplus_grow_more=0),
    record("train", 3, 44, 73, 44, 22, 1.4e15, 0.16, fbplus_prune_more=2, fbplus_grow_more=0),
    record("train", 4, 41, 72, 42, 28, 1.8e15, 0.17, fbplus_prune_more=0, fbplus_grow_more=1),
]


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    for seed, recs in DENSE.items():
        cfg = config(f"dense-s{seed}", seed)
        write_run(root / f"dense-s{seed}", cfg, recs,
                  summary_of(cfg, recs, 3, robust_gap=10.0 + 2 * seed, gap_subset=512, inference_flops=5.6e8))
    cfg = config("fbplus", 0, "flying_bird_plus", density=0.2)
    write_run(root / "fbplus", cfg, FBPLUS, summary_of(
        cfg, FBPLUS, 2, robust_gap=6.0, gap_subset=512, sa_overfitting=0.0, inference_flops=1.1e8,
        inference_flops_dense=5.5e8, eb_epoch=2,
        stages=[{"name": "search", "epochs": 2, "wall_time_s": 4.0, "train_flops": 0.2e15},
                {"name": "train", "epochs": 4, "wall_time_s": 24.0, "train_flops": 1.6e15}]))
    return root


def table_row(markdown: str, section: str, first_cell: str) -> list[str]:
    """Cells of the row starting with ``first_cell`` in the table under heading ``section``."""
    body = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return dict(zip(header, cells))
    raise AssertionError(f"no row {first_cell!r} under {section!r}:\n{body}")


def test_report_tables_plots_and_time_to_robustness(runs_root, tmp_path, capsys):
    out = tmp_path / "report"
    args = type("Args", (), {"run_dirs": [str(runs_root)], "out": str(out), "target_ra": None})()
    assert cmd_report(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    md = (out / "report.md").read_text()

    # per config: dense seeds averaged (sample std), RA/SA diff = best - final
    dense = table_row(md, "Results per config", "dense")
    assert dense["seeds"] == "0, 1" and dense["method"] == "dense"
    assert dense["RA best"] == "44.50 ± 0.71" and dense["RA final"] == "42.50 ± 0.71"
    assert dense["RA diff"] == "2.00 ± 1.41"  # (45-42, 44-43)
    assert (dense["SA best"] == "76.00 ± 1.41" and dense["SA final"] == "75.00 ± 1.41"
            and dense["SA diff"] == "1.00 ± 0.00")
    assert dense["robust gen. gap"] == "11.00 ± 1.41" and dense["density"] == "1.000 ± 0.000"
    assert dense["train FLOPs"] == "4.2 ± 0.283 PFLOP (100% of dense)" and dense["wall time"] == "42.0 ± 2.8 s"
    assert "method.density" in dense["settings"] or "method.name=dense" in dense["settings"]
    fb = table_row(md, "Results per config", "fbplus")
    assert fb["RA best"] == "43.00" and fb["RA final"] == "41.00" and fb["RA diff"] == "2.00"
    assert fb["SA diff"] == "0.00"  # summary's sa_overfitting is used as given
    # inference FLOPs as a share of the dense network's, where the summary has inference_flops_dense
    assert fb["density"] == "0.170" and fb["inference FLOPs"] == "110 MFLOP (20% of dense)"
    assert table_row(md, "Results per run", "fbplus")["inference FLOPs"] == "110 MFLOP (20% of dense)"
    assert table_row(md, "Results per run", "dense-s0")["inference FLOPs"] == "560 MFLOP"  # an older summary: no share

    # per run, with seeds; FB+ best epoch is in its second stage
    run = table_row(md, "Results per run", "dense-s1")
    assert run["seed"] == "1" and run["RA best"] == "44.00" and run["RA diff"] == "1.00" and run["status"] == "finished"
    assert table_row(md, "Results per run", "fbplus")["best epoch"] == "2 (train)"
    assert table_row(md, "Stages", "fbplus")["stage"] == "search"

    # no --target-ra: the target is the dense config's mean final RA (42.5), said so in the report
    assert "Time to robustness: test RA ≥ 42.50%" in md and "final test RA of the dense config `dense`" in md
    ttr = table_row(md, "Time to robustness", "fbplus")
    # reached in train epoch 2 at 16 s / 1e15 FLOPs (search stage included); dense: 30 and 33 s, 3e15 / 3.3e15
    assert ttr["wall time"] == "16.0 s" and ttr["train FLOPs"] == "1 PFLOP"
    assert ttr["wall time vs ref."] == f"{100 * 16 / 31.5:.0f}%" and ttr["FLOPs vs ref."] == f"{100 * 1 / 3.15:.0f}%"
    assert "train epoch 2 (cumulative 4)" in ttr["first reached at"]

    # how measured: protocol and device under the tables
    assert "PGD-20 (L∞, ε = 8/255, step 2/255, 1 restart, random start)" in md
    assert "test images: first 1000" in md and "device cpu" in md
    assert "RA on the first 512 training images" in md

    # plots: valid, non-empty PNGs; density only for the run whose density moves
    pngs = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert pngs == {"plots/dense-s0/accuracy.png", "plots/dense-s1/accuracy.png", "plots/fbplus/accuracy.png",
                    "plots/fbplus/density.png", "plots/ra_vs_wall_time.png", "plots/ra_vs_train_flops.png",
                    "plots/ra_vs_train_flops_pareto.png"}
    for p in pngs:
        data = (out / p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({p})" in md
    # nothing written outside --out
    assert sorted(p.name for p in (runs_root / "fbplus").iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]


def test_explicit_target_and_unfinished_run(runs_root, tmp_path):
    # a run without summary.json: numbers derived from metrics (best = highest val RA)
    cfg = config("fb-unfinished", 0, "flying_bird", density=0.2)
    recs = [record("train", 1, 20, 50, 22, 5, None, 0.2), record("train", 2, 30, 60, 35, 10, None, 0.2),
            record("train", 3, 28, 62, 33, 15, None, 0.2)]
    write_run(runs_root / "unfinished", cfg, recs)
    report = write_report([runs_root], tmp_path / "out", target_ra=44.0)
    md = report.path.read_text()
    row = table_row(md, "Results per run", "fb-unfinished")
    assert row["status"] == "unfinished (train epoch 3)" and row["best epoch"] == "2"
    assert row["RA best"] == "30.00" and row["RA final"] == "28.00" and row["RA diff"] == "2.00"
    assert row["train FLOPs"] == "-" and row["robust gen. gap"] == "-"
    assert "target = 44% (--target-ra)" in md
    assert table_row(md, "Time to robustness", "fb-unfinished")["first reached at"] == "not reached (max RA 30.00)"
    assert table_row(md, "Time to robustness", "dense-s0")["wall time"] == "30.0 s"
    assert "(from config.yaml: run unfinished)" in md


def test_time_to_robustness_counts_earlier_stages():
    recs = [record("finder", 1, 10, 50, None, 100, 5e15), record("finder", 2, 12, 55, None, 200, 10e15),
            record("train", 1, 30, 60, 31, 260, 12e15), record("train", 2, 47, 70, 46, 320, 14e15),
            record("train", 3, 49, 71, 48, 380, 16e15)]
    assert time_to_robustness(recs, 45.0) == {"wall_time_s": 320, "train_flops": 14e15, "epoch": 2, "stage": "train"}
    # the finder's own model reaches 12% at its epoch 2, but only the final stage's model counts
    assert time_to_robustness(recs, 12.0) == {"wall_time_s": 260, "train_flops": 12e15, "epoch": 1, "stage": "train"}
    assert time_to_robustness(recs, 50.0) is None
    # a stage that restarts its clock still carries the earlier stages' cost
    restarted = [dict(r) for r in recs]
    for r in restarted[2:]:
        r["wall_time_s"] -= 200
        r["train_flops"] -= 10e15
    assert time_to_robustness(restarted, 45.0) == {"wall_time_s": 320, "train_flops": 14e15, "epoch": 2,
                                                   "stage": "train"}


def test_stage_axis_counts_epochs_across_stages():
    recs = [record("search", 1, None, 50, None, 1, None), record("search", 2, None, 55, None, 2, None),
            record("train", 1, 30, 60, 31, 3, None), record("train", 2, 40, 70, 41, 4, None)]
    assert stage_axis(recs) == ([1, 2, 3, 4], [(0, "search"), (2, "train")])
    # a search that stopped early at epoch 3 (its last epoch not evaluated) and a stage with no evaluated epoch
    stages = [{"name": "search", "epochs": 3}, {"name": "slim", "epochs": 1}, {"name": "train", "epochs": 2}]
    xs, starts = stage_axis(recs, {"stages": stages})
    assert xs == [1, 2, 5, 6] and starts == [(0, "search"), (3, "slim"), (4, "train")]


def test_grouping_ignores_seed_name_out_dir(runs_root):
    a, b, fb = (load_run(runs_root / n) for n in ("dense-s0", "dense-s1", "fbplus"))
    assert config_key(a.config) == config_key(b.config) != config_key(fb.config)
    groups = group_runs([a, fb, b])
    assert [[r.name for r in g] for g in groups] == [["dense-s0", "dense-s1"], ["fbplus"]]
    changed = dict(a.config, epochs=8)
    assert config_key(changed) != config_key(a.config)


def test_not_a_run_directory_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("name: x\n")
    for path, expect in ((tmp_path / "missing", "does not exist"), (tmp_path / "half", "metrics.jsonl")):
        with pytest.raises(SpartaError, match=expect) as e:
            load_run(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(SpartaError, match="holds none below it") as e:
        write_report([tmp_path / "empty"], tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_wiring_and_bad_target(runs_root, tmp_path):
    import argparse


    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    args = parser.parse_args([str(runs_root / "dense-s0"), str(runs_root / "dense-s0"), "--out", str(tmp_path / "o"),
                              "--target-ra", "40"])
    assert args.target_ra == 40.0 and cmd_report(args) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert md.count("| dense-s0 |") == 2  # deduplicated: once per run table, once in time to robustness
    with pytest.raises(SpartaError, match="percentage"):
        write_report([runs_root], tmp_path / "o2", target_ra=150)


def test_without_matplotlib_tables_still_written(runs_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = write_report([runs_root], tmp_path / "out")
    md = report.path.read_text()
    assert PLOTS_SKIPPED in report.notes and md.count(PLOTS_SKIPPED) == 1
    assert table_row(md, "Results per config", "dense")["RA best"] == "44.50 ± 0.71"
    assert report.plots == [] and not list((tmp_path / "out").rglob("*.png"))
    # the robustness-per-FLOP table does not need matplotlib, its figure does
    assert table_row(md, "Robustness per training FLOP", "fbplus")["on front"] == "yes"
    assert "ra_vs_train_flops_pareto.png" not in md


# ---------------------------------------------------------------- robustness per training FLOP


def final_eval(path: Path, autoattack: float, n: int) -> None:
    """final-eval.json as ``sparta reproduce`` writes it (AutoAttack and PGD-20 of the final model)."""
    (path / "final-eval.json").write_text(json.dumps({"autoattack": autoattack, "pgd": autoattack + 3, "clean": 70.0,
                                                      "n": n, "pgd_steps": 20, "checks": [], "warnings": []}))


def checkpoint_eval(path: Path, robust_acc: float, n: int, eps: float = 8 / 255) -> None:
    """checkpoints/last.eval-autoattack.json as ``sparta eval ... --attack autoattack`` writes it."""
    (path / "checkpoints").mkdir(exist_ok=True)
    rows = [{"kind": "autoattack", "attack": "autoattack", "eps": eps, "n": n, "clean_acc": 70.0,
             "robust_acc": robust_acc},
            {"kind": "pgd-reference", "attack": "pgd", "eps": eps, "n": n, "clean_acc": 70.0,
             "robust_acc": robust_acc + 2}]
    (path / "checkpoints" / "last.eval-autoattack.json").write_text(json.dumps({"rows": rows, "n": n}))


def test_per_flop_section_autoattack_and_pgd_fallback(tmp_path):
    # two runs: dense with AutoAttack (final-eval.json), FB+ without: its final PGD-20 RA (41 on 1000 images)
    root = tmp_path / "runs"
    cfg = config("dense", 0)
    write_run(root / "dense", cfg, DENSE[0], summary_of(cfg, DENSE[0], 3))
    final_eval(root / "dense", 40.0, 100)
    cfg = config("fbplus", 0, "flying_bird_plus", density=0.2)
    write_run(root / "fbplus", cfg, FBPLUS, summary_of(cfg, FBPLUS, 2, train_flops=1.8e15))
    report = write_report([root], tmp_path / "out")
    md = report.path.read_text()
    section = md.split("## Robustness per training FLOP", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert [r.split("|")[1].strip() for r in rows] == ["fbplus", "dense"]  # sorted by training FLOPs

    dense = table_row(md, "Robustness per training FLOP", "dense")
    # 2 SE = 2 * 100 * sqrt(0.40 * 0.60 / 100) = 9.80
    assert dense["robust acc. ± 2 SE"] == "40.00 ± 9.80" and dense["attack"] == "AutoAttack"
    assert dense["n"] == "100" and dense["source"] == "final-eval.json"
    assert dense["train FLOPs"] == "4 PFLOP" and dense["of dense"] == "100%" and dense["density"] == "1.000"
    fb = table_row(md, "Robustness per training FLOP", "fbplus")
    # the fallback is the final epoch's test RA under the per-epoch PGD-20 on eval.test_subset (1000) images:
    # 2 * 100 * sqrt(0.41 * 0.59 / 1000) = 3.11
    assert fb["robust acc. ± 2 SE"] == "41.00 ± 3.11" and fb["attack"] == "PGD-20" and fb["n"] == "1000"
    assert fb["source"] == "metrics (final epoch)" and fb["of dense"] == "45%" and fb["density"] == "0.170"
    # different measurements are never compared: each is alone on its own front
    assert dense["on front"] == fb["on front"] == "yes (alone)"
    assert "AutoAttack, ε = 8/255, 100 test images (dense)" in section
    assert "PGD-20, ε = 8/255, 1000 test images (fbplus)" in section
    assert "dense config `dense`" in section

    flags = {d["label"]: (d["on_front"], d["attack"], d["n"], d["sources"]) for d in report.per_flop}
    assert flags == {"dense": (True, "AutoAttack", 100, ["final-eval.json"]),
                     "fbplus": (True, "PGD-20", 1000, ["metrics (final epoch)"])}
    png = tmp_path / "out" / "plots" / "ra_vs_train_flops_pareto.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and "](plots/ra_vs_train_flops_pareto.png)" in md


def test_per_flop_front_among_seeds_measured_alike(runs_root, tmp_path):
    # dense seeds: AutoAttack 40 and 42 on 100 images (mean 41); FB+ by `sparta eval`: 38 on 100 images
    final_eval(runs_root / "dense-s0", 40.0, 100)
    final_eval(runs_root / "dense-s1", 42.0, 100)
    checkpoint_eval(runs_root / "fbplus", 38.0, 100)
    md = write_report([runs_root], tmp_path / "a").path.read_text()
    dense = table_row(md, "Robustness per training FLOP", "dense")
    # SE of the mean = sqrt(0.4*0.6/100 + 0.42*0.58/100) / 2 = 3.477 points
    assert dense["seeds"] == "2" and dense["robust acc. ± 2 SE"] == "41.00 ± 6.95"
    assert dense["train FLOPs"] == "4.2 PFLOP" and dense["source"] == "final-eval.json"
    fb = table_row(md, "Robustness per training FLOP", "fbplus")
    assert fb["robust acc. ± 2 SE"] == "38.00 ± 9.71" and fb["source"] == "checkpoints/last.eval-autoattack.json"
    assert fb["of dense"] == "43%"  # 1.8 / 4.2 PFLOP
    # FB+ is cheaper, dense more robust: both on the front
    assert dense["on front"] == fb["on front"] == "yes"
    assert "Every config compared was measured with AutoAttack, ε = 8/255, 100 test images." in md

    # FB+ as robust as dense for fewer FLOPs: dense drops off the front
    checkpoint_eval(runs_root / "fbplus", 41.0, 100)
    md = write_report([runs_root], tmp_path / "b").path.read_text()
    assert table_row(md, "Robustness per training FLOP", "dense")["on front"] == "no"
    assert table_row(md, "Robustness per training FLOP", "fbplus")["on front"] == "yes"

    # FB+ on other test images: not comparable, each alone on its front
    checkpoint_eval(runs_root / "fbplus", 41.0, 500)
    md = write_report([runs_root], tmp_path / "c").path.read_text()
    assert table_row(md, "Robustness per training FLOP", "dense")["on front"] == "yes (alone)"
    assert table_row(md, "Robustness per training FLOP", "fbplus")["on front"] == "yes (alone)"


def test_per_flop_seeds_measured_differently_fall_back_to_pgd(runs_root, tmp_path):
    # only seed 0 of dense has AutoAttack: the config uses PGD for both seeds (final RA 42, 43), and says so
    final_eval(runs_root / "dense-s0", 40.0, 100)
    cfg = config("fb-unfinished", 0, "flying_bird", density=0.2)
    write_run(runs_root / "unfinished", cfg, [record("train", 1, 20, 50, 22, 5, 1e14, 0.2),
                                              record("train", 2, 30, 60, 35, 10, 2e14, 0.2)])
    report = write_report([runs_root], tmp_path / "out")
    md = report.path.read_text()
    dense = table_row(md, "Robustness per training FLOP", "dense")
    assert dense["attack"] == "PGD-20" and dense["robust acc. ± 2 SE"].startswith("42.50 ± ")
    assert dense["note"] == "AutoAttack only on 1 of 2 seeds: PGD for all seeds"
    # PGD-20 on 1000 images, compared with FB+'s PGD-20: FB+ has fewer FLOPs (1.8 < 4.2 PFLOP), less RA (41)
    assert dense["on front"] == "yes" and table_row(md, "Robustness per training FLOP", "fbplus")["on front"] == "yes"
    unfinished = table_row(md, "Robustness per training FLOP", "fb-unfinished")
    # the cheapest and not final: listed, off the front
    assert unfinished["on front"] == "-" and "unfinished: kept off the front" in unfinished["note"]
    assert [d["label"] for d in report.per_flop][0] == "fb-unfinished"


def test_per_flop_bad_eval_file_is_one_line_error(runs_root, tmp_path):
    (runs_root / "fbplus" / "final-eval.json").write_text("{not json")
    with pytest.raises(SpartaError, match="final-eval.json is not valid JSON") as e:
        write_report([runs_root], tmp_path / "out")
    assert "\n" not in str(e.value)
    final_eval(runs_root / "fbplus", 140.0, 100)
    with pytest.raises(SpartaError, match="no valid accuracy 'autoattack'"):
        write_report([runs_root], tmp_path / "out")
