"""A data loader that keeps the whole uint8 dataset on the training device (airbench style).

Shuffling, cropping and flipping are a handful of tensor ops per batch on the device: no worker
processes, no per-image Python. Every random choice is a pure function of (seed, epoch, batch), so
``epoch(e, start_batch=k)`` reproduces batches k.. of ``epoch(e)`` exactly: a run resumed mid-epoch
sees the same data as one that never stopped.

Distributed training: global batch b is the ``batch_size`` consecutive indices b*B..(b+1)*B-1 of
the epoch's permutation, and rank r takes positions r::world_size of it, so the ranks see disjoint
images whose union is exactly the single-process batch b (augmented identically, too: the random
offsets are drawn for the whole global batch and sliced the same way). With world_size > 1 and
drop_last=False, a final short batch with fewer images than ranks is dropped (on every rank alike,
so all ranks run the same number of steps); a final batch of at least world_size images is kept,
and the ranks' shares then differ by at most one image.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import ImageSet

_MIX = 1_000_003  # a prime, mixes (seed, epoch, batch) into one generator seed


class DeviceLoader:
    """Keeps a uint8 ImageSet on ``device``; yields float batches in [0, 1], shuffled/augmented on
    whole batches there (airbench style): no per-image Python, no worker processes."""

    def __init__(self, data: ImageSet, batch_size: int, *, device: torch.device | str, shuffle: bool,
                 augment: bool, seed: int = 0, drop_last: bool = False, pad: int = 4, rank: int = 0,
                 world_size: int = 1):
        n = len(data)
        if not 1 <= world_size or not 0 <= rank < world_size:
            raise ConfigError(f"DeviceLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size > n:
            raise ConfigError(f"batch_size {batch_size} is larger than the {n} images of the dataset")
        if batch_size < world_size:
            raise ConfigError(f"batch_size {batch_size} (global) must be at least world_size {world_size}")
        if pad < 0:
            raise ConfigError(f"DeviceLoader: pad must be >= 0, got {pad}")
        self.device = torch.device(device)
        # (N, C, H, W) uint8, moved once (no copy if already there)
        self.images = data.images.to(self.device).contiguous()
        self.labels = data.labels.to(self.device)  # (N,) int64
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.pad = seed, drop_last, pad
        self.rank, self.world_size = rank, world_size

        full, rest = divmod(n, batch_size)
        # A final short batch is kept unless drop_last, or it would leave some rank empty.
        self._num_batches = full + (rest > 0 and not drop_last and rest >= world_size)
        _, c, h, w = self.images.shape
        self._rows = torch.arange(h, device=self.device)  # (H,) reused by every crop
        self._cols = torch.arange(w, device=self.device)  # (W,)

    def __len__(self) -> int:
        """Batches per epoch (global batches: the same on every rank)."""
        return self._num_batches

    def global_batch_size(self, b: int) -> int:
        """Images in global batch b (all ranks together): batch_size, or fewer for a final short one."""
        return min(self.batch_size, len(self.labels) - b * self.batch_size)

    @property
    def num_examples(self) -> int:
        """Images this rank yields per epoch (len(data) for one process when nothing is dropped)."""
        end = min(self._num_batches * self.batch_size, len(self.labels))
        full, rest = divmod(end, self.batch_size)
        share = lambda k: len(range(self.rank, k, self.world_size))  # noqa: E731  rank's share of k images
        return full * share(self.batch_size) + share(rest)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_batch.. of ``epoch``: x (B, C, H, W) float32 in [0, 1], y (B,) int64, on device."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        n, bs = len(self.labels), self.batch_size
        if self.shuffle:
            # The permutation is drawn on the CPU so it is the same whatever the device.
            g = torch.Generator().manual_seed((self.seed * _MIX + epoch) % (1 << 63))
            perm = torch.randperm(n, generator=g).to(self.device)
        else:
            perm = torch.arange(n, device=self.device)
        for b in range(start_batch, self._num_batches):
            glob = perm[b * bs: (b + 1) * bs]  # global batch b, (B_global,)
            idx = glob[self.rank:: self.world_size]  # this rank's share, (B,)
            x = self.images.index_select(0, idx)  # the one copy of the batch, uint8 (B, C, H, W)
            if self.augment:
                x = self._augment(x, len(glob), self._batch_seed(epoch, b))
            yield x.float().div_(255), self.labels.index_select(0, idx)

    def _batch_seed(self, epoch: int, b: int) -> int:
        return ((self.seed * _MIX + epoch) * _MIX + b) % (1 << 63)

    def _augment(self, x: torch.Tensor, n_global: int, seed: int) -> torch.Tensor:
        """Random crop with zero padding ``pad`` and horizontal flip (p = 0.5), on uint8 (B, C, H, W).

        The random numbers are drawn for the whole global batch and sliced like the indices, so an
        image gets the same augmentation whatever the number of ranks.
        """
        g = torch.Generator(device=self.device).manual_seed(seed)
        p, sl = self.pad, slice(self.rank, None, self.world_size)
        dy = torch.randint(0, 2 * p + 1, (n_global,), generator=g, device=self.device)[sl]  # (B,) crop offsets
        dx = torch.randint(0, 2 * p + 1, (n_global,), generator=g, device=self.device)[sl]
        flip = (torch.rand(n_global, generator=g, device=self.device) < 0.5)[sl]  # (B,) bool
        b, c, h, w = x.shape
        hp, wp = h + 2 * p, w + 2 * p
        xp = F.pad(x, (p, p, p, p))  # zeros around, (B, C, Hp, Wp)
        # Source pixel of every output pixel in the padded image; flipping reverses the columns read.
        rows = dy[:, None] + self._rows  # (B, H)
        cols = dx[:, None] + torch.where(flip[:, None], w - 1 - self._cols, self._cols)  # (B, W)
        src = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w)  # (B, 1, H*W) flat index
        # One gather does crop and flip for all images; a materialised index gathers ~2x faster on CPU.
        src = src.expand(b, c, h * w).contiguous()
        return xp.view(b, c, hp * wp).gather(2, src).view(b, c, h, w)
