"""The evaluation protocol and the best-epoch rule: one definition each, shared by training and the report."""
import math

from sparta.config import from_dict, load_config
from sparta.protocol import best_index, eval_protocol, improves
from sparta.runs import best_record


def test_protocol_of_a_config_equals_the_protocol_of_its_yaml():
    cfg = load_config(None, ["eval.steps=7", "eval.val_subset=100", "attack.eps=4/255", "eval.precision=bf16"])
    p = eval_protocol(cfg)
    assert p == eval_protocol(cfg.to_dict())  # what the report reads back from config.yaml
    assert p == {"attack": "pgd", "norm": "linf", "eps": 4 / 255, "alpha": 2 / 255, "steps": 7, "restarts": 1,
                 "random_start": True, "val_subset": 100, "test_subset": None, "bn": "eval", "precision": "bf16"}
    assert eval_protocol(from_dict({"eval": {"eps": 0.1, "norm": "l2"}}))["eps"] == 0.1


def test_protocol_of_an_old_yaml_leaves_missing_keys_unset():
    p = eval_protocol({"attack": {"eps": 0.5, "norm": "l2"}, "eval": {}})
    assert p["attack"] == "pgd" and p["eps"] == 0.5 and p["norm"] == "l2"
    assert p["steps"] is None and p["alpha"] is None and p["precision"] is None


def test_best_index_is_the_checkpoint_rule():
    def val(*vs):
        return [{"epoch": i + 1, "val_robust_acc": v} for i, v in enumerate(vs)]

    assert best_index(val(30, 41, 41, 40)) == 1  # the earliest of a tie, as best.pt keeps it
    assert best_index(val(None, None, None)) == 2  # no validation split: the final epoch
    assert best_index(val(math.nan, 20, math.inf, 10)) == 1  # not finite: never selected
    # the same answer as training's running selection over the same epochs
    best, chosen = float("-inf"), None
    for i, r in enumerate(val(30, 41, 41, 40, 41.5, 41.5)):
        if improves(r["val_robust_acc"], best):
            best, chosen = r["val_robust_acc"], i
    assert chosen == best_index(val(30, 41, 41, 40, 41.5, 41.5)) == 4


def test_report_best_record_prefers_the_summary_then_the_rule():
    recs = [{"stage": "search", "epoch": 1, "val_robust_acc": 99},
            {"stage": "train", "epoch": 1, "val_robust_acc": 40}, {"stage": "train", "epoch": 2, "val_robust_acc": 45},
            {"stage": "train", "epoch": 3, "val_robust_acc": 45}]
    assert best_record(recs, None) == 2  # last stage only, earliest of the tie
    assert best_record(recs, {"best_epoch": 3}) == 3
    assert best_record(recs, {"best_epoch": 1, "best_stage": "search"}) == 0
    assert best_record(recs, {"best_epoch": 9}) == 2  # not logged: the rule decides
