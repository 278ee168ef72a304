"""Robustness evaluation beyond the training-time PGD: PGD-k with restarts, CW-L∞, AutoAttack and
sweeps over eps and steps, each reported with sanity checks that catch gradient masking.

``evaluate_robustness(model, data, attack=...)`` returns a dict (never prints): the headline clean
and robust accuracy (percent), ``rows`` (every attack setting measured, for a table), ``checks``
(``[{name, passed, detail}]``) and ``warnings`` (one string per failed check, naming the suspected
cause). :func:`sparta.evaluate.evaluate` stays the per-batch engine; every PGD evaluation starts
from a fixed torch seed (the caller's RNG state is restored afterwards), so two settings differ
only by the setting, not by the random start.

Sanity checks (Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of Security"; Carlini
et al. 2019, "On Evaluating Adversarial Robustness"), counted in examples with a tolerance of
``tolerance`` examples (PGD's random start makes single examples flip):

* ``eps0_equals_clean`` (sweep): robust accuracy at eps = 0 equals clean accuracy exactly;
  ``robust_le_clean`` (the other attacks): robust <= clean.
* ``monotone_in_eps`` (sweep): robust accuracy does not rise with eps.
* ``monotone_in_steps`` (sweep): ... nor with more PGD steps.
* ``autoattack_le_pgd`` (autoattack): AutoAttack is never above PGD (the config's eval settings)
  on the same examples.
* ``large_eps_zero`` (all): at a huge budget (L∞ eps = 1, L2 eps = the diameter of the pixel box)
  PGD must reach 0 %: an unbounded attack always succeeds unless the gradients are masked.
* AutoAttack only: ``autoattack_x_adv_valid`` (x_adv inside the eps-ball and [0, 1], finite) and
  ``autoattack_flags`` (the package's own checks: randomized/dynamic defense, probabilities instead
  of logits, zero gradients, Square beating the gradient attacks).

Chunks. Every attack runs chunk by chunk: chunk k is images [k*B, (k+1)*B) (B = ``batch_size``), and
its randomness starts from the seed ``chunk_seed(seed, k)`` (``seed`` itself for chunk 0). AutoAttack
runs once per chunk (``run_standard_evaluation`` on the chunk alone: the package re-seeds every batch
with the same seed anyway, and runs each later attack on the chunk's survivors, not on survivors
regrouped over the whole set). A chunk's result thus depends on its images and k only, so under
torchrun (``sparta eval --nproc N``) each rank takes a contiguous run of whole chunks, and the counts
(all-reduced) and per-image flags (gathered) equal a one-process run's image by image, given the same
arithmetic (CPU: the same thread count; GPU kernels may differ run to run).

AutoAttack (Croce & Hein 2020) comes from the optional ``pyautoattack`` package (``pip install
'sparta[autoattack]'``), imported only when asked for.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .attacks import build_attack
from .data.base import ImageSet
from .data.loader import DeviceLoader
from .distributed import SINGLE, Distributed
from .errors import ConfigError, SpartaError
from .evaluate import evaluate
from .fmt import eps as format_eps  # "8/255", "0.1"

__all__ = ["ATTACKS", "DEFAULT_EPS_LIST", "evaluate_robustness", "sanity_checks", "run_autoattack",
           "require_autoattack", "parse_eps_list", "format_eps", "large_eps"]

ATTACKS = ("pgd", "cw", "autoattack", "sweep")
DEFAULT_EPS_LIST = "0,2/255,4/255,8/255,16/255"
LARGE_EPS_STEPS = 20  # PGD steps of the large-eps check (step = eps/4: 4 steps cross the whole box)
AUTOATTACK_MISSING = "AutoAttack needs the pyautoattack package: pip install 'sparta[autoattack]'"
_MASKING = "suspected gradient masking (obfuscated gradients, Athalye et al. 2018)"


# --------------------------------------------------------------------------------------- helpers

def parse_eps_list(value: str | Sequence[float | str]) -> list[float]:
    """``"0,2/255,8/255"`` (or a list of numbers/fractions) -> floats; ``ConfigError`` on a bad item."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        text = str(item).strip()
        try:
            if "/" in text:
                num, den = text.split("/")
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--eps-list item {text!r} is not a number or fraction such as 8/255") from None
        if not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"--eps-list values must be finite and >= 0, got {text!r}")
        out.append(eps)
    if not out:
        raise ConfigError("--eps-list is empty; give e.g. 0,2/255,4/255,8/255")
    return out


def large_eps(norm: str, image_shape: Sequence[int]) -> float:
    """A budget that contains the whole pixel box around any image: 1 for L∞, sqrt(C*H*W) for L2."""
    return 1.0 if norm == "linf" else math.sqrt(math.prod(image_shape))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block from ``torch.manual_seed(seed)`` and restore the caller's RNG state after."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fork = torch.random.fork_rng(devices=[index], device_type="cuda")
    else:
        fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _no_input_path() -> Iterator[None]:
    """Turn autograd's "not used in the graph" (logits detached from the input) into one line."""
    try:
        yield
    except RuntimeError as e:
        if "not have been used in the graph" not in str(e) and "does not require grad" not in str(e):
            raise
        raise SpartaError("the model's logits do not depend on its input through autograd (a detach, no_grad or "
                          "non-tensor step inside forward), so gradient attacks cannot run: this is gradient "
                          "masking (obfuscated gradients, Athalye et al. 2018); evaluate the model without it") from None


def _count(acc: float, n: int) -> int:
    return int(round(acc * n / 100.0))


def require_autoattack() -> Any:
    """The ``pyautoattack`` module, or a one-line ``SpartaError`` saying how to install it."""
    try:
        import pyautoattack
        pyautoattack.AutoAttack  # noqa: B018  (a stub module without it is as good as missing)
    except (ImportError, AttributeError):
        raise SpartaError(AUTOATTACK_MISSING) from None
    return pyautoattack


# --------------------------------------------------------------------------------- sanity checks

def sanity_checks(rows: list[dict[str, Any]], *, n: int, clean_correct: int, tolerance: int = 1,
                  confirm: str = "confirm with AutoAttack") -> tuple[list[dict[str, Any]], list[str]]:
    """Checks over measured ``rows`` -> (checks, warnings).

    Each row has ``kind`` (``eval``, ``eps``, ``steps``, ``autoattack``, ``pgd-reference``,
    ``large-eps``), ``eps``, ``steps`` and ``robust_correct`` (examples still correct). A check is
    reported only when its rows are present; every failed check adds one warning.
    """
    checks: list[dict[str, Any]] = []
    warns: list[str] = []
    pct = lambda c: f"{100.0 * c / max(n, 1):.1f}% ({c}/{n})"  # noqa: E731

    def add(name: str, passed: bool, detail: str, warning: str) -> None:
        checks.append({"name": name, "passed": bool(passed), "detail": detail})
        if not passed:
            warns.append(warning)

    by_kind = lambda kind: [r for r in rows if r["kind"] == kind]  # noqa: E731
    eps_rows = sorted(by_kind("eps"), key=lambda r: r["eps"])
    zero = [r for r in eps_rows if r["eps"] == 0]
    if zero:
        got = zero[0]["robust_correct"]
        add("eps0_equals_clean", got == clean_correct, f"robust at eps=0 {pct(got)}, clean {pct(clean_correct)}",
            f"robust accuracy at eps=0 ({pct(got)}) differs from clean accuracy ({pct(clean_correct)}): the model's "
            f"predictions are not deterministic (randomized defense or train-mode layers?); {_MASKING}, "
            "evaluate with expectation over transformation (AutoAttack version='rand')")
    for r in by_kind("eval") + by_kind("autoattack"):
        got = r["robust_correct"]
        add("robust_le_clean", got <= clean_correct + tolerance,
            f"{r['attack']} robust {pct(got)} <= clean {pct(clean_correct)} (+{tolerance})",
            f"{r['attack']} robust accuracy ({pct(got)}) is above clean accuracy ({pct(clean_correct)}): the attack "
            f"makes predictions correct instead of maximising the loss; {_MASKING}; {confirm}")
    if len(eps_rows) > 1:
        bad = [(a, b) for a, b in zip(eps_rows, eps_rows[1:]) if b["robust_correct"] > a["robust_correct"] + tolerance]
        detail = ", ".join(f"{format_eps(r['eps'])}: {pct(r['robust_correct'])}" for r in eps_rows)
        add("monotone_in_eps", not bad, f"robust accuracy by eps: {detail} (tolerance {tolerance})",
            "robust accuracy rises with eps (" + "; ".join(
                f"{pct(a['robust_correct'])} at eps {format_eps(a['eps'])} -> {pct(b['robust_correct'])} at "
                f"{format_eps(b['eps'])}" for a, b in bad) + f"): {_MASKING}; {confirm}")
    steps_rows = sorted(by_kind("steps"), key=lambda r: r["steps"])
    if len(steps_rows) > 1:
        bad = [(a, b) for a, b in zip(steps_rows, steps_rows[1:])
               if b["robust_correct"] > a["robust_correct"] + tolerance]
        detail = ", ".join(f"PGD-{r['steps']}: {pct(r['robust_correct'])}" for r in steps_rows)
        add("monotone_in_steps", not bad, f"robust accuracy by steps: {detail} (tolerance {tolerance})",
            "robust accuracy rises with more PGD steps (" + "; ".join(
                f"{pct(a['robust_correct'])} at PGD-{a['steps']} -> {pct(b['robust_correct'])} at PGD-{b['steps']}"
                for a, b in bad) + f"): {_MASKING}; {confirm}")
    aa, ref = by_kind("autoattack"), by_kind("pgd-reference")
    if aa and ref:
        a, p = aa[0]["robust_correct"], ref[0]["robust_correct"]
        add("autoattack_le_pgd", a <= p + tolerance,
            f"AutoAttack {pct(a)} <= PGD-{ref[0]['steps']} {pct(p)} (+{tolerance}) on the same examples",
            f"AutoAttack robust accuracy ({pct(a)}) is above PGD-{ref[0]['steps']} ({pct(p)}) on the same examples: "
            "AutoAttack should never be weaker than PGD; check the AutoAttack settings (eps, norm) and the model "
            "(randomness, train-mode layers); " + _MASKING)
    for r in by_kind("large-eps"):
        got = r["robust_correct"]
        add("large_eps_zero", got == 0,
            f"robust {pct(got)} at eps={format_eps(r['eps'])} ({r['norm']}, PGD-{r['steps']}, step "
            f"{format_eps(r['alpha'])}): an unbounded attack must reach 0%",
            f"robust accuracy is {pct(got)} at eps={format_eps(r['eps'])} ({r['norm']}), where an unbounded attack "
            f"must always succeed: the attack's gradients are useless; {_MASKING}; {confirm}")
    return checks, warns


# ------------------------------------------------------------------------------------ AutoAttack

class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_AFTER = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
                   batch_size: int = 256, device: torch.device | str = "cpu", seed: int = 0,
                   version: str = "standard") -> tuple[Tensor, dict[str, Any]]:
    """AutoAttack (``pyautoattack``) on ``x`` (N, C, H, W) in [0, 1] and labels ``y`` -> (x_adv, info).

    The model is put in eval mode (and restored). ``info``: ``flags`` (the package's own warnings,
    which it only logs: randomized/dynamic defense, probability outputs, zero gradients, Square
    beating the gradient attacks, too many target classes), ``per_attack`` (robust accuracy in
    percent after each of its attacks, from its log), ``max_perturbation`` (in ``norm``),
    ``in_ball``, ``in_range`` and ``finite`` (x_adv checked here), ``attacks`` and
    ``target_classes``. Nothing is printed; the caller's RNG state is restored.
    """
    aa_module = require_autoattack()
    if norm not in ("linf", "l2"):
        raise ConfigError(f"AutoAttack norm must be linf or l2, got {norm!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    logger = logging.getLogger("auto-attack")
    handler = _Capture()
    saved = (logger.level, logger.propagate)
    checks_module = getattr(aa_module, "checks", None)
    if checks_module is not None and isinstance(getattr(checks_module, "funcs", None), dict):
        for key in checks_module.funcs:  # its dynamic-defense counters are global and never reset
            checks_module.funcs[key] = 0
    trace = sys.gettrace()  # its dynamic-defense check clears any tracer (debugger, coverage)
    stdout = io.StringIO()
    try:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        with _seeded(seed, device), warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(stdout), torch.autocast(device.type, enabled=False):
            warnings.simplefilter("always")
            adversary = aa_module.AutoAttack(model, eps=float(eps), norm={"linf": "Linf", "l2": "L2"}[norm],
                                             version=version, device=device, seed=seed)
            targets = min(9, num_classes - 1)
            if version == "standard" and targets >= 1:  # the package fixes 9: too many below 10 classes
                adversary.apgd_targeted.n_target_classes = targets
                adversary.fab.n_target_classes = targets
            result = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        sys.settrace(trace)
        model.train(was_training)
    x_adv = (result[0] if isinstance(result, tuple) else result).detach().to(device)

    package_dir = str(Path(aa_module.__file__).parent)
    ours = [w for w in caught if str(w.filename).startswith(package_dir)]
    flags, seen = [], set()
    for message in [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING] + \
            [str(w.message) for w in ours]:
        key = re.sub(r"[0-9.]+", "#", message)  # "there are 15 points with zero gradient", once per batch
        if key not in seen:
            seen.add(key)
            flags.append(message)
    per_attack = {}
    for record in handler.records:
        match = _AFTER.search(record.getMessage())
        if match:
            per_attack[match.group(1).lower()] = float(match.group(2))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)  # (N,)
    slack = 1e-6 if norm == "linf" else 1e-5 * max(1.0, float(eps))  # float rounding of the projection
    finite = bool(torch.isfinite(x_adv).all())
    info = {
        "package": f"pyautoattack {getattr(aa_module, '__version__', '?')}", "version": version,
        "attacks": list(adversary.attacks_to_run), "target_classes": targets, "seed": seed, "flags": flags, "per_attack": per_attack,
        "max_perturbation": float(size.max()) if len(size) else 0.0,
        "in_ball": finite and bool((size <= eps + slack).all()),
        "in_range": finite and bool(((x_adv >= 0) & (x_adv <= 1)).all()),
        "finite": finite,
        "output": stdout.getvalue().strip().splitlines(),  # anything it printed
        "other_warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught if w not in ours}),
    }
    return x_adv, info


def _replay(x_all: Tensor, x_adv_all: Tensor) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """An 'attack' handing back precomputed x_adv for the unshuffled batches of ``evaluate``."""
    offset = 0

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        nonlocal offset
        stop = offset + len(x)
        if stop > len(x_all) or not torch.equal(x_all[offset:stop], x):
            raise RuntimeError("precomputed adversarial examples do not match the evaluation batches")
        out, offset = x_adv_all[offset:stop], stop
        return out

    return attack


def _stack(data: ImageSet, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The whole set as float pixels in [0, 1] on ``device``, exactly as ``evaluate`` batches it."""
    loader = DeviceLoader(data, min(batch_size, len(data)), device=device, shuffle=False, augment=False)
    xs, ys = zip(*loader.epoch(0))
    return torch.cat(xs), torch.cat(ys)


# -------------------------------------------------------------------------------------- chunks

CHUNK_SEED_STRIDE = 1_000_003  # chunk k's seed: seed + k * stride (a prime, so chunk seeds of nearby runs differ)


def chunk_seed(seed: int, k: int) -> int:
    return seed + CHUNK_SEED_STRIDE * k


def chunks(n: int, batch_size: int, dist: Distributed = SINGLE) -> list[tuple[int, int, int]]:
    """This rank's chunks ``(k, start, stop)``: a contiguous run of the ceil(n / batch_size) chunks."""
    first, last = dist.shard(math.ceil(n / batch_size))
    return [(k, k * batch_size, min((k + 1) * batch_size, n)) for k in range(first, last)]


class _Flags:
    """Wraps an attack: records, per image, whether the model still classifies x_adv correctly (one
    extra forward per batch)."""

    def __init__(self, attack: Callable[[nn.Module, Tensor, Tensor], Tensor]):
        self.attack, self.flags = attack, []

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self.attack(model, x, y)
        with torch.no_grad():
            self.flags.append((model(x_adv).argmax(1) == y).cpu())
        return x_adv


def _chunked(model: nn.Module, data: ImageSet, attack_of: Callable[[int, ImageSet], Callable], *, batch_size: int,
             device: torch.device, seed: int, dist: Distributed) -> dict[str, Any]:
    """``evaluate``'s numbers over ``data``, chunk by chunk (``attack_of(k, chunk)`` is called under chunk
    k's seed and returns the chunk's attack), merged over ranks; plus ``flags``: '1' per image still
    correct under attack, '0' otherwise, in image order."""
    sums = torch.zeros(5, dtype=torch.float64)  # clean correct, robust correct, clean loss, robust loss, count
    flags = []
    for k, start, stop in chunks(len(data), batch_size, dist):
        part = data.subset(start, stop)
        with _seeded(chunk_seed(seed, k), device):
            recorder = _Flags(attack_of(k, part))
            res = evaluate(model, part, recorder, batch_size=batch_size, device=device)
        m = res["n"]
        sums += torch.tensor([round(res["clean_acc"] * m / 100), round(res["robust_acc"] * m / 100),
                              res["clean_loss"] * m, res["robust_loss"] * m, m], dtype=torch.float64)
        flags.append("".join("1" if f else "0" for f in torch.cat(recorder.flags).tolist()))
    clean, robust, clean_loss, robust_loss, n = dist.all_reduce_sum_(sums.to(dist.device)).tolist()
    n = max(n, 1.0)
    return {"clean_acc": 100.0 * clean / n, "robust_acc": 100.0 * robust / n, "clean_loss": clean_loss / n,
            "robust_loss": robust_loss / n, "n": int(n), "flags": "".join(dist.all_gather("".join(flags)))}


def _merge_autoattack(infos: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """One ``run_autoattack`` info from the chunks' (``sizes``: images per chunk): flags and warnings
    united, ``per_attack`` robust accuracy recounted over all images, perturbation checks over all."""
    total = sum(sizes)
    per_attack: dict[str, float] = {}
    for name in [a for a in infos[0]["attacks"] if any(a in i["per_attack"] for i in infos)]:
        # the package logs each chunk's accuracy with 2 decimals of a percent: exact counts up to 10,000 images
        count = sum(round(i["per_attack"].get(name, 0.0) * m / 100) for i, m in zip(infos, sizes))
        per_attack[name] = 100.0 * count / total
    united = lambda key: list(dict.fromkeys(x for i in infos for x in i[key]))  # noqa: E731  (order kept)
    return {**infos[0], "flags": united("flags"), "per_attack": per_attack, "chunks": len(infos),
            "max_perturbation": max(i["max_perturbation"] for i in infos),
            **{key: all(i[key] for i in infos) for key in ("in_ball", "in_range", "finite")},
            "output": united("output"), "other_warnings": sorted(set(united("other_warnings")))}


# ---------------------------------------------------------------------------------- the evaluator

def evaluate_robustness(model: nn.Module, data: ImageSet, *, attack: str = "pgd", eps: float, alpha: float,
                        steps: int, restarts: int = 1, norm: str = "linf", batch_size: int = 256,
                        device: torch.device | str = "cpu", seed: int = 0,
                        eps_list: str | Sequence[float | str] | None = None, tolerance: int = 1,
                        check_eps: float | None = None, dist: Distributed = SINGLE) -> dict[str, Any]:
    """Clean and robust accuracy of ``model`` on ``data`` under ``attack``, with sanity checks.

    ``attack``: ``pgd`` (PGD-``steps`` on cross-entropy, ``restarts`` random starts), ``cw`` (the same
    on the CW margin loss), ``autoattack`` (AutoAttack standard; PGD with these settings is run on
    the same examples for comparison) or ``sweep`` (PGD at every eps of ``eps_list`` (default
    ``DEFAULT_EPS_LIST``; 0 and ``eps`` are always added; ``alpha`` scales with eps, keeping
    alpha/eps), and at ``eps`` with 1, 10, ``steps`` and 2x``steps`` steps). The large-eps check uses
    ``check_eps`` (default :func:`large_eps`) with PGD-``LARGE_EPS_STEPS`` (20), step check_eps/4, one start.
    Every attack runs chunk by chunk (see the module docstring); under torchrun pass ``dist`` and each
    rank attacks its share of the chunks, every rank returning the merged result.

    Runs in eval mode and float32 (``model.float()`` converts the model in place) without autocast.
    Returns a dict: ``attack``, ``norm``, ``eps``, ``alpha``, ``steps``, ``restarts``, ``seed``, ``n``,
    ``clean_acc``, ``robust_acc`` (for ``sweep``: PGD at ``eps`` and ``steps``), ``clean_loss``,
    ``robust_loss``, ``rows`` (one per setting measured: ``kind``, ``attack``, ``loss``, ``eps``,
    ``alpha``, ``steps``, ``restarts``, ``n``, ``clean_acc``, ``robust_acc``, ``robust_correct``,
    ``robust_loss``), ``checks``, ``warnings``, and for ``autoattack`` also ``autoattack`` (see
    :func:`run_autoattack`, merged over chunks) and ``pgd_robust_acc``; ``robust_flags``: one character
    per image of the headline row, '1' if still correct under attack.
    """
    if attack not in ATTACKS:
        raise ConfigError(f"unknown evaluation attack {attack!r}; valid: {', '.join(ATTACKS)}")
    if eps_list is not None and attack != "sweep":
        raise ConfigError("--eps-list applies only to --attack sweep")
    if norm not in ("linf", "l2"):
        raise ConfigError(f"norm must be linf or l2, got {norm!r}")
    if len(data) == 0:
        raise ConfigError("nothing to evaluate: the evaluation set is empty")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ConfigError(f"tolerance must be an integer >= 0 (examples), got {tolerance!r}")
    if attack == "autoattack":
        require_autoattack()  # fail before any work
    device = torch.device(device)
    build_attack("pgd", eps=eps, alpha=alpha, steps=steps, norm=norm, restarts=restarts)  # ConfigError on bad settings
    eps_values = parse_eps_list(DEFAULT_EPS_LIST if eps_list is None else eps_list) if attack == "sweep" else []
    model.float()
    n = len(data)
    loss = "cw" if attack == "cw" else "ce"
    measured: dict[tuple, dict[str, float]] = {}

    def pgd_row(kind: str, e: float, a: float, k: int, r: int, lossname: str = loss) -> dict[str, Any]:
        key = (lossname, e, a, k, r)
        if key not in measured:
            run = build_attack("pgd", eps=e, alpha=a, steps=k, norm=norm, loss=lossname, random_start=True, restarts=r)
            with torch.autocast(device.type, enabled=False), _no_input_path():
                measured[key] = _chunked(model, data, lambda k, part: run, batch_size=batch_size, device=device,
                                         seed=seed, dist=dist)
        res = measured[key]
        return {"kind": kind, "attack": "pgd-cw" if lossname == "cw" else "pgd", "loss": lossname, "norm": norm,
                "eps": e, "alpha": a, "steps": k, "restarts": r, "n": res["n"], "clean_acc": res["clean_acc"],
                "robust_acc": res["robust_acc"], "robust_correct": _count(res["robust_acc"], res["n"]),
                "clean_loss": res["clean_loss"], "robust_loss": res["robust_loss"], "flags": res["flags"]}

    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if attack in ("pgd", "cw"):
        main = pgd_row("eval", eps, alpha, steps, restarts)
        rows.append(main)
    elif attack == "sweep":
        values: list[float] = []
        for e in sorted({0.0, float(eps), *eps_values}):
            if not values or e - values[-1] > 1e-9:  # 0.0313725 and 8/255 are one budget
                values.append(e)
        for e in values:
            scaled = alpha * e / eps if eps > 0 else alpha  # keep the step/eps ratio of the config
            rows.append(pgd_row("eps", e, scaled if e > 0 else alpha, steps, restarts))
        for k in sorted({1, 10, steps, 2 * steps} - {0}):
            rows.append(pgd_row("steps", eps, alpha, k, restarts))
        main = next(r for r in rows if r["kind"] == "steps" and r["steps"] == steps) if steps > 0 else \
            next(r for r in rows if r["kind"] == "eps" and r["eps"] == eps)
    else:  # autoattack
        infos: list[tuple[dict[str, Any], int]] = []

        def autoattack_chunk(k: int, part: ImageSet) -> Callable:
            x, y = _stack(part, batch_size, device)
            x_adv, info = run_autoattack(model, x, y, eps=eps, norm=norm, batch_size=batch_size, device=device,
                                         seed=chunk_seed(seed, k))
            infos.append((info, len(part)))
            return _replay(x, x_adv)

        with torch.autocast(device.type, enabled=False):
            res = _chunked(model, data, autoattack_chunk, batch_size=batch_size, device=device, seed=seed, dist=dist)
        gathered = [item for rank_infos in dist.all_gather(infos) for item in rank_infos]  # in chunk order
        info = _merge_autoattack([i for i, _ in gathered], [m for _, m in gathered])
        main = {"kind": "autoattack", "attack": "autoattack", "loss": "-", "norm": norm, "eps": eps, "alpha": None,
                "steps": None, "restarts": None, "n": res["n"], "clean_acc": res["clean_acc"],
                "robust_acc": res["robust_acc"], "robust_correct": _count(res["robust_acc"], res["n"]),
                "clean_loss": res["clean_loss"], "robust_loss": res["robust_loss"], "flags": res["flags"]}
        rows.append(main)
        reference = pgd_row("pgd-reference", eps, alpha, steps, restarts, "ce")
        rows.append(reference)
        extra = {"autoattack": info, "pgd_robust_acc": reference["robust_acc"]}
    big = large_eps(norm, data.images.shape[1:]) if check_eps is None else float(check_eps)
    rows.append(pgd_row("large-eps", big, big / 4, LARGE_EPS_STEPS, 1, "cw" if attack == "cw" else "ce"))

    clean_correct = _count(main["clean_acc"], n)
    checks, warns = sanity_checks(rows, n=n, clean_correct=clean_correct, tolerance=tolerance,
                                  confirm="see AutoAttack's flags" if attack == "autoattack" else "confirm with AutoAttack")
    if attack == "autoattack":
        info = extra["autoattack"]
        valid = info["in_ball"] and info["in_range"] and info["finite"]
        checks.append({"name": "autoattack_x_adv_valid", "passed": valid,
                       "detail": f"max {norm} perturbation {info['max_perturbation']:.6g} <= eps {eps:.6g}: "
                                 f"{info['in_ball']}; in [0, 1]: {info['in_range']}; finite: {info['finite']}"})
        if not valid:
            warns.append("AutoAttack's x_adv leaves the eps-ball or [0, 1] (or is not finite): its robust accuracy "
                         "is not a valid bound; check the model and the pyautoattack version")
        checks.append({"name": "autoattack_flags", "passed": not info["flags"],
                       "detail": "; ".join(info["flags"]) or "no flags raised by AutoAttack's own checks"})
        warns += [f"AutoAttack flag: {flag}" for flag in info["flags"]]
    flags = main["flags"]
    return {
        "attack": attack, "norm": norm, "eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts,
        "seed": seed, "n": n, "clean_acc": main["clean_acc"], "robust_acc": main["robust_acc"],
        "clean_loss": main["clean_loss"],
        "robust_loss": main["robust_loss"], **extra, "rows": [{k: v for k, v in r.items() if k != "flags"} for r in rows],
        "checks": checks, "warnings": warns, "tolerance": tolerance, "chunk_size": batch_size, "world_size": dist.world_size,
        "robust_flags": flags,
    }
