"""``sparta eval --attack fmn``: minimal L∞ distances from secml-torch's FMN, the tuner, robust accuracy read
off the distances, the AutoAttack sanity check, the CLI, ``--nproc 2``; and sparta's PGD against
secml-torch's PGD on the same images."""
import json
import math
import pickle
import sys

import pytest
import torch
from conftest import one_line_error, tiny_cfg, trained_digits_cnn
from test_eval_nproc import sparta_eval
from torch import nn

from sparta.attacks import fmn
from sparta.attacks.fmn import DEFAULT_SETTING, min_norm_distances, search_space, tune_min_norm
from sparta.cli import main
from sparta.errors import SpartaError
from sparta.experiment import train
from sparta.min_norm import evaluate_min_norm, robust_accuracy_at, security_curve, write_distances
from sparta.robustness import EvalSettings, evaluate_robustness, stack_images

pytest.importorskip("secmlt")


@pytest.fixture(scope="module")
def model(digits):
    """small_cnn trained (clean) for 200 steps on the digits: ~97% clean accuracy."""
    return trained_digits_cnn(digits)


@pytest.fixture(scope="module")
def batch(digits):
    return stack_images(digits.test.subset(0, 64), 64, torch.device("cpu"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """best.pt of a small_cnn trained cleanly for 4 epochs on 512 digits (~85% clean accuracy), as in
    test_eval_nproc."""
    out = tmp_path_factory.mktemp("fmn") / "run"
    train(tiny_cfg(out, "epochs=4", "data.train_subset=512", "model.base_width=8", "attack.name=none",
                   "eval.steps=2", "eval.test_subset=64", "eval.gap_subset=null"))
    return out / "checkpoints" / "best.pt"


SMALL = ["eval.fmn.trials=3", "eval.fmn.tune_steps=20", "eval.fmn.tune_batch=16", "eval.fmn.steps=100", "eval.eps=0.1"]


def test_robust_accuracy_read_off_distances_by_hand():
    d = torch.tensor([0.0, 0.01, 0.02, math.inf, 0.05])  # misclassified, three found, one never broken
    assert robust_accuracy_at(d, 0.0) == 80.0  # everything but the misclassified image
    assert robust_accuracy_at(d, 0.01) == 60.0  # a distance equal to eps is broken at eps
    assert robust_accuracy_at(d, 0.03) == 40.0
    assert robust_accuracy_at(d, 1.0) == 20.0  # only the inf
    assert robust_accuracy_at([0.0, None, 0.5], 0.1) == pytest.approx(200 / 3)  # JSON's null is inf
    curve = security_curve(d, [0.05, 0, 0.02, 1])
    assert curve == [(0.0, 80.0), (0.02, 40.0), (0.05, 20.0), (1.0, 20.0)]
    assert all(b <= a for (_, a), (_, b) in zip(curve, curve[1:]))


def _recording(monkeypatch):
    """Every x_adv the FMN attacks hand back, in call order."""
    outputs, real = [], fmn._build_attack

    def build(setting, steps):
        attack = real(setting, steps)
        call = attack.__call__

        class Recorded:
            def __call__(self, model, loader):
                out = call(model, loader)
                outputs.append(torch.cat([x for x, _ in out]))
                return out
        return Recorded()

    monkeypatch.setattr(fmn, "_build_attack", build)
    return outputs


def test_distances_are_checked_adversarial_examples(model, batch, monkeypatch):
    x, y = batch
    outputs = _recording(monkeypatch)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.train()  # restored after; the attack itself runs in eval mode
    d = min_norm_distances(model, x, y, setting=DEFAULT_SETTING, steps=100, batch_size=64)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(g is None and p.grad is None or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    model.eval()
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    assert d.shape == (64,) and d.dtype == torch.float32 and bool((d >= 0).all())
    assert torch.equal(d == 0, ~clean_ok) and (~clean_ok).any()  # 0 exactly where misclassified clean
    found = torch.isfinite(d) & clean_ok
    assert found.sum() >= clean_ok.sum() - 1  # FMN breaks (nearly) every correctly classified image
    (x_adv,) = outputs
    with torch.no_grad():
        assert bool((model(x_adv[found]).argmax(1) != y[found]).all())
    assert bool(((x_adv >= 0) & (x_adv <= 1)).all())
    assert torch.equal((x_adv - x).flatten(1).abs().amax(1)[found], d[found])
    robust = robust_accuracy_at(d, 0.1)
    assert 0 < robust < 100.0 * float(clean_ok.float().mean())  # informative at eps 0.1


def test_outputs_that_fail_the_checks_are_dropped(model, batch, monkeypatch):
    x, y = batch

    class Noise:  # a broken "attack": random images, mostly still correctly classified or far away
        def __call__(self, model, loader):
            from torch.utils.data import DataLoader, TensorDataset
            xs, ys = next(iter(loader))
            return DataLoader(TensorDataset((xs + 0.05 * torch.randn_like(xs)).clamp(0, 1), ys), batch_size=len(xs))

    monkeypatch.setattr(fmn, "_build_attack", lambda setting, steps: Noise())
    torch.manual_seed(0)
    d, rejected = fmn.distances_of(model, x, y, setting=DEFAULT_SETTING, steps=5, batch_size=64, device="cpu")
    assert rejected > 30 and int(torch.isinf(d).sum()) >= rejected


def _exact_linf_distance(w, b, x, y):
    """The minimal L∞ distance inside [0, 1] that makes a linear classifier (logits w x + b) leave class y:
    the smallest, over classes j, budget t whose best box-clipped move sum_i |v_i| min(t, room_i) (v = w_j - w_y)
    covers the margin; found by bisection."""
    best = math.inf

    def gain(v, room, t):  # the best box-clipped move's sum_i |v_i| min(t, room_i)
        return float((v.abs() * torch.clamp(room, max=t)).sum())

    for j in range(len(w)):
        if j == y:
            continue
        v = w[j] - w[y]
        margin = float((w[y] - w[j]) @ x + b[y] - b[j])
        room = torch.where(v > 0, 1 - x, x)
        if gain(v, room, 1.0) < margin:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if gain(v, room, mid) < margin else (lo, mid)
        best = min(best, hi)
    return best


def test_linear_model_distance_matches_closed_form():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.rand(24, 1, 4, 4) * 0.8 + 0.1
    with torch.no_grad():
        y = net(x).argmax(1)  # all correct clean
    w, b = net[1].weight.detach(), net[1].bias.detach()
    exact = torch.tensor([_exact_linf_distance(w, b, x[i].flatten(), int(y[i])) for i in range(len(x))])
    d = min_norm_distances(net, x, y, setting=DEFAULT_SETTING, steps=300, batch_size=24)
    assert torch.isfinite(exact).all() and torch.isfinite(d).all()
    assert bool((d >= exact - 1e-5).all())  # no attack beats the true minimum
    assert bool((d <= exact * 1.03 + 1e-3).all()), (d / exact).max()


def test_tuner_returns_a_searched_setting_deterministically(model, digits):
    tx, ty = stack_images(digits.val, 64, torch.device("cpu"))
    best, trials = tune_min_norm(model, tx, ty, trials=5, steps=20, batch_size=16, seed=4)
    space = search_space(5, 4)
    assert [t["setting"] for t in trials] == space and space[0] == DEFAULT_SETTING
    assert best in space and all(t["images"] == 16 for t in trials)
    medians = [math.inf if t["median"] is None else t["median"] for t in trials]
    assert best == space[medians.index(min(medians))]
    again = tune_min_norm(model, tx, ty, trials=5, steps=20, batch_size=16, seed=4)
    assert again == (best, trials)
    assert search_space(13, 4) != search_space(13, 5)
    combos = {(s["loss"], s["optimizer"], s["scheduler"]) for s in search_space(13, 0)}
    assert len(combos) == 12  # every loss x optimizer x schedule once 12 trials are run


def test_cuda_is_refused_in_one_line(model, batch):
    with pytest.raises(SpartaError, match="CPU only"):
        min_norm_distances(model, *batch, steps=5, batch_size=8, device="cuda")


def test_evaluation_agrees_with_autoattack_and_writes_distances(model, digits, tmp_path):
    result = evaluate_min_norm(model, digits.test.subset(0, 48), tune_data=digits.val, trials=2, tune_steps=20,
                               tune_batch=16, steps=150, batch_size=24, seed=0, compare_autoattack=True, eps=0.1)
    checks = {c["name"]: c for c in result["checks"]}
    assert all(c["passed"] for c in result["checks"]), result["checks"]
    assert set(checks) == {"distances_valid", "robust_le_clean", "fmn_le_autoattack"}
    assert result["n"] == len(result["distances"]) == 48 and result["robust_acc"] <= result["clean_acc"]
    assert 0 < result["autoattack"]["robust_acc"] <= result["robust_acc"] + 1e-9 + 100 / 48 * 6
    assert result["robust_acc_at"]["0.1"] == result["robust_acc"]
    json.dumps(result, allow_nan=False)  # inf is null
    path = write_distances(tmp_path / "d.pickle", result["distances"])
    stored = pickle.loads(path.read_bytes())
    assert isinstance(stored, torch.Tensor) and stored.dtype == torch.float32 and stored.shape == (48,)
    assert robust_accuracy_at(stored, 0.1) == result["robust_acc"]


def test_cli_writes_json_distances_and_curve(ckpt, capsys):
    code = main(["eval", str(ckpt), "--attack", "fmn", "--n-examples", "32", *SMALL, "eval.fmn.autoattack=false"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(ckpt.with_name("best.eval-fmn.json").read_text())
    assert result["tuning_split"] == "validation" and len(result["trials"]) == 3 and result["autoattack"] is None
    stored = pickle.loads(ckpt.with_name("best.fmn-distances.pickle").read_bytes())
    assert [None if math.isinf(v) else v for v in stored.tolist()] == result["distances"]
    assert ckpt.with_name("best.fmn-security-curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "FMN robust %" in out and "best setting (3 trials)" in out and "check distances_valid: ok" in out


def test_missing_secml_torch_is_one_line(ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "secmlt", None)  # import secmlt raises ImportError
    one_line_error(capsys, ["eval", str(ckpt), "--attack", "fmn"], "pip install --no-deps secml-torch==1.5")


def test_two_processes_equal_one(ckpt):
    args = [str(ckpt), "--attack", "fmn", "--n-examples", "40", *SMALL, "eval.fmn.autoattack=false",
            "eval.batch_size=8"]  # 5 chunks: ranks take 3 and 2; 3 trials: 2 and 1
    results = []
    for extra in ([], ["--nproc", "2"]):
        run = sparta_eval(*args, *extra)
        assert run.returncode == 0, run.stderr[-3000:]
        results.append(json.loads(ckpt.with_name("best.eval-fmn.json").read_text()))
    one, two = results
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("distances", "best_setting", "trials", "robust_acc_at", "checks"):
        assert one[key] == two[key], key
    assert 0 < one["robust_acc"] < one["clean_acc"]


def test_pgd_agrees_with_secml_torch_pgd(model, digits):
    """sparta's PGD-10 and secml-torch's native PGD-10 (eps 0.1, step 0.025, random start) on the same 300
    test images agree within 2 binomial standard errors; secml-torch's at eps 0.05 would not."""
    from secmlt.adv.evasion.pgd import PGD
    from torch.utils.data import DataLoader, TensorDataset

    data = digits.test.subset(0, 300)
    ours = evaluate_robustness(model, data, EvalSettings(eps=0.1, alpha=0.025, steps=10, seed=0),
                               attack="pgd")["robust_acc"]
    x, y = stack_images(data, 300, torch.device("cpu"))

    def theirs(eps):
        torch.manual_seed(0)
        attack = PGD(perturbation_model="linf", epsilon=eps, num_steps=10, step_size=0.025, random_start=True,
                     backend="native")
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            x_adv = torch.cat([xa for xa, _ in attack(model, DataLoader(TensorDataset(x, y), batch_size=100))])
        finally:
            for p in model.parameters():
                p.requires_grad_(True)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        with torch.no_grad():
            return 100.0 * float((model(x_adv).argmax(1) == y).float().mean())

    def within(a, b):
        p = (a + b) / 200
        return abs(a - b) <= 2 * 100 * math.sqrt(p * (1 - p) / len(data))

    reference = theirs(0.1)
    assert 15 < ours < 85 and 15 < reference < 85  # informative: neither near 0% nor 100%
    assert within(ours, reference), (ours, reference)
    assert not within(ours, theirs(0.05))  # a wrong eps is detected
