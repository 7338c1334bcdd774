"""Calibrate the cost model of the dry run: a tiny timed run of the engine at one model shape.

    python -m jobs.calibrate --checkpoint demo-out/checkpoint     # the shape of a checkpoint (its config only)
    python -m jobs.calibrate --shape small                         # a shape of jobs/bench.py
    t5g2 run JOB.toml --dry-run --calibrate                        # the job's shape, on its configured device

Each measurement builds a model with random weights at the shape (no checkpoint weights are read)
and times the Generator on three small workloads, best of `repeats` after a warm-up:

  prefill   `rows` prompts of `prompt_tokens` random tokens, 1 new token each: prompt tokens / s
  decode    `rows` prompts of 16 tokens, `new_tokens` new tokens each (EOS held back): decoded tokens
            / s, once the prefill time of those prompts (at the rate above) is taken off
  images    `image_rows` prompts of one image and 4 tokens, 1 new token: images / s, once the
            prefill and decode time are taken off. Where what is left is under IMAGE_SHARE of the
            run (tiny towers, as the demo's: the subtraction is then noise) there is no image rate,
            and the estimate prices the tower's work at the prefill's arithmetic rate. Skipped on a
            CPU for towers over 1024 patches, such as the released 896 px SigLIP, whose images take
            most of a minute each there

The result is a pipeline.estimate.Calibration; `main` prints it as the row of docs/perf.md's table
and as the literal for estimate.CALIBRATIONS. These are throughput figures of one process on one
device at full batches of `rows` requests, nothing more (see estimate.py for what the model leaves out).

Not here: the cost model (pipeline/estimate.py), throughput benchmarks against transformers (bench.py).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from dataclasses import replace

import torch

import model
from jobs.bench import random_request
from pipeline.estimate import Calibration, model_cost

MAX_IMAGE_PATCHES = 1024  # on a CPU, towers with more patches than this are not timed (see above)
IMAGE_SHARE = 0.3  # below this share of the image run's time, the tower's own time is noise (see measure)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()}, {threads} thread(s) on {_cores()} core(s)"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ids(cfg, n: int, gen: torch.Generator) -> list[int]:
    special = {cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id, cfg.pad_token_id, *cfg.eos_token_ids}
    ids = torch.randint(10, cfg.vocab_size - 10, (n,), generator=gen).tolist()
    return [10 if i in special else i for i in ids]


def _requests(cfg, rows: int, prompt_tokens: int, new_tokens: int, images: bool, seed: int) -> list[model.Request]:
    gen = torch.Generator().manual_seed(seed)
    params = model.GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out = []
    for _ in range(rows):
        out.append(random_request(cfg, _ids(cfg, prompt_tokens, gen), images, params, gen))
    return out


def _best(gen: model.Generator, requests: list, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen.generate(requests[: max(1, len(requests) // 4)])  # warm-up: allocator, kernels, lazy init
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        gen.generate(requests)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure(config, *, shape: str, device: str = "cpu", dtype: str = "float32", threads: int = 1, rows: int = 32,
            prompt_tokens: int = 256, new_tokens: int = 32, image_rows: int = 32, repeats: int = 5,
            name: str = "measured now", seed: int = 0, images: bool = True) -> Calibration:
    """Time the engine at `config`'s shape on `device` (random weights) and return the rates."""
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads))
    net = model.random_model(config, seed=seed, dtype=dtype, device=dev)
    gen = model.Generator(net, device=dev)
    cost = model_cost(config)
    with torch.inference_mode():
        t_prefill = _best(gen, _requests(config, rows, prompt_tokens, 1, False, seed), dev, repeats)
        prefill_rate = rows * prompt_tokens / t_prefill
        short = 16
        t_decode = _best(gen, _requests(config, rows, short, new_tokens, False, seed + 1), dev, repeats)
        decode_time = max(1e-9, t_decode - rows * short / prefill_rate)
        decode_rate = rows * new_tokens / decode_time
        images_rate = None
        patches = (config.vision.image_size // config.vision.patch_size) ** 2
        if images and (dev.type == "cuda" or patches <= MAX_IMAGE_PATCHES) and image_rows > 0:
            prompt = 4 + config.mm_tokens_per_image + 2
            t_images = _best(gen, _requests(config, image_rows, 4, 1, True, seed + 2), dev, repeats)
            image_time = t_images - image_rows * prompt / prefill_rate - image_rows / decode_rate
            # A tower that is too small a part of the run cannot be timed apart: left None, the estimate
            # then prices its work at the prefill's arithmetic rate (and says so).
            images_rate = image_rows / image_time if image_time >= IMAGE_SHARE * t_images else None
    return Calibration(
        name=name, device=dev.type, machine=machine_name(dev, threads), shape=shape, dtype=dtype,
        threads=threads if dev.type == "cpu" else 0, rows=rows, prefill_tokens_per_s=round(prefill_rate, 1),
        decode_tokens_per_s=round(decode_rate, 1), images_per_s=round(images_rate, 2) if images_rate else None,
        prefill_flops=float(f"{cost.prefill_per_token:.4g}"), decode_flops=float(f"{cost.decode_per_token:.4g}"),
        image_flops=float(f"{cost.per_image:.4g}"), date=datetime.date.today().isoformat())


def calibrate_for_job(spec, *, repeats: int = 2) -> Calibration:
    """A calibration of the job's model shape on the device its actors use, here: CUDA when the job asks
    for GPUs and this machine has one, else this machine's CPU with the job's cpus_per_actor threads
    (a GPU job timed on a CPU says so in the calibration's device)."""
    import logging

    from pipeline.validate import _check_model

    summary = _check_model(spec)  # the checkpoint's config only: no weights are read
    r = spec.resources
    device = "cuda" if r.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    if r.gpus_per_actor > 0 and device == "cpu":
        logging.getLogger("jobs").warning("--calibrate: the job asks for GPUs but this machine has no CUDA device; "
                                          "timing on this CPU instead, so the estimate is a CPU figure")
    dtype = spec.model.dtype if device == "cuda" else "float32"  # CPU actors compute in float32 fastest
    rows = max(1, min(32, r.rows_per_call))
    return measure(summary.config, shape="this job's", device=device, dtype=dtype,
                   threads=max(1, int(r.cpus_per_actor)), rows=rows, prompt_tokens=128, new_tokens=16,
                   image_rows=min(8, rows), repeats=repeats)


def table_row(c: Calibration) -> str:
    """The calibration as a row of docs/perf.md's "Dry-run calibration" table."""
    images = f"{c.images_per_s:g}" if c.images_per_s else "-"
    return (f"| {c.name} | {c.device} | {c.machine} | {c.shape} | {c.dtype} | {c.threads} | {c.rows} | "
            f"{c.prefill_tokens_per_s:g} | {c.decode_tokens_per_s:g} | {images} | {c.prefill_flops:.4g} | "
            f"{c.decode_flops:.4g} | {c.image_flops:.4g} | {c.date} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.calibrate", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="a checkpoint directory or URI: its config.json's shape (no weights read)")
    where.add_argument("--shape", help="a shape of jobs/bench.py (tiny, small, 270m, 1b, 4b)")
    parser.add_argument("--name", default=None, help="the row's name (default cpu-SHAPE / cuda-SHAPE)")
    parser.add_argument("--label", default=None, help="the shape's name in the table (default: --shape, or 'demo')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: one actor's CPU)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per workload, best kept")
    parser.add_argument("--rounds", type=int, default=3, help="whole measurements, the fastest of each rate kept")
    parser.add_argument("--no-images", action="store_true", help="do not time the vision tower")
    args = parser.parse_args(argv)
    if args.checkpoint:
        from model.source import CheckpointSource
        from model.weights import load_config

        config = load_config(CheckpointSource.open(args.checkpoint))
        shape = args.label or "demo"
    else:
        from jobs.bench import shape_config

        config = shape_config(args.shape)
        shape = args.label or args.shape
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    rounds = [measure(config, shape=shape, device=args.device, dtype=dtype, threads=args.threads, rows=args.rows,
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                      name=args.name or f"{device.type}-{shape}", images=not args.no_images)
              for _ in range(args.rounds)]
    # On a shared machine other work slows some rounds down: the fastest round of each rate is the engine's.
    best = {key: max(getattr(c, key) for c in rounds) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    images = [c.images_per_s for c in rounds if c.images_per_s]
    cal = replace(rounds[0], **best, images_per_s=max(images) if images else None)
    print(table_row(cal))
    print(f"    {cal!r},")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
