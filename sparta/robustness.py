"""Robustness evaluation beyond the training-time PGD: PGD-k with restarts, CW-L∞, AutoAttack and
sweeps over eps and steps, each reported with sanity checks that catch gradient masking.

``evaluate_robustness(model, data, EvalSettings(eps=..., alpha=..., steps=...), attack=...)`` returns
a dict (never prints): the headline clean and robust accuracy (percent), ``rows`` (every attack
setting measured, for a table), ``checks`` (``[{name, passed, detail}]``) and ``warnings`` (one
string per failed check, naming the suspected cause). :func:`sparta.evaluate.evaluate` stays the
per-batch engine; every PGD evaluation starts from a fixed torch seed (the caller's RNG state is
restored afterwards), so two settings differ only by the setting, not by the random start.

Sanity checks (Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of Security"; Carlini
et al. 2019, "On Evaluating Adversarial Robustness"), counted in examples with a tolerance of
``tolerance`` examples (an ``EvalSettings`` field; PGD's random start makes single examples flip):

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

Chunks. Every attack runs chunk by chunk (one function per attack kind over the shared loop
``_chunked``): chunk k is images [k*B, (k+1)*B) (B = ``EvalSettings.batch_size``), and its randomness
starts from the seed ``chunk_seed(seed, k)`` (``seed`` itself for chunk 0). AutoAttack
runs once per chunk (``run_standard_evaluation`` on the chunk alone: the package re-seeds every batch
with the same seed anyway, and runs each later attack on the chunk's survivors, not on survivors
regrouped over the whole set). A chunk's result thus depends on its images and k only, so under
torchrun (``sparta eval --nproc N``) each rank takes a contiguous run of whole chunks, and the counts
(all-reduced) and per-image flags (gathered) equal a one-process run's image by image, given the same
arithmetic (CPU: the same thread count; GPU kernels may differ run to run).

AutoAttack (Croce & Hein 2020) comes from the optional ``pyautoattack`` package (``pip install
'sparta[autoattack]'``), run through the adapter :mod:`sparta.attacks.autoattack`, which imports it
only when asked for.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .attacks import (  # the adapter's functions are looked up on the module at call time
    autoattack,
    build_attack,
    seeded,
)
from .data.base import ImageSet
from .data.loader import DeviceLoader
from .distributed import SINGLE, Distributed
from .errors import ConfigError, SpartaError
from .evaluate import evaluate
from .fmt import eps as format_eps  # "8/255", "0.1"
from .fmt import parse_number

__all__ = ["ATTACKS", "DEFAULT_EPS_LIST", "EvalSettings", "evaluate_robustness", "sanity_checks", "parse_eps_list",
           "format_eps", "large_eps"]

DEFAULT_EPS_LIST = "0,2/255,4/255,8/255,16/255"
LARGE_EPS_STEPS = 20  # PGD steps of the large-eps check (step = eps/4: 4 steps cross the whole box)
_MASKING = "suspected gradient masking (obfuscated gradients, Athalye et al. 2018)"


# --------------------------------------------------------------------------------------- helpers

def parse_eps_list(value: str | Sequence[float | str]) -> list[float]:
    """``"0,2/255,8/255"`` (or a list of numbers/fractions) -> floats; ``ConfigError`` on a bad item."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        text = str(item).strip()
        eps = parse_number(text)
        if eps is None:
            raise ConfigError(f"--eps-list item {text!r} is not a number or fraction such as 8/255")
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
def _no_input_path() -> Iterator[None]:
    """Turn autograd's "not used in the graph" (logits detached from the input) into one line."""
    try:
        yield
    except RuntimeError as e:
        if "not have been used in the graph" not in str(e) and "does not require grad" not in str(e):
            raise
        raise SpartaError("the model's logits do not depend on its input through autograd (a detach, no_grad or "
                          "non-tensor step inside forward), so gradient attacks cannot run: this is gradient "
                          "masking (obfuscated gradients, Athalye et al. 2018); evaluate the model without "
                          "it") from None


def _count(acc: float, n: int) -> int:
    return int(round(acc * n / 100.0))


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
    _monotone_checks(eps_rows, sorted(by_kind("steps"), key=lambda r: r["steps"]), add=add, pct=pct,
                     tolerance=tolerance, confirm=confirm)
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


def _monotone_checks(eps_rows: list[dict[str, Any]], steps_rows: list[dict[str, Any]], *,
                     add: Callable[[str, bool, str, str], None], pct: Callable[[int], str], tolerance: int,
                     confirm: str) -> None:
    """``sanity_checks``' ``monotone_in_eps`` and ``monotone_in_steps`` (each only with more than one row):
    robust accuracy does not rise by more than ``tolerance`` examples from one row to the next of
    ``eps_rows`` (sorted by eps) nor of ``steps_rows`` (sorted by steps). ``add(name, passed, detail,
    warning)`` records a check; ``pct`` formats a count of examples."""
    if len(eps_rows) > 1:
        bad = [(a, b) for a, b in zip(eps_rows, eps_rows[1:]) if b["robust_correct"] > a["robust_correct"] + tolerance]
        detail = ", ".join(f"{format_eps(r['eps'])}: {pct(r['robust_correct'])}" for r in eps_rows)
        add("monotone_in_eps", not bad, f"robust accuracy by eps: {detail} (tolerance {tolerance})",
            "robust accuracy rises with eps (" + "; ".join(
                f"{pct(a['robust_correct'])} at eps {format_eps(a['eps'])} -> {pct(b['robust_correct'])} at "
                f"{format_eps(b['eps'])}" for a, b in bad) + f"): {_MASKING}; {confirm}")
    if len(steps_rows) > 1:
        bad = [(a, b) for a, b in zip(steps_rows, steps_rows[1:])
               if b["robust_correct"] > a["robust_correct"] + tolerance]
        detail = ", ".join(f"PGD-{r['steps']}: {pct(r['robust_correct'])}" for r in steps_rows)
        add("monotone_in_steps", not bad, f"robust accuracy by steps: {detail} (tolerance {tolerance})",
            "robust accuracy rises with more PGD steps (" + "; ".join(
                f"{pct(a['robust_correct'])} at PGD-{a['steps']} -> {pct(b['robust_correct'])} at PGD-{b['steps']}"
                for a, b in bad) + f"): {_MASKING}; {confirm}")


# -------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class EvalSettings:
    """The settings of one :func:`evaluate_robustness` call.

    ``eps``, ``alpha`` (the step), ``steps``, ``restarts`` (random starts) and ``norm`` (``linf`` or
    ``l2``) set PGD, and ``eps`` and ``norm`` AutoAttack; ``batch_size`` is the chunk size (images per
    chunk and per batch); ``seed`` is chunk 0's seed; ``eps_list`` holds the budgets of ``sweep`` (the
    only attack that takes it; None: ``DEFAULT_EPS_LIST``); ``tolerance`` is the checks' slack in
    examples; ``check_eps`` the budget of the large-eps check (None: :func:`large_eps`). Checked when
    the evaluation starts, not here.
    """
    eps: float
    alpha: float
    steps: int
    restarts: int = 1
    norm: str = "linf"
    batch_size: int = 256
    seed: int = 0
    eps_list: str | Sequence[float | str] | None = None
    tolerance: int = 1
    check_eps: float | None = None


@dataclass
class _Evaluation:
    """One evaluation: what every attack kind reads, and the PGD results measured so far (``measured``,
    keyed by (loss, eps, alpha, steps, restarts), so a setting asked for twice runs once)."""
    model: nn.Module
    data: ImageSet
    settings: EvalSettings
    device: torch.device
    dist: Distributed
    sweep_eps: list[float]  # the parsed eps_list (sweep only; empty otherwise)
    measured: dict[tuple, dict[str, Any]] = field(default_factory=dict)


# -------------------------------------------------------------------------------------- chunks

def stack_images(data: ImageSet, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The whole set as float pixels in [0, 1] on ``device`` (N, C, H, W) and its labels (N,), exactly
    as ``evaluate`` batches it."""
    loader = DeviceLoader(data, min(batch_size, len(data)), device=device, shuffle=False, augment=False)
    xs, ys = zip(*loader.epoch(0))
    return torch.cat(xs), torch.cat(ys)


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
        self.attack = attack
        self.flags: list[Tensor] = []  # per batch: (B,) bool, still correct, on the CPU

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self.attack(model, x, y)
        with torch.no_grad():
            self.flags.append((model(x_adv).argmax(1) == y).cpu())
        return x_adv


def _chunked(ev: _Evaluation, attack_of: Callable[[int, ImageSet], Callable]) -> dict[str, Any]:
    """``evaluate``'s numbers over ``ev.data``, chunk by chunk (``attack_of(k, chunk)`` is called under
    chunk k's seed and returns the chunk's attack), merged over ranks; plus ``flags``: '1' per image
    still correct under attack, '0' otherwise, in image order."""
    batch_size, device, dist = ev.settings.batch_size, ev.device, ev.dist
    sums = torch.zeros(5, dtype=torch.float64)  # clean correct, robust correct, clean loss, robust loss, count
    flags = []
    for k, start, stop in chunks(len(ev.data), batch_size, dist):
        part = ev.data.subset(start, stop)
        with seeded(chunk_seed(ev.settings.seed, k), device):
            recorder = _Flags(attack_of(k, part))
            res = evaluate(ev.model, part, recorder, batch_size=batch_size, device=device)
        m = res["n"]
        sums += torch.tensor([round(res["clean_acc"] * m / 100), round(res["robust_acc"] * m / 100),
                              res["clean_loss"] * m, res["robust_loss"] * m, m], dtype=torch.float64)
        flags.append("".join("1" if f else "0" for f in torch.cat(recorder.flags).tolist()))
    clean, robust, clean_loss, robust_loss, n = dist.all_reduce_sum_(sums.to(dist.device)).tolist()
    n = max(n, 1.0)
    return {"clean_acc": 100.0 * clean / n, "robust_acc": 100.0 * robust / n, "clean_loss": clean_loss / n,
            "robust_loss": robust_loss / n, "n": int(n), "flags": "".join(dist.all_gather("".join(flags)))}


# ------------------------------------------------------------------------------- the attack kinds

_Measured = tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]  # (rows, headline row, extra result keys)


def _row(res: dict[str, Any], **setting: Any) -> dict[str, Any]:
    """A row: ``setting`` (``kind``, ``attack``, ``loss``, ``norm``, ``eps``, ``alpha``, ``steps``,
    ``restarts``, in that order) and the numbers of ``res`` (a ``_chunked`` result)."""
    return {**setting, "n": res["n"], "clean_acc": res["clean_acc"], "robust_acc": res["robust_acc"],
            "robust_correct": _count(res["robust_acc"], res["n"]), "clean_loss": res["clean_loss"],
            "robust_loss": res["robust_loss"], "flags": res["flags"]}


def _pgd_row(ev: _Evaluation, kind: str, eps: float, alpha: float, steps: int, restarts: int,
             loss: str) -> dict[str, Any]:
    """PGD-``steps`` on ``loss`` (``ce`` or ``cw``) at ``eps`` as a row of ``kind``; measured once per setting."""
    key = (loss, eps, alpha, steps, restarts)
    if key not in ev.measured:
        run = build_attack("pgd", eps=eps, alpha=alpha, steps=steps, norm=ev.settings.norm, loss=loss,
                           random_start=True, restarts=restarts)
        with torch.autocast(ev.device.type, enabled=False), _no_input_path():
            ev.measured[key] = _chunked(ev, lambda k, part: run)
    return _row(ev.measured[key], kind=kind, attack="pgd-cw" if loss == "cw" else "pgd", loss=loss,
                norm=ev.settings.norm, eps=eps, alpha=alpha, steps=steps, restarts=restarts)


def _pgd(ev: _Evaluation, loss: str) -> _Measured:
    """``pgd`` (``loss`` ``ce``) and ``cw`` (``loss`` ``cw``): one row at the settings, the headline."""
    s = ev.settings
    main = _pgd_row(ev, "eval", s.eps, s.alpha, s.steps, s.restarts, loss)
    return [main], main, {}


def _sweep(ev: _Evaluation) -> _Measured:
    """``sweep``: PGD (cross-entropy) at every eps of ``ev.sweep_eps``, 0 and ``eps`` (alpha scaled to
    keep alpha/eps), then at ``eps`` with 1, 10, ``steps`` and 2x``steps`` steps; the headline is PGD at
    ``eps`` and ``steps`` (the eps row when ``steps`` is 0)."""
    s = ev.settings
    values: list[float] = []
    for e in sorted({0.0, float(s.eps), *ev.sweep_eps}):
        if not values or e - values[-1] > 1e-9:  # 0.0313725 and 8/255 are one budget
            values.append(e)
    rows = []
    for e in values:
        scaled = s.alpha * e / s.eps if s.eps > 0 else s.alpha  # keep the step/eps ratio of the config
        rows.append(_pgd_row(ev, "eps", e, scaled if e > 0 else s.alpha, s.steps, s.restarts, "ce"))
    for k in sorted({1, 10, s.steps, 2 * s.steps} - {0}):
        rows.append(_pgd_row(ev, "steps", s.eps, s.alpha, k, s.restarts, "ce"))
    main = next(r for r in rows if r["kind"] == "steps" and r["steps"] == s.steps) if s.steps > 0 else \
        next(r for r in rows if r["kind"] == "eps" and r["eps"] == s.eps)
    return rows, main, {}


def _autoattack(ev: _Evaluation) -> _Measured:
    """``autoattack``: AutoAttack standard once per chunk (robust accuracy re-measured here on its x_adv),
    then PGD (cross-entropy) at the settings on the same examples; extra keys ``autoattack`` (its info
    merged over chunks and ranks) and ``pgd_robust_acc``."""
    s = ev.settings
    infos: list[tuple[dict[str, Any], int]] = []  # (info, images) per chunk of this rank

    def chunk_attack(k: int, part: ImageSet) -> Callable:
        x, y = stack_images(part, s.batch_size, ev.device)  # (m, C, H, W), (m,)
        x_adv, info = autoattack.run_autoattack(ev.model, x, y, eps=s.eps, norm=s.norm, batch_size=s.batch_size,
                                                device=ev.device, seed=chunk_seed(s.seed, k))
        infos.append((info, len(part)))
        return autoattack.replay(x, x_adv)

    with torch.autocast(ev.device.type, enabled=False):
        res = _chunked(ev, chunk_attack)
    gathered = [item for rank_infos in ev.dist.all_gather(infos) for item in rank_infos]  # in chunk order
    info = autoattack.merge_autoattack([i for i, _ in gathered], [m for _, m in gathered])
    main = _row(res, kind="autoattack", attack="autoattack", loss="-", norm=s.norm, eps=s.eps, alpha=None,
                steps=None, restarts=None)
    reference = _pgd_row(ev, "pgd-reference", s.eps, s.alpha, s.steps, s.restarts, "ce")
    return [main, reference], main, {"autoattack": info, "pgd_robust_acc": reference["robust_acc"]}


_KINDS: dict[str, Callable[[_Evaluation], _Measured]] = {
    "pgd": functools.partial(_pgd, loss="ce"), "cw": functools.partial(_pgd, loss="cw"),
    "autoattack": _autoattack, "sweep": _sweep}
ATTACKS = tuple(_KINDS)  # the evaluation attacks, in the order help texts list them


def _autoattack_checks(info: dict[str, Any], norm: str, eps: float) -> tuple[list[dict[str, Any]], list[str]]:
    """``autoattack_x_adv_valid`` and ``autoattack_flags`` over the merged AutoAttack ``info`` -> (checks, warnings)."""
    valid = info["in_ball"] and info["in_range"] and info["finite"]
    checks = [{"name": "autoattack_x_adv_valid", "passed": valid,
               "detail": f"max {norm} perturbation {info['max_perturbation']:.6g} <= eps {eps:.6g}: "
                         f"{info['in_ball']}; in [0, 1]: {info['in_range']}; finite: {info['finite']}"},
              {"name": "autoattack_flags", "passed": not info["flags"],
               "detail": "; ".join(info["flags"]) or "no flags raised by AutoAttack's own checks"}]
    warns = [] if valid else ["AutoAttack's x_adv leaves the eps-ball or [0, 1] (or is not finite): its robust "
                              "accuracy is not a valid bound; check the model and the pyautoattack version"]
    return checks, warns + [f"AutoAttack flag: {flag}" for flag in info["flags"]]


# ---------------------------------------------------------------------------------- the evaluator

def _validate(attack: str, s: EvalSettings, data: ImageSet) -> None:
    """One-line ``ConfigError`` (or the missing-package ``SpartaError``) before any work."""
    if attack not in ATTACKS:
        raise ConfigError(f"unknown evaluation attack {attack!r}; valid: {', '.join(ATTACKS)}")
    if s.eps_list is not None and attack != "sweep":
        raise ConfigError("--eps-list applies only to --attack sweep")
    if s.norm not in ("linf", "l2"):
        raise ConfigError(f"norm must be linf or l2, got {s.norm!r}")
    if len(data) == 0:
        raise ConfigError("nothing to evaluate: the evaluation set is empty")
    if isinstance(s.tolerance, bool) or not isinstance(s.tolerance, int) or s.tolerance < 0:
        raise ConfigError(f"tolerance must be an integer >= 0 (examples), got {s.tolerance!r}")
    if attack == "autoattack":
        autoattack.require_autoattack()  # fail before any work


def evaluate_robustness(model: nn.Module, data: ImageSet, settings: EvalSettings, *, attack: str = "pgd",
                        device: torch.device | str = "cpu", dist: Distributed = SINGLE) -> dict[str, Any]:
    """Clean and robust accuracy of ``model`` on ``data`` under ``attack``, with sanity checks.

    ``attack``: ``pgd`` (PGD-``steps`` on cross-entropy, ``restarts`` random starts), ``cw`` (the same
    on the CW margin loss), ``autoattack`` (AutoAttack standard; PGD with these settings is run on
    the same examples for comparison) or ``sweep`` (PGD at every eps of ``eps_list`` (default
    ``DEFAULT_EPS_LIST``; 0 and ``eps`` are always added; ``alpha`` scales with eps, keeping
    alpha/eps), and at ``eps`` with 1, 10, ``steps`` and 2x``steps`` steps); the names are
    ``settings``' fields. The large-eps check uses ``check_eps`` (default :func:`large_eps`) with
    PGD-``LARGE_EPS_STEPS`` (20), step check_eps/4, one start. Every attack runs chunk by chunk (see
    the module docstring); under torchrun pass ``dist`` and each rank attacks its share of the chunks,
    every rank returning the merged result.

    Runs in eval mode and float32 (``model.float()`` converts the model in place) without autocast.
    Returns a dict: ``attack``, ``norm``, ``eps``, ``alpha``, ``steps``, ``restarts``, ``seed``, ``n``,
    ``clean_acc``, ``robust_acc`` (for ``sweep``: PGD at ``eps`` and ``steps``), ``clean_loss``,
    ``robust_loss``, ``rows`` (one per setting measured: ``kind``, ``attack``, ``loss``, ``norm``,
    ``eps``, ``alpha``, ``steps``, ``restarts``, ``n``, ``clean_acc``, ``robust_acc``,
    ``robust_correct``, ``clean_loss``, ``robust_loss``), ``checks``, ``warnings``, ``tolerance``,
    ``chunk_size``, ``world_size``, and for ``autoattack`` also ``autoattack`` (see
    :func:`sparta.attacks.autoattack.run_autoattack`, merged over chunks) and ``pgd_robust_acc``;
    ``robust_flags``: one character per image of the headline row, '1' if still correct under attack.
    """
    s = settings
    _validate(attack, s, data)
    device = torch.device(device)
    build_attack("pgd", eps=s.eps, alpha=s.alpha, steps=s.steps, norm=s.norm, restarts=s.restarts)  # ConfigError
    sweep_eps = parse_eps_list(DEFAULT_EPS_LIST if s.eps_list is None else s.eps_list) if attack == "sweep" else []
    model.float()
    ev = _Evaluation(model, data, s, device, dist, sweep_eps)
    rows, main, extra = _KINDS[attack](ev)
    big = large_eps(s.norm, data.images.shape[1:]) if s.check_eps is None else float(s.check_eps)
    rows.append(_pgd_row(ev, "large-eps", big, big / 4, LARGE_EPS_STEPS, 1, "cw" if attack == "cw" else "ce"))

    n = len(data)
    confirm = "see AutoAttack's flags" if attack == "autoattack" else "confirm with AutoAttack"
    checks, warns = sanity_checks(rows, n=n, clean_correct=_count(main["clean_acc"], n), tolerance=s.tolerance,
                                  confirm=confirm)
    if attack == "autoattack":
        aa_checks, aa_warns = _autoattack_checks(extra["autoattack"], s.norm, s.eps)
        checks, warns = checks + aa_checks, warns + aa_warns
    return {
        "attack": attack, "norm": s.norm, "eps": s.eps, "alpha": s.alpha, "steps": s.steps, "restarts": s.restarts,
        "seed": s.seed, "n": n, "clean_acc": main["clean_acc"], "robust_acc": main["robust_acc"],
        "clean_loss": main["clean_loss"], "robust_loss": main["robust_loss"], **extra,
        "rows": [{k: v for k, v in r.items() if k != "flags"} for r in rows],
        "checks": checks, "warnings": warns, "tolerance": s.tolerance, "chunk_size": s.batch_size,
        "world_size": dist.world_size, "robust_flags": main["flags"],
    }
