"""Data-parallel training under torchrun: process group setup, rank-0 I/O, masks kept identical.

``setup(cfg)`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``), checks the config against it and joins the process group (NCCL on CUDA,
device ``cuda:LOCAL_RANK``; gloo on CPU). Without torchrun (or with one process) it returns
``SINGLE``, whose every collective is a no-op, so the training code has no ``if distributed:``.

What is shared and how (see the README's "Distributed training" section):

- the global batch is ``batch_size``; ``DeviceLoader`` gives rank r positions r::world_size of it.
  Each rank's loss is weighted by ``local_share * world_size / global_batch`` so that DDP's average
  of the ranks' gradients is exactly the gradient of the global batch mean;
- only the training loss forward/backward runs through ``DistributedDataParallel``; attacks run on
  the bare module (they take input gradients only and would not fire DDP's reducer anyway);
- BatchNorm running statistics follow rank 0 (DDP ``broadcast_buffers``, and once more before each
  evaluation); ``distributed.sync_batchnorm`` converts BatchNorm to SyncBatchNorm (CUDA only);
- evaluation is sharded: rank r evaluates a contiguous slice of the set and the sums of correct
  counts and losses are all-reduced, so every rank holds the same metrics;
- masks: topology decisions read DDP's all-reduced gradients and a generator seeded alike on every
  rank; after every topology change and at the start of every stage (ticket draws, resumes) the
  ranks compare per-layer (kept count, position checksum) and stop with ``RankMismatchError`` naming
  the layer if they differ, then rank 0's masks and masked weights are broadcast;
- only rank 0 writes the run directory (``on_main``); its outcome, or its error, reaches every rank.
"""
from __future__ import annotations

import atexit
import hashlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from .errors import ConfigError, SpartaError
from .sparse.masks import MaskSet

T = TypeVar("T")
_HASH_MUL, _HASH_MOD = 2654435761, 2147483647  # Knuth's multiplicative hash, mod the prime 2^31 - 1


class RankMismatchError(RuntimeError):
    """The ranks' masks or decisions differ: a bug (a rank-local random draw, unreduced gradients)."""


def env_world() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from the torchrun environment; (0, 1, 0, 1) without."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                          "(set by torchrun)") from None
    return rank, world, local_rank, local_world


def mask_layer_checksums(masks: Mapping[str, Tensor]) -> Tensor:
    """(L, 2) int64 on the masks' device: per layer (kept count, sum of hashed kept flat positions)."""
    rows = []
    for m in masks.values():
        flat = m.reshape(-1)
        pos = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)  # (numel,)
        hashed = (pos + 1) * _HASH_MUL % _HASH_MOD  # in [0, 2^31): the sum stays in int64 for < 2^32 weights
        rows.append(torch.stack([flat.sum(dtype=torch.int64), torch.where(flat, hashed, 0).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64)


def mask_checksum(masks: Mapping[str, Tensor]) -> int:
    """One integer for a whole mask set (0 when dense): changes when any layer's kept positions do."""
    total = 0
    for count, hashed in mask_layer_checksums(masks).tolist():
        total = (total * 1_000_003 + count * _HASH_MOD + hashed) % (2**61 - 1)
    return total


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's bytes, in state_dict order (bitwise identity test)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; with ``world_size == 1`` every method is local."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum_(self, t: Tensor) -> Tensor:
        if self.enabled:
            tdist.all_reduce(t)
        return t

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 only (file writes); every rank gets its result or raises its error, so a
        failed write on rank 0 never leaves the other ranks waiting in the next collective."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # sent on (bad input as itself, a bug as its message), then raised here too
                box[0] = ("error",
                          e if isinstance(e, SpartaError) else RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
                tdist.broadcast_object_list(box, src=0)
                raise
        tdist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def agree(self, where: str, **decisions: Any) -> None:
        """Stop at once if the ranks took different decisions (best epoch, early stop)."""
        seen = self.all_gather(decisions)
        if any(s != seen[0] for s in seen):
            raise RankMismatchError(f"ranks disagree {where}: {seen}")

    def share_signal(self, signum: int | None) -> int | None:
        """A stop signal any rank received (the largest number), so that all ranks save and stop at the
        same step. One tiny all-reduce (and host sync) per step, distributed only."""
        if not self.enabled:
            return signum
        flag = torch.tensor([signum or 0], device=self.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return int(flag.item()) or None

    # -- the epoch's running statistics (TrainState.sums, (3,): loss * B, correct, finite steps) ----
    def agree_finite_(self, state: Any) -> None:
        """The ranks' count of leading finite steps becomes its minimum, so that a loss that turned
        non-finite on one rank stops every rank alike (``TrainState.check_finite``)."""
        if self.enabled and state.sums is not None:
            finite = state.sums[2:3].clone()
            tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
            state.sums[2] = finite[0]

    def gather_epoch_sums(self, state: Any) -> list[tuple[Tensor | None, int]] | None:
        """For a checkpoint: every rank's (sums, examples) of the epoch so far (None in one process)."""
        if not self.enabled:
            return None
        return self.all_gather((None if state.sums is None else state.sums.cpu(), state.examples))

    def restore_epoch_sums_(self, state: Any, saved: list[tuple[Tensor | None, int]] | None) -> None:
        """This rank's share of a checkpoint's epoch-so-far statistics: its own with the same world
        size; otherwise rank 0 carries the totals and the others start from zero (same finite count)."""
        if saved is not None and len(saved) == self.world_size:
            sums, state.examples = saved[self.rank]
            state.sums = None if sums is None else sums.to(self.device)
            return
        if state.sums is None or (saved is None and not self.enabled):
            return
        if saved is not None:  # totals over the saving ranks
            parts = [s for s, _ in saved if s is not None]
            assert len(parts) == len(saved), "saved epoch sums missing on some ranks"  # as this state's are not
            state.sums = torch.stack(parts).sum(0).to(self.device)
            state.sums[2] = min(float(s[2]) for s in parts)
            state.examples = sum(n for _, n in saved)
        if not self.is_main:
            state.sums = torch.stack([state.sums.new_zeros(()), state.sums.new_zeros(()), state.sums[2]])
            state.examples = 0

    # -- model and masks -----------------------------------------------------------------------
    def shard(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous slice of n items (sizes differ by at most one)."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (self.rank < extra)

    def wrap(self, model: nn.Module, *, sync_batchnorm: bool) -> nn.Module:
        """The module the training loss runs through: ``model`` itself, or DDP around it."""
        if not self.enabled:
            return model
        if sync_batchnorm:
            # Replaces BatchNorm children in place and reuses their Parameter and buffer objects, so
            # parameter names, the optimizer and the MaskSet all still hold (the root is never a BN).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # the default syncs buffers from rank 0 at every forward (``broadcast_buffers``, renamed
        # ``forward_sync_buffers`` in recent torch): left implicit so that older CUDA builds work too
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @torch.no_grad()
    def broadcast_buffers_(self, model: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) everywhere: the attacks' and the last step's BN
        updates after DDP's last broadcast were rank-local."""
        if self.enabled:
            for b in model.buffers():
                tdist.broadcast(b, src=0)

    def check_masks(self, masks: MaskSet, where: str) -> None:
        """All-gather per-layer (kept count, position checksum), (world, L, 2) int64; raise naming the
        first layer where some rank differs from rank 0."""
        if not self.enabled or not len(masks):
            return
        local = mask_layer_checksums(masks.masks)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        tdist.all_gather(gathered, local)
        table = torch.stack(gathered).cpu()  # (world, L, 2)
        differs = (table != table[0]).any(dim=2).any(dim=0)  # (L,)
        if bool(differs.any()):
            i = int(differs.nonzero()[0])
            name = list(masks.masks)[i]
            raise RankMismatchError(
                f"masks differ across ranks after {where}: layer {name} has kept counts {table[:, i, 0].tolist()} "
                f"and position checksums {table[:, i, 1].tolist()} on ranks 0..{self.world_size - 1}")

    @torch.no_grad()
    def sync_masks_(self, masks: MaskSet, where: str) -> None:
        """Check the ranks agree, then make it bitwise: rank 0's masks (in place) and masked weights."""
        if not self.enabled or not len(masks):
            return
        self.check_masks(masks, where)
        flat = torch.cat([m.reshape(-1) for m in masks.masks.values()]).to(torch.uint8)  # (sum numel,)
        tdist.broadcast(flat, src=0)
        offset = 0
        for m in masks.masks.values():
            m.copy_(flat[offset: offset + m.numel()].view(m.shape))  # never rebinds the mask
            offset += m.numel()
        for p in masks.params.values():
            tdist.broadcast(p.data, src=0)

    def watch(self, controller: Any) -> Any:
        """``controller``, or (distributed, with masks) a view of it that syncs the masks after each
        topology update (``SparsityController.topology_updates``)."""
        if self.enabled and controller.masks is not None:
            return _SyncedTopology(controller, self)
        return controller

    # -- RNG -----------------------------------------------------------------------------------
    def seed_ranks(self, seed: int) -> None:
        """Distinct attack random starts per rank (the model was initialised from ``seed`` on all)."""
        if self.enabled:
            torch.manual_seed(seed * 1_000_003 + self.rank + 1)

    def rng_state(self) -> dict[str, Any]:
        """For the checkpoint: this process's RNG streams, or every rank's when distributed (each
        rank then touches only its own GPU)."""
        if not self.enabled:
            rng: dict[str, Any] = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            return rng
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda_device"] = torch.cuda.get_rng_state(self.device)
        return {"world_size": self.world_size, "ranks": self.all_gather(mine)}

    def set_rng_state(self, rng: dict[str, Any], *, seed: int, step: int) -> None:
        """Restore this rank's RNG streams. A checkpoint of another world size gets fresh per-rank
        streams: the run continues correctly but is no longer bitwise equal to an uninterrupted one."""
        ranks = rng.get("ranks")
        if (ranks is None) != (not self.enabled) or (ranks is not None and len(ranks) != self.world_size):
            warnings.warn(f"resuming a run saved with world size {rng.get('world_size', 1)} on world size "
                          f"{self.world_size}: the global batch is unchanged, but the random streams (attack "
                          "starts) differ from an uninterrupted run", stacklevel=2)
            torch.manual_seed((seed * 1_000_003 + step) * 1_000_003 + self.rank)
            return
        mine = rng if ranks is None else ranks[self.rank]
        torch.set_rng_state(mine["torch"].cpu())
        if "cuda_device" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_device"].cpu(), self.device)
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in mine["cuda"]])

    def report(self, model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Any]:
        """summary.json fields: world size and, per rank, the final mask checksum and weights hash."""
        mine = (mask_checksum(masks), weights_sha256(model))
        seen = self.all_gather(mine)
        return {"world_size": self.world_size, "mask_checksums": [s[0] for s in seen],
                "weights_sha256": [s[1] for s in seen]}


SINGLE = Distributed()


class _SyncedTopology:
    """A masking controller whose topology changes are checked and synced across ranks."""

    def __init__(self, controller: Any, dist: Distributed):
        self.inner, self.dist = controller, dist
        self.seen = controller.topology_updates

    def __getattr__(self, name: str) -> Any:  # every other hook and attribute is the controller's
        return getattr(self.inner, name)

    def after_backward(self, step: int) -> None:
        self.inner.after_backward(step)  # grads are already all-reduced: DDP finishes inside backward()
        if self.inner.topology_updates != self.seen:
            self.seen = self.inner.topology_updates
            self.dist.sync_masks_(self.inner.masks, f"the topology update at step {step}")


def resolve_device(name: str, local_rank: int = 0, local_world: int = 1, world: int = 1) -> torch.device:
    """``auto`` -> cuda if available; distributed, each local rank takes ``cuda:LOCAL_RANK``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available here; use device=cpu or device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return torch.device(name)
    if local_world > 1 and torch.cuda.device_count() < local_world:
        raise ConfigError(f"device=cuda with {local_world} processes on this node but only "
                          f"{torch.cuda.device_count()} GPUs visible; use --nproc_per_node <= the GPU count")
    return torch.device("cuda", local_rank) if world > 1 else torch.device("cuda")


def setup(cfg: Any, *, training: bool = True) -> Distributed:
    """Check ``cfg`` against the torchrun world and join the process group (idempotent).

    Every check here depends only on the config and the environment, so all ranks fail alike with
    the same ConfigError before any collective: none is left waiting for the others. ``training=False``
    (``sparta eval --nproc``) skips the checks of training settings (global batch, SyncBatchNorm).
    """
    rank, world, local_rank, local_world = env_world()
    device = resolve_device(cfg.device, local_rank, local_world, world)
    if world == 1:
        return SINGLE if device.type == "cpu" else Distributed(device=device)
    if training and cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must be a multiple of the world "
                          f"size {world} (each rank takes batch_size / world_size images per step)")
    if training and cfg.distributed.sync_batchnorm and device.type != "cuda":
        raise ConfigError("distributed.sync_batchnorm needs CUDA (SyncBatchNorm has no CPU implementation); "
                          "set it to false on CPU")
    if not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # device_id binds NCCL to this rank's GPU at once (torch >= 2.3; older builds bind lazily)
        bind = device.type == "cuda" and "device_id" in inspect.signature(tdist.init_process_group).parameters
        device_id: dict[str, Any] = {"device_id": device} if bind else {}
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world, **device_id)
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=device)


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker that has left its process group, with exit status ``code``.

    A gloo worker thread may still be destroying the last collective's tensors, which takes the GIL;
    once the interpreter finalizes, that thread is unwound and the process aborts ("terminate called
    without an active exception") after the run ended cleanly. So the exit handlers run and the
    output is flushed here, and the process ends without finalizing the interpreter."""
    shutdown(clean=False)  # a no-op where the process group was left already
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown(*, clean: bool = True) -> None:
    """Leave the process group. ``clean``: all ranks got here, so wait for the others first (gloo
    can abort the process when a peer tears its connections down while this rank still uses them)."""
    if tdist.is_available() and tdist.is_initialized():
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()
