"""Early-bird tickets (You et al. 2020, "Drawing early-bird tickets: towards more efficient training
of deep networks"), as used by Robust Bird (Chen et al. 2022, "Sparsity Winning Twice").

After every epoch of a cheap search stage, take the mask the ticket would have now and compare it
with the masks of the previous epochs. The ticket is drawn when the mask has stopped moving: the
newest of the last ``window`` masks differs from EACH of the ``window - 1`` older ones in at most
``threshold`` of its positions (normalised Hamming distance).

- ``kind="unstructured"``: the global magnitude mask at ``density`` over the CONV weights (parameters
  with 4 dims), as in Robust Bird; default threshold 0.08.
- ``kind="channel"``: the BatchNorm channel mask keeping the ``channel_density`` fraction of channels
  with the largest |gamma| (one global threshold; see ``channels.bn_channel_masks``); default
  threshold 0.1. ``channel_density`` defaults to ``sqrt(density)``: a conv whose input and output
  channels both keep a fraction c keeps about c^2 of its weights, so sqrt(density) of the channels
  gives roughly ``density`` of the conv weights.

``EarlyBirdSearch`` wraps the detector as a SparsityController for the search stage. It never
masks anything (density 1.0); it observes the mask after every epoch (``end_epoch``) or every
``every_steps`` optimizer steps (``after_step``), refuses to draw the ticket before ``min_epochs``
epochs, and may add an L1 penalty on the BatchNorm gammas (``bn_l1``, network slimming, Liu et al.
2017) to their gradients, which pushes unimportant channels' gammas to zero so that |gamma| ranks
channels (You et al. train their channel early birds this way, lambda = 1e-4).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..method_config import DEFAULT_EB_THRESHOLD  # the early-bird thresholds, declared with the settings
from .channels import bn_channel_masks
from .masks import hamming_distance
from .select import prunable_parameters, unwrap
from .tickets import global_magnitude_masks

KINDS = ("unstructured", "channel")


def _flatten(mask: Tensor | Mapping[str, Tensor]) -> Tensor:
    """One (N,) bool CPU tensor; a mapping is concatenated in sorted-name order."""
    if isinstance(mask, Mapping):
        if not mask:
            raise ValueError("empty mask mapping")
        return torch.cat([mask[name].detach().reshape(-1).to("cpu", torch.bool) for name in sorted(mask)])
    return mask.detach().reshape(-1).to("cpu", torch.bool)


class EarlyBirdDetector:
    """Keeps the last ``window`` masks and tells when the newest one has settled.

    ``observe()`` takes the model's current mask (or a given ``mask=``, a bool tensor or
    ``{name: bool tensor}``), appends it to the history and returns the largest normalised Hamming
    distance between the newest mask and each older one in the history — None until the history
    holds ``window`` masks. ``found`` becomes True (and ``found_at`` the 0-based index of that
    observation, so at least ``window - 1``) the first time the history is full and that largest
    distance is <= ``threshold``; later observations keep being recorded but never move ``found_at``.

    ``model`` may be None when every mask is given to ``observe``. For the unstructured kind,
    ``exclude`` (fnmatch patterns on parameter names) removes conv weights from the mask; the channel
    kind scores every affine BatchNorm.
    """

    def __init__(
        self,
        model: nn.Module | None,
        *,
        density: float,
        kind: Literal["unstructured", "channel"] = "unstructured",
        window: int = 5,
        threshold: float | None = None,
        channel_density: float | None = None,
        exclude: Sequence[str] = (),
    ):
        if kind not in KINDS:
            raise ConfigError(f"unknown early-bird kind {kind!r}; valid: {', '.join(KINDS)}")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ConfigError(f"density must be a number in (0, 1], got {density!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigError(f"early-bird window must be an integer >= 2, got {window!r}")
        threshold = DEFAULT_EB_THRESHOLD[kind] if threshold is None else threshold
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"early-bird threshold must be in [0, 1], got {threshold}")
        channel_density = math.sqrt(density) if channel_density is None else channel_density
        if not 0.0 < channel_density <= 1.0:
            raise ConfigError(f"channel_density must be in (0, 1], got {channel_density}")
        self.model = None if model is None else unwrap(model)
        self.kind, self.density, self.window = kind, float(density), window
        self.threshold, self.channel_density = float(threshold), float(channel_density)
        self.exclude = tuple(exclude) if not isinstance(exclude, str) else (exclude,)
        if self.model is not None and kind == "unstructured" and not self._conv_weights(self.model):
            raise ConfigError("early-bird (unstructured) needs conv weights (4-dim parameters) to mask")
        self.history: list[Tensor] = []  # the last `window` masks, (N,) bool on CPU, oldest first
        self.observations = 0
        self.found = False
        self.found_at: int | None = None
        self.last_distance: float | None = None

    def _conv_weights(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in prunable_parameters(model, self.exclude).items() if p.dim() == 4}

    @torch.no_grad()
    def current_mask(self) -> dict[str, Tensor]:
        """The mask the ticket would have now: ``{conv weight name: bool}`` (unstructured) or
        ``{BN module name: (C,) bool}`` (channel)."""
        if self.model is None:
            raise ValueError("this detector has no model: pass mask= to observe()")
        if self.kind == "unstructured":
            return global_magnitude_masks(self._conv_weights(self.model), self.density)
        return bn_channel_masks(self.model, self.channel_density)

    def observe(self, mask: Tensor | Mapping[str, Tensor] | None = None, *, may_fire: bool = True) -> float | None:
        """Record the current (or given) mask; the largest distance to the older ones, or None while
        fewer than ``window`` masks have been seen. With ``may_fire=False`` (a minimum search length
        not reached yet) the mask and distance are recorded but ``found`` cannot turn True."""
        newest = _flatten(self.current_mask() if mask is None else mask)
        if self.history and newest.numel() != self.history[-1].numel():
            raise ValueError(f"mask has {newest.numel()} positions, earlier ones {self.history[-1].numel()}")
        self.history = (self.history + [newest])[-self.window:]
        index = self.observations
        self.observations += 1
        if len(self.history) < self.window:
            self.last_distance = None
            return None
        self.last_distance = max(hamming_distance(newest, older) for older in self.history[:-1])
        if may_fire and not self.found and self.last_distance <= self.threshold:
            self.found, self.found_at = True, index
        return self.last_distance

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [m.clone() for m in self.history],
            "observations": self.observations,
            "found": self.found,
            "found_at": self.found_at,
            "last_distance": self.last_distance,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        history = [torch.as_tensor(m).reshape(-1).to("cpu", torch.bool) for m in state["history"]]
        if len(history) > self.window or len({m.numel() for m in history}) > 1:
            raise CheckpointError(
                f"early-bird history does not fit: {len(history)} masks for a window of {self.window}"
            )
        self.history = history
        self.observations = int(state["observations"])
        self.found = bool(state["found"])
        self.found_at = None if state["found_at"] is None else int(state["found_at"])
        self.last_distance = None if state["last_distance"] is None else float(state["last_distance"])


class EarlyBirdSearch:
    """SparsityController of Robust Bird's search stage: trains densely and watches the ticket's mask.

    - ``every_steps=None``: ``end_epoch(epoch, metrics)`` observes the mask after every epoch (You et
      al.'s and Chen et al.'s schedule). ``every_steps=N``: ``after_step`` observes it after every N
      optimizer steps of the stage, counted here (a step the fp16 scaler skipped is not counted), so
      the masks in the window are N steps apart whatever the size of an epoch.
    - ``min_epochs``: an observation made during epoch e (1-based) may draw the ticket only when
      e >= ``min_epochs``; earlier ones still fill the window.
    - ``done`` (the stage's stop condition) turns True at the end of the epoch in which the ticket
      was found: ``eb_epoch`` is that epoch (the ``epoch`` passed to ``end_epoch``) and ``eb_step``
      the number of search steps taken when the settled mask was observed. The ticket is pruned from
      the weights at the end of that epoch, up to one epoch's steps after ``eb_step``.
    - ``bn_l1 > 0``: ``after_backward`` adds ``bn_l1 * sign(gamma)`` to the gradient of every affine
      BatchNorm weight, the subgradient of ``bn_l1 * sum |gamma|``. The loop calls it after the
      gradients were unscaled (fp16) and all-reduced (DDP), and gammas are float32 and identical on
      every rank, so the penalty is the same under every precision and on every rank.

    Other arguments are ``EarlyBirdDetector``'s.
    """

    masks = None  # trains densely
    topology_updates = 0
    epoch_val_images = 0  # no per-epoch validation

    def __init__(self, model: nn.Module, *, bn_l1: float = 0.0, every_steps: int | None = None,
                 min_epochs: int = 0, **detector_args: Any):
        if isinstance(bn_l1, bool) or not isinstance(bn_l1, (int, float)) or not bn_l1 >= 0.0:
            raise ConfigError(f"bn_l1 must be a number >= 0, got {bn_l1!r}")
        if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int)
                                        or every_steps < 1):
            raise ConfigError(f"early-bird every_steps must be an integer >= 1 (or None: every epoch), "
                              f"got {every_steps!r}")
        if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 0:
            raise ConfigError(f"min_epochs must be an integer >= 0, got {min_epochs!r}")
        self.detector = EarlyBirdDetector(model, **detector_args)
        self.bn_l1, self.every_steps, self.min_epochs = float(bn_l1), every_steps, min_epochs
        # the gammas penalised: Parameter objects, so they stay right when a wrapper (DDP,
        # SyncBatchNorm conversion, torch.compile) reuses them; each (C,) float32
        self.gammas = [m.weight for m in unwrap(model).modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine] if bn_l1 > 0 else []
        self.steps = 0  # optimizer steps of the search stage taken so far
        self.epochs_done = 0  # epochs of the search stage completed so far
        self.eb_epoch: int | None = None
        self.eb_step: int | None = None

    @property
    def done(self) -> bool:
        return self.detector.found and self.eb_epoch is not None

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for gamma in self.gammas:
            if gamma.grad is not None:  # None: a BN this step's graph did not reach
                gamma.grad.add_(torch.sign(gamma), alpha=self.bn_l1)

    def after_step(self, step: int) -> None:
        self.steps += 1
        if self.every_steps is not None and self.steps % self.every_steps == 0:
            self._observe(epoch=self.epochs_done + 1)  # during the epoch after the completed ones

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs_done = int(epoch)
        if self.every_steps is None:
            self._observe(epoch=int(epoch))
        if self.detector.found and self.eb_epoch is None:
            self.eb_epoch = int(epoch)

    def _observe(self, epoch: int) -> None:
        was_found = self.detector.found
        self.detector.observe(may_fire=epoch >= self.min_epochs)
        if self.detector.found and not was_found:
            self.eb_step = self.steps

    def epoch_log(self) -> dict[str, Any]:
        return {"density": 1.0, "eb_distance": self.detector.last_distance, "eb_found": self.detector.found}

    def mask_state(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "eb_epoch": self.eb_epoch, "eb_step": self.eb_step,
                "steps": self.steps, "epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also loads states saved before step counting and the BN penalty existed: those observed
        once per epoch (so their epochs completed equal their observations) and continue without the
        penalty, as they started."""
        self.detector.load_state_dict(state["detector"])
        if "steps" not in state and self.gammas:
            warnings.warn("this search was saved before the L1 penalty on BatchNorm gammas existed: it continues "
                          "without it, as it started", stacklevel=2)
            self.gammas = []
        self.eb_epoch = None if state["eb_epoch"] is None else int(state["eb_epoch"])
        self.eb_step = None if state.get("eb_step") is None else int(state["eb_step"])
        self.steps = int(state.get("steps", 0))
        self.epochs_done = int(state.get("epochs_done", self.detector.observations))
