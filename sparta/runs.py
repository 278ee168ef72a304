"""Run directories as data: loading them, the numbers of their tables, grouping seeds into configs.

Reads only what a run directory promises (README, "The run directory"): ``config.yaml``,
``metrics.jsonl`` and, once the run finished, ``summary.json``. Writes nothing. ``sparta.report``
turns these numbers into markdown and ``sparta.plots`` into figures.

Runs that share a config up to ``GROUP_IGNORED`` (seed, name, out_dir, ...) are seeds of one config,
as in the tables of Chen et al. 2022 ("Sparsity Winning Twice"). The best epoch is the one training
selected (``summary.json``'s ``best_epoch``), or, while a run is unfinished, the one the same rule
picks from ``metrics.jsonl`` (``sparta.protocol.best_index``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import SpartaError
from .protocol import best_index
from .rundir import RunDir

# config keys that do not change what a run computes: runs equal up to these are seeds of one config
GROUP_IGNORED = ("seed", "name", "out_dir", "progress", "data.root")
_MAX_SEARCH_DEPTH = 4  # how deep under a parent folder run directories are looked for


# ---------------------------------------------------------------- loading


@dataclass
class Run:
    """One run directory as read from disk. ``summary`` is None while the run has not finished."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]
    label: str = ""  # unique name within one report (set by ``write_report``)

    @property
    def name(self) -> str:
        return str((self.summary or {}).get("name") or self.config.get("name") or self.path.name)

    @property
    def method(self) -> str:
        m = (self.summary or {}).get("method") or (self.config.get("method") or {}).get("name")
        return str(m or "?")

    @property
    def seed(self) -> Any:
        return (self.summary or {}).get("seed", self.config.get("seed"))

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def stats(self) -> dict[str, Any]:
        """The numbers of the tables: from summary.json, or derived from metrics.jsonl while unfinished."""
        return run_stats(self)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def load_run(path: str | Path) -> Run:
    """Read a run directory (needs ``config.yaml`` and ``metrics.jsonl``; ``summary.json`` if finished)."""

    path = Path(path)
    if not path.is_dir():
        raise SpartaError(f"{path} is not a run directory: the folder does not exist")
    if not is_run_dir(path):
        missing = [f for f in ("config.yaml", "metrics.jsonl") if not (path / f).is_file()]
        raise SpartaError(f"{path} is not a run directory: it has no {' and no '.join(missing)}")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise SpartaError(f"{path / 'config.yaml'} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise SpartaError(f"{path / 'config.yaml'} does not hold a mapping of config keys")
    records = [r for r in RunDir(path).read_metrics() if isinstance(r, dict)]
    if not records:
        raise SpartaError(f"{path} has no evaluated epoch yet (metrics.jsonl is empty)")
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise SpartaError(f"{path / 'summary.json'} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return Run(path=path, config=config, summary=summary, records=records)


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Run directories named by ``paths``: each path is a run, or a folder holding runs below it.

    Returns (run paths in order, notes). A run found below a parent folder that has a config but no
    evaluated epoch yet is skipped with a note; a path that holds no run at all is a ``SpartaError``.
    """
    found: list[Path] = []
    notes: list[str] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            found.append(p)
            continue
        if not p.is_dir():
            raise SpartaError(f"{p} is not a run directory: the folder does not exist")
        if (p / "config.yaml").is_file():
            raise SpartaError(f"{p} is not a run directory yet: it has config.yaml but no metrics.jsonl")
        below = []
        for root, dirs, files in os.walk(p):
            root_path = Path(root)
            depth = len(root_path.relative_to(p).parts)
            if "config.yaml" in files and root_path != p:
                if "metrics.jsonl" in files:
                    below.append(root_path)
                else:
                    notes.append(f"skipped {root_path}: config.yaml but no metrics.jsonl yet")
                dirs.clear()  # a run's own subfolders (checkpoints, plots) hold no further runs
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _MAX_SEARCH_DEPTH else []
        if not below:
            raise SpartaError(f"{p} is not a run directory (needs config.yaml and metrics.jsonl) "
                              f"and holds none below it")
        found += sorted(below)
    unique, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, notes


# ---------------------------------------------------------------- numbers


def present(values: Iterable[float | None]) -> list[float]:
    """The values that were recorded (not None)."""
    return [v for v in values if v is not None]


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def stage_segments(records: list[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """Consecutive records of one stage: [(stage name, record indices)], in run order."""
    segments: list[tuple[str, list[int]]] = []
    for i, r in enumerate(records):
        stage = str(r.get("stage") or "train")
        if not segments or segments[-1][0] != stage:
            segments.append((stage, []))
        segments[-1][1].append(i)
    return segments


def stage_axis(records: list[dict[str, Any]], summary: dict[str, Any] | None = None
               ) -> tuple[list[float], list[tuple[float, str]]]:
    """x of each record as the cumulative epoch over all stages, and [(x where a stage starts, name)].

    A stage lasts its ``epochs`` from summary ``stages`` when given (matched by name, in order, so a
    stage that logged no evaluated epoch still takes its place), else its last logged epoch (the last
    epoch of a stage that runs to its end is always evaluated).
    """
    planned = [st for st in ((summary or {}).get("stages") or []) if isinstance(st, dict)]
    xs = [0.0] * len(records)
    starts: list[tuple[float, str]] = []
    offset, p = 0.0, 0
    for stage, idx in stage_segments(records):
        length = None
        j = next((k for k in range(p, len(planned)) if str(planned[k].get("name")) == stage), None)
        if j is not None:
            for skipped in planned[p:j]:  # finished stages without an evaluated epoch
                starts.append((offset, str(skipped.get("name", "?"))))
                offset += finite(skipped.get("epochs")) or 0.0
            length, p = finite(planned[j].get("epochs")), j + 1
        starts.append((offset, stage))
        last = max((finite(records[i].get("epoch")) or 0.0) for i in idx)
        for i in idx:
            xs[i] = offset + (finite(records[i].get("epoch")) or 0.0)
        offset += max(length or 0.0, last)
    return xs, starts


def cumulative(records: list[dict[str, Any]], key: str) -> list[float | None]:
    """``key`` (e.g. wall_time_s, train_flops) as a run-long cumulative value.

    The run directory logs these cumulative over the whole run already; should a stage restart its
    count (a value at a stage's first record below the previous stage's last), the earlier stages'
    total is added, so earlier stages are always counted.
    """
    out: list[float | None] = [None] * len(records)
    offset, last = 0.0, None
    for _, idx in stage_segments(records):
        first = True
        for i in idx:
            v = finite(records[i].get(key))
            if v is None:
                continue
            if first and last is not None and v < last - offset:
                offset = last
            first = False
            out[i] = v + offset
            last = out[i]
    return out


def time_to_robustness(records: list[dict[str, Any]], target_ra: float) -> dict[str, Any] | None:
    """Cost at which the run's model first has test RA >= ``target_ra`` (percent), or None if never.

    Only epochs of the last stage count: it trains the model the run produces, while an earlier
    stage's network (a boosting finder's dense FGSM model, a search) is pruned or discarded. Returns
    ``{"wall_time_s", "train_flops", "epoch", "stage"}``: cumulative wall time (training plus
    per-epoch evaluation, as logged) and training FLOPs at that evaluated epoch, *including every
    earlier stage* (ticket search, finder); ``train_flops`` is None when the run does not log it.
    """
    wall = cumulative(records, "wall_time_s")
    flops = cumulative(records, "train_flops")
    for i in stage_segments(records)[-1][1] if records else []:
        r = records[i]
        ra = finite(r.get("test_robust_acc"))
        if ra is not None and ra >= target_ra:
            return {"wall_time_s": wall[i], "train_flops": flops[i], "epoch": r.get("epoch"),
                    "stage": r.get("stage", "train")}
    return None


def best_record(records: list[dict[str, Any]], summary: dict[str, Any] | None) -> int:
    """Index of the best epoch: summary's best_epoch (in the last stage, or ``best_stage``), else the
    epoch training selects (``sparta.protocol.best_index``) among the last stage's records."""
    segments = stage_segments(records)
    if summary and summary.get("best_epoch") is not None:
        stage = summary.get("best_stage") or segments[-1][0]
        for name, idx in reversed(segments):
            if name == stage:
                for i in idx:
                    if records[i].get("epoch") == summary["best_epoch"]:
                        return i
    idx = segments[-1][1]
    return idx[best_index([records[i] for i in idx])]


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def run_stats(run: Run) -> dict[str, Any]:
    """Table numbers of one run (accuracies in percent; None where not measured)."""
    s = run.summary or {}
    recs = run.records
    best_i = best_record(recs, run.summary)
    best, final = recs[best_i], recs[-1]

    def pick(key: str, record_key: str, record: dict[str, Any]) -> float | None:
        return finite(s[key]) if key in s else finite(record.get(record_key))

    out = {
        "ra_best": pick("ra_best", "test_robust_acc", best), "ra_final": pick("ra_final", "test_robust_acc", final),
        "sa_best": pick("sa_best", "test_clean_acc", best), "sa_final": pick("sa_final", "test_clean_acc", final),
        "train_flops": finite(s["train_flops"]) if "train_flops" in s else cumulative(recs, "train_flops")[-1],
        "inference_flops": finite(s.get("inference_flops")),
        "inference_flops_dense": finite(s.get("inference_flops_dense")),
        "train_flops_dense": finite(s.get("train_flops_dense")),
        "robust_gap": finite(s.get("robust_gap")),
        "train_robust_acc": finite(s.get("train_robust_acc")),  # on the gap subset of gap_subset training images
        "gap_subset": s.get("gap_subset"),
        "density": pick("density_final", "density", final),
        "wall_time_s": finite(s["wall_time_s"]) if "wall_time_s" in s else cumulative(recs, "wall_time_s")[-1],
        "best_epoch": s.get("best_epoch", best.get("epoch")),
        "best_stage": s.get("best_stage", best.get("stage", "train")),
        "eb_epoch": s.get("eb_epoch"),
        "best_index": best_i,
    }
    out["ra_diff"] = (finite(s.get("robust_overfitting")) if "robust_overfitting" in s
                      else _sub(out["ra_best"], out["ra_final"]))
    out["sa_diff"] = finite(s.get("sa_overfitting")) if "sa_overfitting" in s else _sub(out["sa_best"], out["sa_final"])
    if out["density"] is None and run.method == "dense":
        out["density"] = 1.0
    return out


# ---------------------------------------------------------------- grouping


def _without(config: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for dotted in keys:
        node: object = config
        for part in dotted.split(".")[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(dotted.split(".")[-1], None)
    return config


def config_key(config: dict[str, Any]) -> str:
    """Runs with equal keys differ only in ``GROUP_IGNORED`` (seed, name, out_dir, ...)."""
    return json.dumps(_without(config, GROUP_IGNORED), sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped by config up to ``GROUP_IGNORED``, groups in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_key(run.config), []).append(run)
    return list(groups.values())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, default=str) if isinstance(v, (list, dict)) else v
    return out


def differences(groups: list[list[Run]], limit: int = 5) -> list[str]:
    """Per group, the config settings that tell it apart from the other groups (``key=value``)."""
    flats = [_flatten(_without(g[0].config, GROUP_IGNORED)) for g in groups]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({repr(f.get(k, "<unset>")) for f in flats}) > 1]
    varying.sort(key=lambda k: (not k.startswith("method."), k))  # what the method is first
    out = []
    for f in flats:
        items = [f"{k}={_setting(f.get(k, '-'))}" for k in varying]
        out.append(", ".join(items[:limit]) + (f", … (+{len(items) - limit})" if len(items) > limit else ""))
    return out


def _setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def group_label(group: list[Run]) -> str:
    """A config's name: its runs' common name without the seed suffix (else their common prefix, else the method)."""
    bases = {re.sub(rf"[-_.]?(seed|s)?{re.escape(str(r.seed))}$", "", r.name) if r.seed is not None else r.name
             for r in group}
    if len(bases) == 1 and next(iter(bases)):
        return next(iter(bases))
    prefix = os.path.commonprefix([r.name for r in group]).rstrip("-_. ")
    return prefix or group[0].method


def unique_labels(labels: list[str]) -> list[str]:
    """``labels`` with ``#2``, ``#3``, ... appended to repeats."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def run_labels(runs: Sequence[Run]) -> list[str]:
    """A unique label per run: its name, plus ``-s<seed>`` and then its folder name where names repeat."""
    names = [r.name for r in runs]
    labels = [n if names.count(n) == 1 else f"{n}-s{r.seed}" for n, r in zip(names, runs)]
    labels = [lab if labels.count(lab) == 1 else f"{lab}-{r.path.name}" for lab, r in zip(labels, runs)]
    return unique_labels(labels)


def safe_name(name: str) -> str:
    """``name`` as a file or folder name (other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "run"

