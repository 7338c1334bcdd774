"""`t5g2 bench`: throughput of our Generator, optionally side by side with transformers' generate().

Workloads (random token ids, so no tokenizer or dataset is needed):
  summarize  log-normal input lengths (median ~400 at full size, max 2048), 128 new tokens
  translate  short log-normal inputs (~40 tokens), 48 new tokens
  caption    one image plus a short prompt, 32 new tokens
  longtail   translate-like inputs whose rows ask for different max_new_tokens (log-uniform, 4 to
             128 at full size): rows finish at different steps, as in real jobs
Every row generates exactly max_new_tokens (EOS is held back with min_new_tokens), as the
baseline in perf-baseline.md was measured.

  long-encode  not a throughput run: the encoder over one document of each --lengths (default
               32768 and 131072 tokens, the model's context), each in a fresh process, printing
               its time and the process's peak memory (RSS high-water mark on CPU, peak allocated
               on CUDA) before and after: the memory bound of long prompts (docs/perf.md)

Checkpoints are random weights at named shapes: tiny (seconds on a laptop CPU), 270m, 1b,
4b (design.md's shapes, with the 262,144-token vocabulary and the SigLIP tower).

--compare-hf builds transformers' T5Gemma2ForConditionalGeneration from the same weights
(written with our save_pretrained and read with its from_pretrained) and runs its
generate() on the same inputs in the same process, alternating with ours, giving it its
best batching: sorted by length, at the fastest of several batch sizes (`run_hf_best`: the
largest batch is not the fastest everywhere; on a 2-core CPU, tiny summarize ran best at 32
rows and longtail at 128, 19-27% faster than at 256). It prints the speed ratio and the share
of rows whose greedy tokens are identical. transformers is imported only there: it is the
yardstick, never part of the tool.

Not here: the pipeline (pipeline/), correctness tests (tests/).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import tempfile
import time

import torch

import model
from model.config import RopeConfig, T5Gemma2Config, TextConfig, VisionConfig

# name -> (hidden, mlp, layers, heads, kv heads, head_dim, window, vocab, vision?)
SHAPES = {
    "tiny": (64, 128, 4, 4, 1, 32, 16, 1024, "tiny"),
    "small": (256, 1024, 6, 4, 1, 64, 64, 8192, "tiny"),
    "270m": (640, 2048, 18, 4, 1, 256, 512, 262_144, "siglip"),
    "1b": (1152, 6912, 26, 4, 1, 256, 512, 262_144, "siglip"),
    "4b": (2560, 10240, 34, 8, 4, 256, 1024, 262_144, "siglip"),
}
VISION = {
    "tiny": VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=64,
                         patch_size=8, num_channels=3, layer_norm_eps=1e-6),
    "siglip": VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=896,
                           patch_size=14, num_channels=3, layer_norm_eps=1e-6),
}
WORKLOADS = {
    # name -> (median input tokens at full size, sigma, max input, new tokens, images per row)
    "summarize": (400, 0.6, 2048, 128, 0),
    "translate": (40, 0.5, 256, 48, 0),
    "caption": (16, 0.3, 64, 32, 1),
    "longtail": (40, 0.5, 256, 128, 0),  # new tokens: the longest; each row draws its own (see make_requests)
}
SPECIAL = dict(pad=0, eos=1, bos=2, boi=255_999, eoi=256_000, image=262_143)


def shape_config(name: str) -> T5Gemma2Config:
    hidden, mlp, layers, heads, kv, head_dim, window, vocab, vision = SHAPES[name]
    types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers))
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, layer_types=types, sliding_window=window,
        rope={"full_attention": RopeConfig(1e6, "linear", 8.0), "sliding_attention": RopeConfig(1e4)},
        query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6, final_logit_softcapping=None,
    )
    small_vocab = vocab < 262_144
    vis = VISION[vision]
    return T5Gemma2Config(
        encoder=text, decoder=text, vision=vis,
        mm_tokens_per_image=16 if vision == "tiny" else 256,
        image_token_id=vocab - 1 if small_vocab else SPECIAL["image"],
        boi_token_id=vocab - 3 if small_vocab else SPECIAL["boi"],
        eoi_token_id=vocab - 2 if small_vocab else SPECIAL["eoi"],
        pad_token_id=0, bos_token_id=2, eos_token_ids=(1,),
    )


def make_requests(cfg: T5Gemma2Config, workload: str, rows: int, scale: float, seed: int) -> list[model.Request]:
    """Random prompts with log-normal lengths; `scale` shrinks lengths and outputs for small shapes."""
    median, sigma, longest, new_tokens, images = WORKLOADS[workload]
    gen = torch.Generator().manual_seed(seed)
    new_tokens = max(4, int(new_tokens * scale))
    params = model.GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    requests = []
    for _ in range(rows):
        if workload == "longtail":  # each row its own length, log-uniform in [4, new_tokens]
            n = int(round(math.exp(math.log(4) + torch.rand((), generator=gen).item() * math.log(new_tokens / 4))))
            params = model.GenerationParams(max_new_tokens=n, min_new_tokens=n)
        length = math.exp(math.log(median * scale) + sigma * torch.randn((), generator=gen).item())
        length = int(min(max(length, 4), longest * scale))
        ids = torch.randint(10, cfg.vocab_size - 10, (length,), generator=gen).tolist()
        requests.append(random_request(cfg, ids, images, params, gen))
    return requests


def random_request(cfg: T5Gemma2Config, ids: list[int], images: int, params, gen) -> model.Request:
    """A request of prompt `ids`, with one random image spliced after the first token when `images`."""
    pixels = None
    if images:
        block = [cfg.boi_token_id] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [cfg.eoi_token_id]
        ids = ids[:1] + block + ids[1:]
        size = cfg.vision.image_size
        pixels = torch.rand((1, 3, size, size), generator=gen) * 2 - 1
    return model.Request(ids, pixel_values=pixels, params=params)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(m, requests, max_batch_tokens, device, compile=None, attention=None):
    gen = model.Generator(m, max_batch_tokens=max_batch_tokens, device=device, compile=compile, attention=attention)
    sync(device)
    start = time.perf_counter()
    results = gen.generate(requests)
    sync(device)
    return time.perf_counter() - start, [r.token_ids for r in results], gen.stats


def run_hf(ref, requests, batch, device, pad_id, eos_id):
    """transformers generate(), sorted by length, the largest batch (from `batch` down) that fits.

    Rows asking for different max_new_tokens are sorted by it first, so that a batch runs about as
    many steps as its rows need (generate() takes one length per call: each batch runs its longest
    row's, and every row is cut to its own)."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i].params.max_new_tokens, len(requests[i].input_ids)))
    while True:
        try:
            outputs: list[list[int] | None] = [None] * len(requests)
            padded = real = 0
            sync(device)
            start = time.perf_counter()
            for lo in range(0, len(order), batch):
                chunk = order[lo : lo + batch]
                width = max(len(requests[i].input_ids) for i in chunk)
                new_tokens = max(requests[i].params.max_new_tokens for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(chunk):
                    n = len(requests[i].input_ids)
                    ids[row, :n] = torch.tensor(requests[i].input_ids)
                    mask[row, :n] = 1
                padded += ids.numel()
                real += int(mask.sum())
                pixels = [requests[i].pixel_values for i in chunk if requests[i].pixel_values is not None]
                extra = {"pixel_values": torch.cat(pixels).to(device, ref.dtype)} if pixels else {}
                out = ref.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   eos_token_id=eos_id, pad_token_id=pad_id, **extra)
                for row, i in enumerate(chunk):
                    outputs[i] = out[row, 1 : 1 + requests[i].params.max_new_tokens].tolist()
            sync(device)
            return time.perf_counter() - start, outputs, batch, real / padded
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()


def hf_batch_sizes(largest: int, rows: int, smallest: int = 8) -> list[int]:
    """Batch sizes for transformers to try, largest first: `largest` halved down to `smallest`, each at
    most `rows` (sizes that give the same batches as a larger one are dropped)."""
    sizes, size = [], largest
    while size >= smallest or not sizes:
        if not sizes or min(size, rows) < sizes[-1]:
            sizes.append(min(size, rows))
        size //= 2
    return sizes


def run_hf_best(ref, requests, batches: list[int], device, pad_id, eos_id, repeats: int = 1):
    """transformers at its best batching: run_hf at each size in `batches` (largest first) until two sizes in a
    row are slower than the best so far, then `repeats - 1` more runs at the fastest. Fewer rows per call
    pad less and more calls cost more fixed work, so the time is about convex in the batch size; the rule
    stops the sweep past the bottom. Returns (best seconds, its outputs, its batch, its padding efficiency,
    the batch sizes that ran: a size that runs out of memory runs at half, run_hf's rule, and is listed so)."""
    best = None
    tried, slower = [], 0
    for size in batches:
        run = run_hf(ref, requests, size, device, pad_id, eos_id)
        tried.append(run[2])
        if best is None or run[0] < best[0]:
            best, slower = run, 0
        else:
            slower += 1
            if slower == 2:
                break
    for _ in range(repeats - 1):
        run = run_hf(ref, requests, best[2], device, pad_id, eos_id)
        if run[0] < best[0]:
            best = run
    return (*best, tried)


LONG_ENCODE_LENGTHS = (32_768, 131_072)


def _encode_once(shape: str, length: int, dtype: str, device: str, seed: int) -> dict:
    """In a fresh process: one random document of `length` tokens through the encoder (after a short
    warm-up); seconds and peak memory."""
    device_ = torch.device(device)
    cfg = shape_config(shape)
    m = model.random_model(cfg, seed=seed, dtype=dtype, device=device_)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.vocab_size - 10, (1, length), generator=gen).to(device_)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():  # warm-up (lazy initialisation, kernels) on a short input, not timed
        m.encode(ids[:, :256], mask[:, :256])
    before = peak_memory_gb(device_)
    if device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_)
    sync(device_)
    start = time.perf_counter()
    with torch.inference_mode():
        memory = m.encode(ids, mask)
    sync(device_)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "before_gb": before, "peak_gb": peak_memory_gb(device_),
            "memory_gb": memory.numel() * memory.element_size() / 2**30, "threads": torch.get_num_threads()}


def long_encode(args) -> int:
    """The long-encode workload (see the module docstring)."""
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else list(LONG_ENCODE_LENGTHS)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    cfg = shape_config(args.shape)
    print(f"bench: shape={args.shape} workload=long-encode lengths={lengths} dtype={dtype} device={args.device} "
          f"hidden={cfg.encoder.hidden_size} layers={cfg.encoder.num_layers} window={cfg.encoder.sliding_window}")
    context = multiprocessing.get_context("spawn")  # a fresh process per length: RSS peaks are per process
    for length in lengths:
        with context.Pool(1) as pool:
            got = pool.apply(_encode_once, (args.shape, length, dtype, args.device, args.seed))
        print(f"long-encode: {length:7d} tokens  encode {got['seconds']:8.2f} s  peak memory {got['peak_gb']:6.2f} GiB "
              f"(model and input before: {got['before_gb']:.2f} GiB; the encoder output alone "
              f"{got['memory_gb']:.3f} GiB)  threads={got['threads']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t5g2 bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--workload", choices=sorted([*WORKLOADS, "long-encode"]), default="summarize")
    parser.add_argument("--lengths", default=None,
                        help="long-encode: comma-separated document lengths in tokens (default 32768,131072)")
    parser.add_argument("--rows", type=int, default=None, help="requests (default 512 on GPU, 48 on CPU)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiplies input lengths and new tokens (default 1 on GPU, 0.1 on CPU)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default bf16 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--compare-hf", action="store_true", help="also run transformers generate() and compare")
    parser.add_argument("--hf-batch", type=int, default=256,
                        help="HF's largest batch; smaller ones are tried by halves down to 8, the fastest is kept "
                             "(and a batch that runs out of memory is halved)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of each, alternating; best is kept (default 2 on GPU, 5 on CPU, where one "
                             "run takes a fraction of a second and shared machines are noisy)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile our decode step (auto: the Generator's default, on for CUDA)")
    parser.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto",
                        help="decode attention (auto: the Generator's default, flex for compiled CUDA steps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.workload == "long-encode":
        return long_encode(args)
    attention = None if args.attention == "auto" else args.attention
    compile = {"auto": None, "on": True, "off": False}[args.compile]

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    rows = args.rows or (512 if on_gpu else 48)
    scale = args.scale if args.scale is not None else (1.0 if on_gpu else 0.1)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    repeats = args.repeats or (2 if on_gpu else 5)
    budget = args.max_batch_tokens  # None: the Generator's default (on a GPU, slots by free memory)
    torch.manual_seed(args.seed)

    cfg = shape_config(args.shape)
    m = model.random_model(cfg, seed=args.seed, dtype=dtype, device=device)
    requests = make_requests(cfg, args.workload, rows, scale, args.seed)
    new_tokens = max(r.params.max_new_tokens for r in requests)
    print(f"bench: shape={args.shape} workload={args.workload} rows={rows} new_tokens={new_tokens} dtype={dtype} "
          f"device={torch.cuda.get_device_name(device) if on_gpu else 'cpu'} threads={torch.get_num_threads()}")

    ref = None
    if args.compare_hf:
        try:
            from transformers import T5Gemma2ForConditionalGeneration  # the yardstick only
        except ImportError:
            parser.error("--compare-hf needs transformers: pip install -e '.[test]'")
        with tempfile.TemporaryDirectory() as scratch:
            model.save_pretrained(m, scratch)
            ref = T5Gemma2ForConditionalGeneration.from_pretrained(
                scratch, dtype=model.weights.resolve_dtype(dtype), attn_implementation="sdpa").to(device).eval()

    # Warm up both (allocator, kernels, lazy init) on a few rows. Ours runs once on all rows
    # first instead: with compile on, that run pays for compiling and is reported apart.
    cold, _, cold_stats = run_ours(m, requests, budget, device, compile, attention)
    if ref is not None:
        run_hf(ref, requests[:4], 4, device, cfg.pad_token_id, list(cfg.eos_token_ids))

    best_ours = best_hf = math.inf
    ours_tokens = hf_tokens = None
    stats = hf_batch = hf_padding = None
    hf_sizes = hf_batch_sizes(args.hf_batch, rows)
    for repeat in range(repeats):
        seconds, ours_tokens, stats = run_ours(m, requests, budget, device, compile, attention)
        best_ours = min(best_ours, seconds)
        if ref is not None:
            # The first round sweeps HF's batch sizes; later rounds rerun its fastest (alternating with ours).
            sizes = hf_sizes if repeat == 0 else [hf_batch]
            seconds, tokens, batch, padding, tried = run_hf_best(ref, requests, sizes, device, cfg.pad_token_id,
                                                                 list(cfg.eos_token_ids))
            if repeat == 0:
                hf_tried = tried
            if seconds < best_hf:
                best_hf, hf_tokens, hf_batch, hf_padding = seconds, tokens, batch, padding

    out_tokens = sum(len(t) for t in ours_tokens)
    print(f"ours: {rows / best_ours:10.1f} rows/s  {out_tokens / best_ours:12.1f} output tokens/s  "
          f"padding efficiency {stats.padding_efficiency:.2f} (micro-batch layout; projections and MLP run "
          f"packed, encoder attention in length groups or over the packed row)  encoder calls {stats.micro_batches}  "
          f"slot occupancy {stats.slot_occupancy:.2f} (slot-steps that produced a kept token)  "
          f"peak memory {peak_memory_gb(device):.2f} GiB")
    print(f"ours: compile={'on' if stats.compiled else 'off'}  attention={stats.attention}  "
          f"first run {cold:.2f} s (with compiling, when on)  "
          f"best run {best_ours:.2f} s  compile fallback: {cold_stats.compile_fallback or 'none'}")
    if ref is not None:
        hf_out = sum(len(t) for t in hf_tokens)
        same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
        print(f"hf:   {rows / best_hf:10.1f} rows/s  {hf_out / best_hf:12.1f} output tokens/s  "
              f"padding efficiency {hf_padding:.2f}  batch {hf_batch} (sorted by length; the fastest of "
              f"{', '.join(map(str, hf_tried))})")
        print(f"speed-up (output tokens/s): {(out_tokens / best_ours) / (hf_out / best_hf):.2f}x   "
              f"identical greedy rows: {same}/{rows} ({100 * same / rows:.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
