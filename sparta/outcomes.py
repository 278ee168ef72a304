"""Per-image outcomes of an evaluation: which images a model classified correctly, clean and under attack.

Runs scored on the same images are paired: the difference of two accuracies is best judged image
by image (``sparta.claims``), which needs each image's outcome, not only the accuracy. An outcome
vector over ``n`` images is stored as a Python int whose bit ``i`` is image ``i`` (the order of the
evaluated ``ImageSet``), written to JSON as base64 of its ``ceil(n / 8)`` little-endian bytes:
10,000 images take 1,668 characters. No torch, so readers of results need none.

A run folder's ``outcomes.jsonl`` holds one record per evaluation (``record``): the stage, the
epoch, the split (``test``, ``val``, ``gap``: the first ``eval.gap_subset`` training images) and the
clean and robust outcome vectors; ``sparta.rundir.RunDir`` appends, reads and (on resume) cuts it.
"""
from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FILE = "outcomes.jsonl"


def pack(bits: Iterable[bool | int] | np.ndarray) -> int:
    """Bit ``i`` of the result is ``bits[i]`` (a sequence or a (n,) array of bools or 0/1)."""
    array = np.asarray(bits if isinstance(bits, np.ndarray) else list(bits), dtype=bool)
    return int.from_bytes(np.packbits(array, bitorder="little").tobytes(), "little")


def encode(value: int, n: int) -> str:
    """base64 of the ``ceil(n / 8)`` little-endian bytes of ``value`` (an outcome vector over ``n`` images)."""
    if value < 0 or value >> n:
        raise ValueError(f"an outcome vector over {n} images must lie in [0, 2**{n}), got {value.bit_length()} bits")
    return base64.b64encode(value.to_bytes((n + 7) // 8, "little")).decode("ascii")


def decode(text: str) -> int:
    return int.from_bytes(base64.b64decode(text), "little")


@dataclass(frozen=True)
class Outcomes:
    """Clean and robust correctness of ``n`` images (bit ``i`` = image ``i``)."""

    n: int
    clean: int
    robust: int

    def accuracy(self, which: str = "robust") -> float:
        """Percent of the ``n`` images correct (``which``: "clean" or "robust")."""
        return 100.0 * getattr(self, which).bit_count() / max(self.n, 1)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "clean": encode(self.clean, self.n), "robust": encode(self.robust, self.n)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Outcomes:
        return cls(int(d["n"]), decode(d["clean"]), decode(d["robust"]))


def record(outcomes: Outcomes, *, stage: str, epoch: int, split: str) -> dict[str, Any]:
    """One line of ``outcomes.jsonl``."""
    return {"stage": stage, "epoch": int(epoch), "split": split, **outcomes.to_json()}


def find(records: Iterable[Mapping[str, Any]], *, split: str, epoch: int, stage: str | None = None) -> Outcomes | None:
    """The last record of ``split`` at ``epoch`` (of ``stage``, when given), or None. The last one wins:
    a resumed run may have evaluated an epoch again."""
    found = None
    for r in records:
        if r["split"] == split and r["epoch"] == epoch and (stage is None or r["stage"] == stage):
            found = r
    return None if found is None else Outcomes.from_json(found)
