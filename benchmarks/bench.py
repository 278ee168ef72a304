"""Speed benchmarks of the adversarial training step, sparsity bookkeeping and the data path.

Everything runs in one process on one device so the ratios are comparable; each timing is the
median (with the 25th/75th percentiles) of repeated iterations after warm-up. Writes one JSON file
and prints a table::

    python benchmarks/bench.py                 # full: preact_resnet18, batch 32 on CPU / 128 on CUDA
    python benchmarks/bench.py --quick         # CI-sized: narrow model, tiny batch, few repeats

Measured (ids as in the performance issue):

- B1  dense PGD-10 AT step / its floor = 10 x (forward + input-only backward) + 1 x (forward + full
      backward). Also reported: 11 plain forward + full backward passes of the same batch.
- B2  Flying Bird step at density 0.2 (no topology update in the step) / dense step.
- B3  one Flying Bird topology update / one dense training step.
- B4  channel ticket (~20% of the weights, physically slimmed) step speedup / its FLOPs ratio.
- B5  DeviceLoader images/s with augmentation / training step images/s.
- B6  dense PGD-10 AT step under bf16 autocast (``train.precision: bf16``) / the fp32 step; also the
      bf16 step with channels_last conv weights, as ``train.channels_last: true`` runs it.
- B7  (``--compile``) dense step with ``train.compile`` (torch.compile, default backend) / the eager
      step, timed back to back after the compiling first step; no target, it says whether to use it.

B2 and B4 run their step and a dense step alternately, so both sides of the ratio see the same
machine (their sequential ratios drifted by +-5% between runs on a shared machine). Each measurement
also records the peak memory while it ran (see :class:`PeakMemory`).
``--profile`` adds the top operators of one fp32 and one bf16 dense step (torch.profiler) to the JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sparta.config import from_dict
from sparta.data.base import ImageSet
from sparta.data.loader import DeviceLoader
from sparta.flops import forward_flops_by_layer
from sparta.models import create_model
from sparta.objectives import build_objective
from sparta.precision import StepPrecision, cpu_name, fast_bf16
from sparta.sparse.channels import bn_channel_masks, slim
from sparta.sparse.controllers import Dense, DynamicSparse
from sparta.sparse.masks import MaskSet
from sparta.train import train_step


class PeakMemory:
    """Peak memory while one measurement runs, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (live tensors) after ``reset_peak_memory_stats``. CPU: the
    process's peak resident set size (``VmHWM`` in ``/proc/self/status``), reset before each measurement
    by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0), and its rise over the resident set at the
    reset. RSS counts everything the process holds (interpreter, libraries, model, data, allocator
    caches), so ``increase_mb`` is the honest per-benchmark figure; where the reset is not possible the
    process-lifetime peak (``ru_maxrss``) is reported and ``measure`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start_mb = 0.0
        self.measure = "cuda max_memory_allocated (tensors)" if device.type == "cuda" else ""

    @staticmethod
    def _status_mb(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
        raise KeyError(field)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            # the reset value itself: VmHWM never falls below it until the next reset, so the rise
            # cannot come out negative (reading VmRSS here instead could, by a later allocation)
            self.start_mb = self._status_mb("VmHWM")
            self.measure = "cpu peak RSS (VmHWM, reset before the measurement)"
        except OSError:
            self.start_mb = 0.0
            self.measure = "cpu peak RSS of the process so far (ru_maxrss; VmHWM could not be reset)"

    def read(self) -> dict[str, float | str]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif self.measure.startswith("cpu peak RSS (VmHWM"):
            # the kernel updates VmHWM lazily (at unmaps and exits): the current RSS may be above it
            peak = max(self._status_mb("VmHWM"), self._status_mb("VmRSS"))
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return {"peak_mb": peak, "increase_mb": peak - self.start_mb, "measure": self.measure}


def timed(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> dict[str, object]:
    """Median and quartiles of ``fn``'s wall time in seconds, and the peak memory while it ran."""
    return timed_alternately([fn], warmup=warmup, repeats=repeats, device=device)[0]


def timed_alternately(fns: list[Callable[[], object]], *, warmup: int, repeats: int,
                      device: torch.device) -> list[dict[str, object]]:
    """``timed`` for several functions run in turn (a, b, a, b, ...), so that a drift in the machine's
    speed affects all alike: how a ratio of two of them is taken on a shared machine. The peak memory
    is that of all of them together."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory = PeakMemory(device)
    memory.reset()
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    peak = memory.read()
    results = []
    for t in times:
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        results.append({"median_s": statistics.median(t), "p25_s": q[0], "p75_s": q[2], "repeats": repeats,
                        "memory": peak})
    return results


def profile_table(fn: Callable[[], object], device: torch.device, rows: int = 15) -> str:
    """torch.profiler's operator table (sorted by self time) of one call of ``fn`` after a warm-up call."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI: checks that it runs, not speed")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128 on CUDA, 32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per measurement")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/bench-<device>[-quick].json)")
    parser.add_argument("--profile", action="store_true",
                        help="add torch.profiler tables of a fp32 and a bf16 dense step")
    parser.add_argument("--compile", action="store_true",
                        help="add B7, the torch.compile'd dense step "
                             "(its compilation takes about a minute on 2 CPU cores)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    batch = args.batch or (4 if args.quick else (128 if device.type == "cuda" else 32))
    width = 8 if args.quick else 64
    warmup, repeats = (1, 3) if args.quick else (2, 10)
    repeats = args.repeats or repeats
    cfg = from_dict({"epochs": 200, "batch_size": batch,
                     "model": {"name": "preact_resnet18", "base_width": width},
                     "attack": {"name": "pgd", "eps": "8/255", "alpha": "2/255", "steps": 10}})
    torch.manual_seed(0)
    model = create_model("preact_resnet18", num_classes=10, in_channels=3, image_size=32,
                         mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), base_width=width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    objective = build_objective(cfg, steps_per_epoch=391)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    results: dict[str, object] = {}
    fp32 = StepPrecision("fp32", device)

    def dense_step(precision: StepPrecision = fp32) -> None:
        train_step(model, optimizer, Dense(), objective, x, y, step=1, attack_bn_mode="train", precision=precision)

    def input_grad_pass() -> None:  # what one attack step costs at least
        x_in = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_in), y, reduction="sum"), x_in)

    def full_pass() -> None:  # what the training step costs at least
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def floor() -> None:
        for _ in range(10):
            input_grad_pass()
        full_pass()

    def eleven_full_passes() -> None:
        for _ in range(11):
            full_pass()

    def bf16_step_of(step_model: torch.nn.Module) -> Callable[[], None]:
        """The dense bf16 step of ``step_model`` with an SGD optimizer of its own; the model and the
        optimizer live only in the returned step, so dropping it frees them."""
        step_opt = torch.optim.SGD(step_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step() -> None:
            train_step(step_model, step_opt, Dense(), objective, x, y, step=1, attack_bn_mode="train",
                       precision=bf16)

        return step

    # B6's channels_last copy: NHWC conv weights as train.channels_last sets them (inputs stay NCHW;
    # the first convolution's output is already NHWC)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    bf16 = StepPrecision("bf16", device)
    bf16_cl_step = bf16_step_of(model_cl)

    model.train()
    model_cl.train()
    # fp32 and bf16 steps back to back, so a change in the machine's load affects both alike
    dense = timed(dense_step, warmup=warmup, repeats=repeats, device=device)
    bf16_t = timed(lambda: dense_step(bf16), warmup=warmup, repeats=repeats, device=device)
    bf16_cl = timed(bf16_cl_step, warmup=warmup, repeats=repeats, device=device)
    floor_t = timed(floor, warmup=warmup, repeats=repeats, device=device)
    eleven = timed(eleven_full_passes, warmup=warmup, repeats=repeats, device=device)
    results["B1_dense_pgd10_step"] = {"step": dense, "floor": floor_t, "eleven_full_passes": eleven,
                                      "ratio_step_over_floor": dense["median_s"] / floor_t["median_s"],
                                      "ratio_step_over_eleven_full": dense["median_s"] / eleven["median_s"],
                                      "target": "<= 1.10", "peak_memory_mb": dense["memory"]["peak_mb"]}
    del model_cl, bf16_cl_step  # frees the channels_last copy and its optimizer before B2

    # B2 and B4 time their step alternately with the dense one (the ratio's two sides see the same
    # machine); the sparse model is a copy, so the dense step stays dense
    fb_model = copy.deepcopy(model)
    fb_opt = torch.optim.SGD(fb_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    controller = DynamicSparse(fb_model, fb_opt, MaskSet.random(fb_model, 0.2, "igq", seed=0),
                               total_steps=200 * 391, update_every=900)

    def fb_step() -> None:
        train_step(fb_model, fb_opt, controller, objective, x, y, step=1, attack_bn_mode="train")

    fb, fb_dense = timed_alternately([fb_step, dense_step], warmup=warmup, repeats=repeats, device=device)
    results["B2_flying_bird_step"] = {"step": fb, "dense_step": fb_dense,
                                      "ratio_sparse_over_dense": fb["median_s"] / fb_dense["median_s"],
                                      "density": controller.masks.density(), "target": "<= 1.03",
                                      "peak_memory_mb": fb["memory"]["peak_mb"]}

    fb_opt.zero_grad(set_to_none=True)
    F.cross_entropy(fb_model(x), y).backward()  # dense gradients for growth
    update_step = controller.update_every  # a step at which after_backward changes the topology
    update = timed(lambda: controller.after_backward(update_step), warmup=1, repeats=max(3, repeats // 3),
                   device=device)
    results["B3_topology_update"] = {"update": update,
                                     "ratio_update_over_dense_step": update["median_s"] / dense["median_s"],
                                     "growth": controller.growth, "target": "<= 1.0",
                                     "peak_memory_mb": update["memory"]["peak_mb"]}

    # B4: a channel ticket keeping ~20% of the weights (sqrt(0.2) of the channels, random |gamma|),
    # physically slimmed, against the dense network: same batch, same attack
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0, 1)
    slim_model, _ = slim(model, bn_channel_masks(model, keep_fraction=0.2 ** 0.5), x[:1])
    slim_opt = torch.optim.SGD(slim_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def slim_step() -> None:
        train_step(slim_model, slim_opt, Dense(), objective, x, y, step=1, attack_bn_mode="train")

    slim_t, slim_dense = timed_alternately([slim_step, dense_step], warmup=warmup, repeats=repeats, device=device)
    flops_ratio = (forward_flops_by_layer(model, (3, 32, 32)).total
                   / forward_flops_by_layer(slim_model, (3, 32, 32)).total)
    speedup = slim_dense["median_s"] / slim_t["median_s"]
    params_ratio = sum(p.numel() for p in slim_model.parameters()) / sum(p.numel() for p in model.parameters())
    results["B4_channel_ticket"] = {"step": slim_t, "dense_step": slim_dense, "speedup": speedup,
                                    "flops_ratio": flops_ratio, "speedup_over_flops_ratio": speedup / flops_ratio,
                                    "params_ratio": params_ratio,
                                    "target": ">= 0.6", "peak_memory_mb": slim_t["memory"]["peak_mb"]}

    n_images = 2048 if args.quick else 50_000
    images = ImageSet(torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8),
                      torch.randint(0, 10, (n_images,)))
    loader = DeviceLoader(images, batch, device=device, shuffle=True, augment=True, seed=0)
    batches = min(len(loader), 8 if args.quick else 200)

    def drain() -> None:
        for _ in zip(range(batches), loader.epoch(0)):
            pass

    load = timed(drain, warmup=1, repeats=3, device=device)
    loader_ips = batches * batch / load["median_s"]
    step_ips = batch / dense["median_s"]
    results["B5_data_path"] = {"loader_images_per_s": loader_ips, "train_step_images_per_s": step_ips,
                               "ratio_loader_over_step": loader_ips / step_ips, "target": ">= 20",
                               "peak_memory_mb": load["memory"]["peak_mb"]}

    fast, why = fast_bf16(device)
    results["B6_bf16_step"] = {"step": bf16_t, "fp32_step": dense, "channels_last_step": bf16_cl,
                               "ratio_bf16_over_fp32": bf16_t["median_s"] / dense["median_s"],
                               "ratio_bf16_channels_last_over_fp32": bf16_cl["median_s"] / dense["median_s"],
                               "fast_bf16": fast, "fast_bf16_rule": why, "target": "<= 0.5",
                               "peak_memory_mb": bf16_t["memory"]["peak_mb"]}

    if args.compile:  # last, so its compile workers cannot disturb B1-B6; the eager step again, beside it
        compiled = torch.compile(model)

        def compiled_step() -> None:
            train_step(compiled, optimizer, Dense(), objective, x, y, step=1, attack_bn_mode="train",
                       precision=StepPrecision("fp32", device))

        start = time.perf_counter()
        compiled_step()  # traces and compiles the model's forward and backward
        first_s = time.perf_counter() - start
        eager = timed(dense_step, warmup=warmup, repeats=repeats, device=device)
        compiled_t = timed(compiled_step, warmup=warmup, repeats=repeats, device=device)
        results["B7_compiled_step"] = {"step": compiled_t, "eager_step": eager, "first_step_s": first_s,
                                       "ratio_compiled_over_eager": compiled_t["median_s"] / eager["median_s"],
                                       "peak_memory_mb": compiled_t["memory"]["peak_mb"]}
        del compiled

    report = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
              "torch": str(torch.__version__), "python": platform.python_version(),
              "quick": args.quick, "model": f"preact_resnet18(base_width={width})", "batch": batch, "image": "3x32x32",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "results": results}
    if args.profile:
        report["profile"] = {"fp32_step": profile_table(dense_step, device),
                             "bf16_step": profile_table(lambda: dense_step(bf16), device)}
    default_name = f"bench-{device.type}-b{batch}{'-quick' if args.quick else ''}.json"
    out = Path(args.out or Path(__file__).parent / "results" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    rows = [("B1 dense PGD-10 step / floor", results["B1_dense_pgd10_step"]["ratio_step_over_floor"], "<= 1.10"),
            ("    dense step / 11 full fwd+bwd", results["B1_dense_pgd10_step"]["ratio_step_over_eleven_full"], ""),
            ("B2 FB step (d=0.2) / dense step", results["B2_flying_bird_step"]["ratio_sparse_over_dense"], "<= 1.03"),
            ("B3 topology update / dense step",
             results["B3_topology_update"]["ratio_update_over_dense_step"], "<= 1.0"),
            ("B4 channel ticket speedup / FLOPs ratio",
             results["B4_channel_ticket"]["speedup_over_flops_ratio"], ">= 0.6"),
            ("B5 loader img/s / step img/s", results["B5_data_path"]["ratio_loader_over_step"], ">= 20"),
            ("B6 bf16 step / fp32 step", results["B6_bf16_step"]["ratio_bf16_over_fp32"], "<= 0.5"),
            ("    bf16 channels_last step / fp32 step",
             results["B6_bf16_step"]["ratio_bf16_channels_last_over_fp32"], "")]
    memory = {"B1": dense, "B2": fb, "B3": update, "B4": slim_t, "B5": load, "B6": bf16_t}
    if "B7_compiled_step" in results:
        b7 = results["B7_compiled_step"]
        rows.append(("B7 compiled step / eager step", b7["ratio_compiled_over_eager"], ""))
        memory["B7"] = b7["step"]
    print(f"device {report['device']} ({report['device_name']}), {report['model']}, batch {batch}")
    print(f"dense step {dense['median_s'] * 1e3:.1f} ms, floor {floor_t['median_s'] * 1e3:.1f} ms, "
          f"11 full passes {eleven['median_s'] * 1e3:.1f} ms, FB step {fb['median_s'] * 1e3:.1f} ms, "
          f"update {update['median_s'] * 1e3:.1f} ms, channel-ticket step {slim_t['median_s'] * 1e3:.1f} ms "
          f"(speedup {speedup:.2f}x, FLOPs ratio {flops_ratio:.2f}x), bf16 step {bf16_t['median_s'] * 1e3:.1f} ms")
    for name, value, target in rows:
        print(f"{name:40s} {value:8.3f}  {target}")
    print(f"peak memory ({dense['memory']['measure']}), MiB peak / increase: " + ", ".join(
        f"{k} {t['memory']['peak_mb']:.0f}/{t['memory']['increase_mb']:.0f}" for k, t in memory.items()))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
