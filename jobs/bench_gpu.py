"""`make bench-gpu`: the one-shot device check of the decode engine against transformers.

For each workload (270m summarize, longtail, caption and translate by default, in that order) it builds
random weights at the real shape, runs our Generator and transformers' generate() (its best batching: sorted by
length, at the fastest of a few batch sizes) on the same requests in the same process, and prints

    our output tokens/s and HF's at its fastest batch (of the sizes tried, printed), and the ratio
    the share of greedy rows whose tokens equal HF's (in bfloat16 on a GPU, where the two
      implementations round differently, so this is a health figure, not a parity test)
    the encoder's share of a run (one more run, the device synchronised around each encoder call)
    rows per second (captions per second on the caption workload) and the slot occupancy
      (share of greedy slot-steps that produced a kept token: GeneratorStats.slot_occupancy;
      longtail, whose rows each ask for their own max_new_tokens, is where refill shows)
    peak device memory
    kernels per decode step (torch.profiler: the kernel count of a run with more steps minus
      one with fewer, divided by the extra steps), and on CUDA the launches per step
      (cudaLaunchKernel + cudaGraphLaunch: a replayed CUDA graph is one launch)
    whether our compiled step fell back to eager, and why; the graphs dynamo compiled for our runs
      and how many of them inductor ran without CUDA graphs ("cudagraph skips")
    which decode attention ran (FlexAttention by default for compiled CUDA steps), and at the end
      longtail once more with the other one (ours only), so the device run says which is faster, and
      summarize once more with the encoder's token-wise halves compiled if they were not (eager if
      they were): the figure for Generator(compile_encoder=...)'s default on that device

On CUDA each workload runs in a process of its own (`--isolate`), so that an error which breaks the
device for its process (a sticky CUDA error, as cuDNN's "misaligned address" in the first device run)
costs one workload, not the rest.

It needs only torch and transformers (plus what they import) and the project's model/ and
jobs/bench.py: no network (the weights are random, the "checkpoint" HF reads is written
locally by our save_pretrained), no Ray, no package index, so it runs on a bare GPU box.
Sized to finish in a few minutes on one H100 (compiles included). On CPU it runs too (the
test runs it on the tiny shape so that it cannot rot), but the numbers mean little there.

Not here: the general benchmark with its options (jobs/bench.py), correctness (tests/).
"""

from __future__ import annotations

import argparse
import functools
import math
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import model
from jobs.bench import (
    SHAPES,
    WORKLOADS,
    hf_batch_sizes,
    make_requests,
    peak_memory_gb,
    run_hf,
    run_hf_best,
    shape_config,
    sync,
)

# workload -> rows on a GPU (caption is bound by the 896 px vision tower: fewer rows; longtail as one call of
# a GPU text job, rows_per_call's default 1024: four times the 256 slots, so refill shows as it would there)
GPU_ROWS = {"summarize": 512, "translate": 512, "caption": 128, "longtail": 1024}
# workload -> the batch transformers ran fastest at on an H100 (../shared/perf-baseline.md; longtail is
# translate-like); the sweep starts at twice it, so a faster larger batch is still found.
HF_BEST_BATCH_H100 = {"summarize": 256, "translate": 128, "caption": 32, "longtail": 128}


def kernels_per_step(m, requests, device, compile, attention=None) -> tuple[float, float]:
    """(kernels, launches) per decode step: profile 4 rows at two lengths, divide the difference."""
    from torch.profiler import ProfilerActivity, profile

    def count(new_tokens: int) -> tuple[int, int]:
        params = model.GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        reqs = [model.Request(r.input_ids, r.pixel_values, params) for r in requests[:4]]
        gen = model.Generator(m, device=device, compile=compile, attention=attention)
        gen.generate(reqs)  # compiles / captures outside the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            gen.generate(reqs)
            sync(device)
        events = prof.events()
        if device.type == "cuda":
            kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel"))
        else:  # CPU: top-level ATen calls are the kernels
            kernels = launches = sum(1 for e in events if e.cpu_parent is None and e.name.startswith("aten::"))
        return kernels, launches

    few, many = 8, 24
    k1, l1 = count(few)
    k2, l2 = count(many)
    return (k2 - k1) / (many - few), (l2 - l1) / (many - few)


def build(args, device: torch.device, ref_cls):
    """Random weights at the shape, and transformers' model from the same weights (written and
    read locally: no network)."""
    cfg = shape_config(args.shape)
    m = model.random_model(cfg, seed=args.seed, dtype=args.dtype, device=device)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(m, scratch)
        ref = ref_cls.from_pretrained(scratch, dtype=model.weights.resolve_dtype(args.dtype),
                                      attn_implementation="sdpa").to(device).eval()
    return cfg, m, ref


def run_ours(requests, args, device, m, budget, compile, attention, **options):
    """(first run's seconds, best timed run's seconds, its tokens, its generator); options: more Generator
    arguments."""
    gen = model.Generator(m, max_batch_tokens=budget, device=device, compile=compile, attention=attention, **options)
    sync(device)
    start = time.perf_counter()
    gen.generate(requests)  # the first run compiles and captures: timed apart
    sync(device)
    first = time.perf_counter() - start
    best, ours = math.inf, None
    for _ in range(args.repeats):
        gen = model.Generator(m, max_batch_tokens=budget, device=device, compile=compile, attention=attention,
                              **options)
        sync(device)
        start = time.perf_counter()
        ours = [r.token_ids for r in gen.generate(requests)]
        sync(device)
        best = min(best, time.perf_counter() - start)
    return first, best, ours, gen


def encoder_split(requests, device, m, budget, compile, attention, **options) -> tuple[float, float]:
    """(seconds in encoder calls, seconds in all) of one more run of ours, with the device synchronised
    around each encoder call (a few per run, refills included), so the split is the device's: where the
    rest of the time goes is decode steps, refill copies and the loop."""
    gen = model.Generator(m, max_batch_tokens=budget, device=device, compile=compile, attention=attention, **options)
    encode, spent = gen._encode, [0.0]

    def timed(reqs):
        sync(device)
        start = time.perf_counter()
        out = encode(reqs)
        sync(device)
        spent[0] += time.perf_counter() - start
        return out

    gen._encode = timed
    sync(device)
    start = time.perf_counter()
    gen.generate(requests)
    sync(device)
    return spent[0], time.perf_counter() - start


def setup(workload: str, args, device: torch.device, cfg):
    """(rows, requests, token budget, compile setting) of a workload on this device."""
    on_gpu = device.type == "cuda"
    rows = args.rows or (GPU_ROWS[workload] if on_gpu else 8)
    scale = args.scale if args.scale is not None else (1.0 if on_gpu else 0.1)
    requests = make_requests(cfg, workload, rows, scale, args.seed)
    budget = args.max_batch_tokens  # None: the Generator's default (on a GPU, slots by free memory)
    return rows, requests, budget, {"auto": None, "on": True, "off": False}[args.compile]


def run_workload(workload: str, args, device: torch.device, cfg, m, ref) -> dict:
    on_gpu = device.type == "cuda"
    rows, requests, budget, compile = setup(workload, args, device, cfg)

    attention = None if args.attention == "auto" else args.attention
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    graphs, skips = compile_counts()
    first, best, ours, gen = run_ours(requests, args, device, m, budget, compile, attention)
    peak_ours = peak_memory_gb(device)
    graphs, skips = (after - before for after, before in zip(compile_counts(), (graphs, skips)))

    run_hf(ref, requests[:4], 4, device, cfg.pad_token_id, list(cfg.eos_token_ids))  # warm-up
    # HF at its best batch: sizes by halves from --hf-batch, stopping two sizes past the fastest; on a GPU
    # by default the three around the batch it did best at in perf-baseline.md's H100 run (twice it, it,
    # half), which bounds the sweep's device time.
    if args.hf_batch is None and on_gpu:
        sizes = hf_batch_sizes(2 * HF_BEST_BATCH_H100[workload], rows)[:3]
    else:
        sizes = hf_batch_sizes(args.hf_batch or 256, rows)
    hf_best, hf, hf_batch, _, hf_tried = run_hf_best(ref, requests, sizes, device, cfg.pad_token_id,
                                                     list(cfg.eos_token_ids), args.hf_repeats)
    encoder_s, split_s = encoder_split(requests, device, m, budget, compile, attention)
    kernels, launches = kernels_per_step(m, requests, device, compile, attention)
    out_tokens = sum(len(t) for t in ours)
    hf_tokens = sum(len(t) for t in hf)
    return dict(
        workload=workload, rows=rows, new_tokens=requests[0].params.max_new_tokens,
        ours_tps=out_tokens / best, hf_tps=hf_tokens / hf_best, hf_batch=hf_batch, hf_tried=hf_tried,
        same=sum(a == b for a, b in zip(ours, hf)), first_s=first, best_s=best, peak_gb=peak_ours,
        kernels=kernels, launches=launches, compiled=gen.stats.compiled, fallback=gen.stats.compile_fallback,
        occupancy=gen.stats.slot_occupancy, rows_per_s=rows / best, attention=gen.attention,
        graphs=graphs, cudagraph_skips=skips, encoder_s=encoder_s, split_s=split_s, tokens=ours,
    )


def compile_counts() -> tuple[int, int]:
    """(graphs dynamo compiled, graphs inductor ran without CUDA graphs) so far in the process: a skip means
    the step launched its kernels one by one (the reason is in inductor's warning above it)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def budget_spent(start: float, budget: float, what: str) -> bool:
    """Whether more than `budget` seconds passed since `start` (perf_counter); then `what` is skipped, and
    a line says so."""
    elapsed = time.perf_counter() - start
    if elapsed > budget:
        print(f"{what} skipped: {elapsed:.0f} s of the {budget:.0f} s budget spent", flush=True)
    return elapsed > budget


def run_guarded(what: str, run, failed: list[str], device: torch.device):
    """run() or, when it raises, None after a FAILED line and its traceback (and `what` appended to
    `failed`): one workload's failure (out of memory, a compile error) must not cost the device run the
    other workloads' numbers."""
    began = time.perf_counter()
    try:
        return run()
    except Exception as error:  # any failure is reported, then the next workload runs
        print(f"{what} FAILED after {time.perf_counter() - began:.0f} s: {type(error).__name__}: {error}", flush=True)
        traceback.print_exc()
        failed.append(what)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def run_isolated(args, workloads: list[str]) -> int:
    """Each workload in a child process (`python -m jobs.bench_gpu --workloads W --isolate off`), its output
    passed through, under what is left of the time budget: in the first device run a cuDNN "misaligned
    address" broke the CUDA context, and every later workload of the process failed with it."""
    start, failed = time.perf_counter(), []
    passed = ["--shape", args.shape, "--device", args.device, "--compile", args.compile, "--attention", args.attention,
              "--repeats", str(args.repeats), "--hf-repeats", str(args.hf_repeats), "--seed", str(args.seed)]
    for flag, value in (("--rows", args.rows), ("--scale", args.scale), ("--dtype", args.dtype),
                        ("--max-batch-tokens", args.max_batch_tokens), ("--hf-batch", args.hf_batch)):
        if value is not None:
            passed += [flag, str(value)]
    for workload in workloads:
        if budget_spent(start, args.time_budget, workload):
            continue
        left = args.time_budget - (time.perf_counter() - start)
        child = [sys.executable, "-m", "jobs.bench_gpu", *passed, "--workloads", workload, "--isolate", "off",
                 "--time-budget", f"{left:.0f}"]
        if subprocess.run(child).returncode != 0:
            print(f"{workload} FAILED: its process exited with an error (output above)", flush=True)
            failed.append(workload)
    print(f"bench-gpu: done in {time.perf_counter() - start:.0f} s, each workload in its own process"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="270m")
    # Longtail second: refill and occupancy are what the next device run most needs, and translate (measured
    # in the first device run) last, so that --time-budget cuts what is known already.
    parser.add_argument("--workloads", default="summarize,longtail,caption,translate",
                        help=f"comma-separated, from {sorted(WORKLOADS)}")
    parser.add_argument("--rows", type=int, default=None, help=f"rows per workload (GPU default {GPU_ROWS}, CPU 8)")
    parser.add_argument("--scale", type=float, default=None, help="input lengths and new tokens (GPU 1, CPU 0.1)")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto",
                        help="decode attention (auto: the Generator's default, flex for compiled CUDA steps)")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--hf-batch", type=int, default=None,
                        help="HF's largest batch, halved down to 8 while faster (default: twice its best in the "
                             "H100 baseline on a GPU, 256 on CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="our timed runs after the first (best kept)")
    parser.add_argument("--hf-repeats", type=int, default=1,
                        help="HF's timed runs at its fastest batch, the sweep's included (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=360,
                        help="seconds after which the workloads not yet started are skipped (default 360: a "
                             "device session has 15 minutes, start-up included)")
    parser.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                        help="each workload in a process of its own (auto: on CUDA), so that an error that "
                             "breaks the device for the process (a sticky CUDA error) costs one workload")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:  # before any weights are built
        parser.error(f"--workloads: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(WORKLOADS)}")
    device = torch.device(args.device)
    if {"auto": device.type == "cuda", "on": True, "off": False}[args.isolate] and len(workloads) > 1:
        return run_isolated(args, workloads)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    try:
        from transformers import T5Gemma2ForConditionalGeneration  # the yardstick only
    except ImportError:
        parser.error("bench-gpu compares with transformers: install it (pip install transformers)")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench-gpu: shape={args.shape} dtype={args.dtype} device={name} torch={torch.__version__} "
          f"date={time.strftime('%Y-%m-%d')}")
    start = time.perf_counter()
    cfg, m, ref = build(args, device, T5Gemma2ForConditionalGeneration)
    print(f"bench-gpu: weights ready in {time.perf_counter() - start:.0f} s", flush=True)
    results, failed = {}, []
    spent = functools.partial(budget_spent, start, args.time_budget)
    guarded = functools.partial(run_guarded, failed=failed, device=device)

    for workload in workloads:
        if spent(workload):
            continue
        r = guarded(workload, lambda: run_workload(workload, args, device, cfg, m, ref))  # noqa: B023 (called now)
        if r is None:
            continue
        results[workload] = r
        print(f"{r['workload']:<10} rows {r['rows']:4d} x {r['new_tokens']:3d} new  "
              f"ours {r['ours_tps']:10.1f} tok/s  hf {r['hf_tps']:10.1f} tok/s (batch {r['hf_batch']} of "
              f"{','.join(map(str, r['hf_tried']))})  "
              f"ratio {r['ours_tps'] / r['hf_tps']:6.2f}x  same greedy rows {r['same']}/{r['rows']}  "
              f"rows/s {r['rows_per_s']:.1f}  slot occupancy {r['occupancy']:.2f}  "
              f"peak {r['peak_gb']:.2f} GiB  kernels/step {r['kernels']:.0f}  launches/step {r['launches']:.0f}  "
              f"first run {r['first_s']:.1f} s  best {r['best_s']:.2f} s  "
              f"encoder {r['encoder_s']:.3f} of {r['split_s']:.3f} s ({100 * r['encoder_s'] / r['split_s']:.0f}%)  "
              f"compiled {'yes' if r['compiled'] else 'no'}  graphs {r['graphs']}  "
              f"cudagraph skips {r['cudagraph_skips']}  attention {r['attention']}  "
              f"fallback {r['fallback'] or 'none'}", flush=True)
    if "longtail" in results and args.attention == "auto" and not spent("the other attention on longtail"):
        # The other attention on longtail (ours only): the figure that decides the default on this device.
        other = "sdpa" if results["longtail"]["attention"] == "flex" else "flex"

        def other_attention():
            rows, requests, budget, compile = setup("longtail", args, device, cfg)
            first, best, ours, gen = run_ours(requests, args, device, m, budget, compile, other)
            print(f"attention {gen.attention:<5} longtail ours {sum(len(t) for t in ours) / best:10.1f} tok/s  "
                  f"first run {first:.1f} s  best {best:.2f} s  fallback {gen.stats.compile_fallback or 'none'}",
                  flush=True)

        guarded(f"attention {other} on longtail", other_attention)
    if "summarize" in results and not spent("the other encoder on summarize"):
        # The encoder's token-wise halves compiled or not, whichever the default is not (compiled on CPU
        # only until a GPU says otherwise): the figure that decides compile_encoder's default there.
        flip = not (results["summarize"]["compiled"] and device.type == "cpu")

        def other_encoder():
            rows, requests, budget, compile = setup("summarize", args, device, cfg)
            attention = None if args.attention == "auto" else args.attention
            first, best, ours, gen = run_ours(requests, args, device, m, budget, compile, attention,
                                              compile_encoder=flip)
            enc, whole = encoder_split(requests, device, m, budget, compile, attention, compile_encoder=flip)
            same = sum(a == b for a, b in zip(ours, results["summarize"]["tokens"]))
            rate = sum(map(len, ours)) / best
            print(f"encoder {'compiled' if flip else 'eager':<8} summarize ours {rate:10.1f} tok/s  "
                  f"first run {first:.1f} s  best {best:.2f} s  encoder {enc:.3f} of {whole:.3f} s  "
                  f"rows as the default's {same}/{rows}  fallback {gen.stats.compile_fallback or 'none'}", flush=True)

        guarded("the other encoder on summarize", other_encoder)
    print(f"bench-gpu: done in {time.perf_counter() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
