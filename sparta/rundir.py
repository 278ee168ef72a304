"""The run directory: everything one run produces, in a layout other tools rely on.

::

    out_dir/config.yaml            fully resolved config
    out_dir/metrics.jsonl          one JSON object per evaluated epoch
    out_dir/outcomes.jsonl         per-image test outcomes per evaluated epoch, then the gap set's (sparta.outcomes)
    out_dir/checkpoints/last.pt    latest state (resume point)
    out_dir/checkpoints/best.pt    highest validation robust accuracy
    out_dir/summary.json           final numbers, written at the end

Every file is replaced atomically (temporary file, fsync, rename), so a kill never leaves a torn
file; ``metrics.jsonl`` and ``outcomes.jsonl`` are appended a whole line at a time and cut back to
the last checkpoint on resume.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError, ConfigError
from .outcomes import FILE as OUTCOMES_FILE


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than producing an unreadable file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"


# everything a run (and the tools reading it) may write into its folder
RUN_FILES = {"config.yaml", "metrics.jsonl", OUTCOMES_FILE, "summary.json", "checkpoints", "plots", "tensorboard",
             "final-eval.json"}  # the last: `sparta reproduce`


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    outcomes = property(lambda self: self.path / OUTCOMES_FILE)
    summary = property(lambda self: self.path / "summary.json")
    last = property(lambda self: self.path / "checkpoints" / "last.pt")
    best = property(lambda self: self.path / "checkpoints" / "best.pt")

    def is_run(self) -> bool:
        return self.config.is_file() and self.last.is_file()

    def create(self, config_yaml: str, *, overwrite: bool) -> None:
        """Start a fresh run here; refuses to touch an existing folder unless ``overwrite``."""
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise ConfigError(
                    f"out_dir {self.path} already exists; pass --resume {self.path} to continue it, "
                    "--overwrite to replace it, or choose another out_dir"
                )
            foreign = sorted(p.name for p in self.path.iterdir() if p.name not in RUN_FILES)
            if not self.config.is_file() or foreign:
                raise ConfigError(f"--overwrite refuses to delete {self.path}: it holds files a sparta run does not "
                                  f"write ({', '.join(foreign[:3]) or 'no config.yaml'})")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, config_yaml)

    def require_run(self) -> None:
        if not self.path.is_dir():
            raise CheckpointError(f"cannot resume {self.path}: the folder does not exist")
        if not self.is_run():
            raise CheckpointError(
                f"cannot resume {self.path}: it is not a sparta run (needs config.yaml and checkpoints/last.pt)"
            )

    def append_metrics(self, record: dict[str, Any]) -> None:
        _append_line(self.metrics, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_lines(self.metrics)

    def truncate_metrics(self, keep: int) -> list[dict[str, Any]]:
        """Keep the first ``keep`` records (those the resumed checkpoint has seen); also cut
        ``outcomes.jsonl`` back to the evaluations of those records."""
        records = self.read_metrics()[:keep]
        write_text_atomic(self.metrics, "".join(json.dumps(_jsonable(r)) + "\n" for r in records))
        if self.outcomes.is_file():
            self.truncate_outcomes(records)
        return records

    def append_outcomes(self, line: dict[str, Any]) -> None:
        """One ``outcomes.record`` line."""
        _append_line(self.outcomes, line)

    def read_outcomes(self) -> list[dict[str, Any]]:
        return _read_lines(self.outcomes)

    def truncate_outcomes(self, kept: list[dict[str, Any]]) -> None:
        """Keep the test outcomes of the epochs of ``kept`` metrics records; drop the rest (the epochs
        the resumed run evaluates again, and the gap record, which the summary writes again)."""
        epochs = {(r["stage"], r["epoch"]) for r in kept}
        lines = [o for o in self.read_outcomes() if o["split"] == "test" and (o["stage"], o["epoch"]) in epochs]
        write_text_atomic(self.outcomes, "".join(json.dumps(o) + "\n" for o in lines))

    def remove_torn_writes(self) -> None:
        """Delete the temporary files of writes a kill cut short (``atomic_write`` names them
        ``.<file>.<random>.tmp``); the files they were to replace are intact."""
        for folder in (self.path, self.path / "checkpoints"):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomic(self.summary, dumps(summary))


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is not trusted
    return records


class TensorBoardLog:
    """Every metrics record as TensorBoard scalars under ``out_dir/tensorboard`` (optional extra).

    Tags are ``<stage>/<key>``; the x axis is the epoch counted across stages (as in ``sparta
    report``). ``earlier`` are the records already in metrics.jsonl (a resumed run), which set where
    the axis continues.
    """

    def __init__(self, run_dir: Path, earlier: list[dict[str, Any]]):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional dependency: tensorboard)
        except ImportError:
            raise ConfigError("logging.tensorboard needs the tensorboard package: "
                              "pip install 'sparta[tensorboard]'") from None
        self.stage, self.offset, self.x = None, 0, 0
        for record in earlier:
            self._position(record)
        # opened at the first record: the run directory does not exist before the first stage starts
        self.open = lambda: SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer: SummaryWriter | None = None

    def _position(self, record: dict[str, Any]) -> int:
        if record["stage"] != self.stage:  # a new stage starts where the previous one ended
            self.stage, self.offset = record["stage"], self.x
        self.x = self.offset + int(record["epoch"])
        return self.x

    def add(self, record: dict[str, Any]) -> None:
        self.writer = self.writer or self.open()
        x = self._position(record)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{record['stage']}/{key}", value, x)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
