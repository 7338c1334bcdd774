"""Generation: requests in, results out in input order.

`Generator(model).generate(requests)`:
1. checks each request (a malformed one becomes that request's error result);
2. sorts by encoder length; greedy and sampled requests go into refill runs (`refill_runs`:
   requests that a run at its widest width still gives enough slots: RUN_SLOT_RATIO), beam requests into
   static micro-batches under a token budget (`plan`: `max_batch_tokens` counts padded encoder
   tokens, image tokens included, times rows, one row per beam);
3. a refill run decodes through a fixed number of slots (on a GPU what free memory holds, within
   memory_share of the card when given; on CPU the token budget at the run's widest encoder length;
   at most max_batch_size): the first requests fill them; when rows finish
   (seen at a check, or known from max_new_tokens), waiting requests take their slots: one
   encoder call per refill group, their encoder keys/values written into the slots' cache rows
   (as wide as the run's widest request, so no shape changes), their positions starting at zero
   (each row has its own). Once nothing waits, finished rows leave the batch in bulk. A beam
   micro-batch runs the encoder once, computes the encoder's keys/values once per request and
   layer into preallocated decoder buffers (cache.py), then decodes in lockstep;
4. a run or micro-batch that runs out of device memory is split in half and retried, down to
   one request, which then becomes an "out_of_memory" error result instead of a crash.

Refill within one generate() call only: requests arrive as the call's list, and slots drain at
its end (a Ray Data actor refills across the rows of one batch it is given, not across batches).
Why not across calls: Ray Data's map_batches gives a stateful actor no call at the end of its
input, so requests still held in slots when the last batch returns would have no call left to
come back in. Losing no row comes first; a batch several times the slot count
(`resources.rows_per_call`) keeps the drain a small share of each call instead.

The decode loop never waits on the device at a step. One step (`_sampling_step`: embed,
decoder layers, final norm, LM head, EOS ban, token choice, finished flags) reads and writes
only device tensors; the loop reads the finished flags back every `check_every` steps, and
finished rows keep decoding harmlessly until then (a row's result is cut at its first EOS or
its max_new_tokens, so what it computes after that is never read). At a check, finished rows
take waiting requests, or, once nothing waits, are dropped from the running batch once they are
compact_fraction of it. With `compile` on,
that step is one torch.compile(fullgraph=True) graph (CUDA graphs on CUDA, mode
"reduce-overhead"); rows are then padded to a few bucket sizes and the encoder length to a
multiple of 64, so a job compiles a handful of graphs, not one per micro-batch. A failure to
compile falls back to eager decoding with one warning.

Strategies: greedy (temperature 0), sampling (temperature, top_k, top_p) with noise drawn
from a counter-based hash of (seed, step, token), so a request's sample never depends on
what it is batched with; beam search with the reference's scoring (length_penalty, EOS
candidates kept beside the running beams, its early-stop rule, checked every check_every
steps: a request that can no longer improve does not change while the others go on).

Not here: tokenization (tokenizer.py), rows and columns (operators/).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .cache import DecoderCache
from .t5gemma2 import Block, EncoderParts, T5Gemma2, prompt_problem


@dataclass(frozen=True)
class GenerationParams:
    """How one request is decoded."""

    max_new_tokens: int = 64  # hard cap on generated tokens (EOS included)
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens
    temperature: float = 0.0  # 0 = greedy (or beam search when num_beams > 1)
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    seed: int | None = None  # sampling seed; None = derived from the prompt (still batch-independent)
    num_beams: int = 1  # > 1 = beam search
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    eos_token_ids: tuple[int, ...] | None = None  # None = the checkpoint's
    num_return_sequences: int = 1  # outputs per request: n samples (sample j seeded apart) or the n best beams

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0 or math.isnan(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search with sampling is not supported: set temperature = 0 or num_beams = 1")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_return_sequences > max(1, self.num_beams) and self.temperature == 0:
            raise ValueError(f"num_return_sequences = {self.num_return_sequences} needs sampling (temperature > 0) or "
                             f"at least as many beams (num_beams = {self.num_beams}): greedy decoding has one result")
        if self.eos_token_ids is not None and not self.eos_token_ids:
            raise ValueError("eos_token_ids must be None (the checkpoint's) or a non-empty tuple")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.num_beams == 1


@dataclass
class Request:
    """One prompt: token ids with image placeholders already expanded, and its images."""

    input_ids: list[int]
    # [N, 3, S, S] for the N images of the prompt, or None: float pixel values, or uint8 before rescale and
    # normalize (the Generator's pixel_normalizer finishes them on its device: a quarter of the bytes to move)
    pixel_values: torch.Tensor | None = None
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass
class Result:
    token_ids: list[int]  # generated ids; ends with EOS when finish_reason == "eos"
    finish_reason: str  # "eos" | "length" | "error"
    error: str | None = None  # what went wrong when finish_reason == "error"
    error_kind: str | None = None  # "out_of_memory" | "invalid_request"
    # num_return_sequences > 1: every (token ids, finish reason), best beam or sample 0 first (token_ids
    # and finish_reason repeat the first); None for a single result
    sequences: list[tuple[list[int], str]] | None = None


@dataclass
class GeneratorStats:
    """Counters over the generator's lifetime (the benchmark prints them)."""

    requests: int = 0
    micro_batches: int = 0  # encoder calls: one per beam micro-batch, per refill run's first group and per refill group
    real_encoder_tokens: int = 0  # tokens of the prompts themselves
    padded_encoder_tokens: int = 0  # rows x longest prompt, summed over micro-batches
    generated_tokens: int = 0
    decode_row_steps: int = 0  # rows present in the running batch, summed over steps
    slot_steps: int = 0  # greedy/sampling: decode slots present (padding and finished rows included), summed over steps
    slot_tokens: int = 0  # greedy/sampling: kept tokens those slot-steps produced
    oom_splits: int = 0
    seconds: float = 0.0
    compiled: bool = False  # the decode step ran compiled (False: eager, by choice or after a fallback)
    compile_fallback: str | None = None  # why compiling failed, when it did
    attention: str = "sdpa"  # how decode steps attended last: "flex" or "sdpa" (Generator(attention=...))

    @property
    def padding_efficiency(self) -> float:
        return self.real_encoder_tokens / max(1, self.padded_encoder_tokens)

    @property
    def slot_occupancy(self) -> float:
        """Share of greedy/sampling slot-steps that produced a kept token (beam search not counted)."""
        return self.slot_tokens / max(1, self.slot_steps)


@dataclass(frozen=True)
class MicroBatch:
    """One planned micro-batch: the requests that share an encoder call and a decode loop, and the
    shape that loop runs at (the runner may still split it in halves on out-of-memory)."""

    requests: tuple[int, ...]  # indices into generate()'s requests, sorted by encoder length
    beams: int  # rows per request: 1 for greedy and sampling, num_beams for beam search
    rows: int  # decode rows (requests x beams; compiled: padded up to a row bucket)
    encoder_length: int  # the padded encoder length (compiled: width_bucket)
    steps: int  # cache slots for generated tokens (max_new_tokens; compiled: a multiple of STEP_MULTIPLE)


DEFAULT_BATCH_TOKENS = 65536  # padded encoder tokens per micro-batch unless max_batch_tokens says otherwise
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # compiled: running rows padded up to one of these
WIDTH_MULTIPLE = 64  # compiled: encoder length of a micro-batch padded up to a multiple of this
STEP_MULTIPLE = 32  # compiled: cache slots for max_new_tokens rounded up to a multiple of this
# Graphs dynamo may build per compiled step function (its recompile_limit, 8 by default). A job's runs
# differ in rows, encoder width, steps and sampling options; each guard that fails once makes its dim
# dynamic or adds a variant, so the count levels off, but past 8: 14 varied runs in one process hit the
# default, after which fullgraph=True raises and the process decodes eagerly for good.
COMPILE_GRAPH_LIMIT = 64


def width_bucket(width: int, ladder: bool = False) -> int:
    """A compiled run's encoder width for prompts up to `width` tokens: a multiple of WIDTH_MULTIPLE, or with
    `ladder` two sizes per octave (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, ...). The
    ladder is for static-shape steps (FlexAttention), where each width is a graph of its own to compile
    (tens of seconds each), and the padding costs memory alone: their block mask skips the keys past a
    row's length. A job's widths then take a handful of graphs instead of one per 64 tokens."""
    width = max(1, width)
    step = max(WIDTH_MULTIPLE, 1 << max(0, (width - 1).bit_length() - 2)) if ladder else WIDTH_MULTIPLE
    return -(-width // step) * step


# Static-shape (FlexAttention) runs shrink only to these sizes as rows leave at the end of a call. Each
# shape is a graph of its own to compile (a GPU's first run: 26-30 s per workload on an H200), while a GPU
# step at these sizes should change little with its rows (not yet measured); so a quarter at a time, not
# bucket by bucket (counted on CPU with static steps, a 12-call summarize-like job: 37 graphs, 11 with these).
TAIL_BUCKETS = (16, 64)


def row_bucket(rows: int) -> int:
    """The smallest bucket size holding `rows` (multiples of 64 past the table)."""
    for size in ROW_BUCKETS:
        if rows <= size:
            return size
    return -(-rows // 64) * 64


class Generator:
    """Bucketed, batch-invariant decoding for a T5Gemma2 model."""

    # A refill run takes a request while it gives it at least 1/RUN_SLOT_RATIO of the slots a run at the
    # request's own width would (a run's slots are the token budget over its widest request): every extra
    # run ends in a tail where its slots drain and costs its steps again, while a narrow request in a wide
    # run costs only the padded keys its step reads. Where max_batch_size binds rather than the budget,
    # width costs no slots, so one run takes all (measured on CPU: 600 longtail rows 1.16 s in one run
    # against 1.48 s in two, occupancy 0.93 against 0.88; docs/perf.md).
    RUN_SLOT_RATIO = 4

    def __init__(
        self,
        model: T5Gemma2,
        max_batch_tokens: int | None = None,
        max_batch_size: int = 256,
        device: str | torch.device | None = None,
        compact_fraction: float = 0.25,
        check_every: int = 8,
        refill_fraction: float = 1 / 8,
        compile: bool | None = None,
        compile_options: dict | None = None,
        memory_budget: int | None = None,
        memory_share: float | None = None,
        pixel_normalizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        attention: str | None = None,
        compile_encoder: bool | None = None,
    ):
        """check_every: steps between two reads of the finished flags (the loop's only device reads);
        compile: torch.compile the decode step (None = on for CUDA, off on CPU, where eager measured
        faster on the bench workloads once compile time is counted: docs/perf.md); compile_options:
        keyword arguments for torch.compile (default: fullgraph, and mode "reduce-overhead" on CUDA);
        memory_budget: bytes the slots of a greedy/sampling run may hold (None: on CUDA the free device
        memory less MEMORY_MARGIN, on CPU no limit); memory_share: on CUDA, the share of the card's memory
        this process may hold, weights included (a Ray actor on a fraction of a GPU: its neighbours hold the
        rest, so free memory alone would count theirs too); None: the whole card; max_batch_tokens: padded
        encoder tokens per micro-batch and, when given, per refill run's slots (slots x width); None:
        DEFAULT_BATCH_TOKENS, but no cap on the slots where a memory budget plans them (CUDA, or
        memory_budget given); max_batch_size caps the slots; the out-of-memory split stays the last resort;
        pixel_normalizer: uint8 [N, 3, S, S] -> float pixel values on the device
        (ImageProcessor.normalizer()), for requests whose pixel_values are uint8;
        attention: how a decode step attends, "flex" (FlexAttention: only real keys, no mask; fast only
        compiled) or "sdpa" (a float mask, rows in length groups when eager); None = flex where the step is
        compiled on CUDA, sdpa elsewhere (eager FlexAttention is a slow reference implementation). A compiled
        step that fails falls back with one warning: FlexAttention to compiled SDPA, SDPA to eager.
        compile_encoder: also compile the encoder blocks' token-wise halves (None = where compile is on, on
        CPU only: measured faster there, not yet on a GPU; `make bench-gpu` compares)."""
        if (max_batch_tokens is not None and max_batch_tokens < 1) or max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if memory_share is not None and not 0 < memory_share <= 1:
            raise ValueError(f"memory_share must be in (0, 1] or None, got {memory_share}")
        self.model = model
        self.config = model.config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_tokens = DEFAULT_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
        self.max_batch_size = max_batch_size
        self.memory_budget = memory_budget
        self.memory_share = memory_share
        # The padded tokens a refill run's slots may hold (slots x width), or None. Where memory plans the
        # slots, padded tokens do not unless asked: on the H200 the default budget gave 32 slots at
        # summarize's 2048-token width (128 at the bench's 262144), while a step over 128 rows took about
        # 3 ms, far over what its weights and keys cost to read, so more rows per step are nearly free.
        plans_by_memory = memory_budget is not None or self.device.type == "cuda"
        self.slot_token_cap = None if max_batch_tokens is None and plans_by_memory else self.max_batch_tokens
        self.pixel_normalizer = pixel_normalizer
        # Finished rows stay in the running batch until they are this share of it: dropping
        # them copies the caches, so it is done in bulk rather than at every finish.
        self.compact_fraction = compact_fraction
        self.check_every = check_every
        # Between two checks, rows known to be at their max_new_tokens (host-side, no device read) are
        # refilled once they are this share of the slots: one encoder call per group, not per row. 1/8:
        # on the CPU longtail run (600 rows, compiled) 3-8% faster than 1/16 in three alternated runs, at
        # the same slot occupancy (0.916); 1/4 lost occupancy (0.905), 1/2 more (0.886) and was slower.
        self.refill_fraction = refill_fraction
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        if attention not in (None, "flex", "sdpa"):
            raise ValueError(f"attention must be 'flex', 'sdpa' or None (the device default), got {attention!r}")
        self.attention = attention or ("flex" if self.compile and self.device.type == "cuda" else "sdpa")
        self._compile_options = compile_options or {}
        self._compiled = self._compiled_steps() if self.compile else None
        if compile_encoder is None:
            compile_encoder = self.compile and self.device.type == "cpu"
        self._encoder_parts = self._compiled_encoder_parts() if compile_encoder else None
        if self.compile:  # process-wide: dynamo has no per-function limit (only ever raised here)
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, COMPILE_GRAPH_LIMIT)
        self.compile_fallback: str | None = None  # why compiling failed, when it did
        # A step of these options already failed in this process: do not pay for compiling it again.
        failed = self._compiled and self._failed_before()
        if failed and self.attention == "flex":
            self._flex_failed(failed, "failed earlier in this process")
            failed = self._failed_before()  # the SDPA steps' own record
        if failed:
            self._fall_back(failed, "failed earlier in this process")
        # Compiled: the decode state of the last run's shape, reused by the next run of that shape so that
        # a CUDA graph recorded over its buffers replays instead of being recorded again (every run would
        # otherwise add a graph to the tree). One shape at a time, so it holds no memory beyond a run's.
        self._state: tuple[tuple, DecoderCache, _Rows] | None = None
        self.stats = GeneratorStats()

    # ---- planning ----------------------------------------------------------------------------

    def _check(self, request: Request) -> str | None:
        """Why a request cannot run, or None."""
        problem = prompt_problem(self.config, request.input_ids, request.pixel_values)
        if problem is None and request.pixel_values is not None and request.pixel_values.dtype == torch.uint8 \
                and self.pixel_normalizer is None:
            return "uint8 pixel_values need a Generator built with pixel_normalizer (ImageProcessor.normalizer())"
        return problem

    def plan(self, requests: list[Request], order: list[int]) -> list[MicroBatch]:
        """Pack request indices (sorted by length) into micro-batches under the token budget."""
        batches: list[MicroBatch] = []
        current: list[int] = []
        rows = longest = 0
        for i in order:
            req = requests[i]
            beams = req.params.num_beams
            length = len(req.input_ids)
            same_kind = not current or _kind(requests[current[0]]) == _kind(req)
            fits = ((rows + beams) * max(longest, length) <= self.max_batch_tokens
                    and rows + beams <= self.max_batch_size)
            if current and (not same_kind or not fits):
                batches.append(self._micro_batch(requests, current))
                current, rows, longest = [], 0, 0
            current.append(i)
            rows += beams
            longest = max(longest, length)
        if current:
            batches.append(self._micro_batch(requests, current))
        return batches

    def refill_runs(self, requests: list[Request], order: list[int]) -> list[list[int]]:
        """Greedy/sampling request indices (sorted by encoder length) -> refill runs: each run decodes
        through one fixed set of slots (see _run_sampling) at the width of its widest request, so a
        run takes the requests that it gives at least 1/RUN_SLOT_RATIO of the slots they would have in a
        run of their own width (prompts up to WIDTH_MULTIPLE tokens share one run), or all that are left
        when they fit its slots at once; its slot count follows from the token and memory budgets at that
        width (_slots)."""
        runs: list[list[int]] = []
        # Slots by memory as _slots counts them, at the longest max_new_tokens (read once: on CUDA a driver call).
        steps = max((requests[i].params.max_new_tokens for i in order), default=0) + 1
        cap = functools.partial(self._slot_cap, steps=steps, budget=self._memory_budget())
        for left, i in enumerate(reversed(order)):
            length = len(requests[i].input_ids)
            if runs:
                widest = len(requests[runs[-1][0]].input_ids)
                width = self._bucket_width(max(WIDTH_MULTIPLE, widest))  # short prompts: one class
                # Everything left fits the run's slots at once: one decode loop, not two that each drain.
                fits = len(runs[-1]) + len(order) - left <= cap(widest)
                enough = self.RUN_SLOT_RATIO * cap(width) >= cap(max(WIDTH_MULTIPLE, length))
                if fits or enough or width == WIDTH_MULTIPLE:
                    runs[-1].append(i)
                    continue
            runs.append([i])
        return [run[::-1] for run in runs]  # each in encoder-length order, as plan() gives them

    def _micro_batch(self, requests: list[Request], indices: list[int]) -> MicroBatch:
        beams = requests[indices[0]].params.num_beams
        longest = max(len(requests[i].input_ids) for i in indices)
        rows = len(indices) * beams
        steps = max(requests[i].params.max_new_tokens for i in indices)
        if self.compile and beams == 1:  # the shape the compiled step runs at (see _run_sampling)
            rows, longest = row_bucket(rows), self._bucket_width(longest)
            steps = -(-steps // STEP_MULTIPLE) * STEP_MULTIPLE
        return MicroBatch(tuple(indices), beams, rows, longest, steps)

    def generate(self, requests: list[Request]) -> list[Result]:
        """Results in the order of `requests`."""
        start = time.perf_counter()
        results: list[Result | None] = [None] * len(requests)
        runnable = []
        for i, req in enumerate(requests):
            problem = self._check(req)
            if problem:
                results[i] = Result([], "error", problem, "invalid_request")
            else:
                runnable.append(i)
        # n samples of a request decode as n requests (sample j seeded apart), adjacent in every order
        # below, so that one encoder call encodes their prompt once (_encode).
        work = [_sample_request(requests[i], j) for i in runnable for j in range(_samples(requests[i]))]
        origin = [i for i in runnable for _ in range(_samples(requests[i]))]
        done: list[Result | None] = [None] * len(work)
        # Beam requests first grouped by width, then every group sorted by encoder length.
        order = sorted(range(len(work)), key=lambda k: (_kind(work[k]), len(work[k].input_ids)))
        sampling = [k for k in order if _kind(work[k]) == 1]
        beam = [k for k in order if _kind(work[k]) > 1]
        with torch.inference_mode():
            for run in self.refill_runs(work, sampling):
                self._run_splitting(work, run, done)
            for batch in self.plan(work, beam):
                self._run_splitting(work, list(batch.requests), done)
        samples: dict[int, list[Result]] = {}
        for i, result in zip(origin, done):
            samples.setdefault(i, []).append(result)  # type: ignore[arg-type]
        for i, got in samples.items():
            failed = [r for r in got if r.finish_reason == "error"]
            if len(got) == 1 or failed:  # one failed sample fails the request (its rows are retried whole)
                results[i] = (failed or got)[0]
            else:
                results[i] = Result(got[0].token_ids, got[0].finish_reason,
                                    sequences=[(r.token_ids, r.finish_reason) for r in got])
        self.stats.requests += len(requests)
        self.stats.seconds += time.perf_counter() - start
        self.stats.compiled = self._compiled is not None
        self.stats.compile_fallback = self.compile_fallback
        self.stats.attention = self.attention
        return results  # type: ignore[return-value]

    def _run_splitting(self, requests, batch: list[int], results) -> None:
        try:
            out = self._run_batch([requests[i] for i in batch])
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                results[batch[0]] = Result([], "error", f"out of device memory even alone: {exc}", "out_of_memory")
                return
            self.stats.oom_splits += 1
            half = len(batch) // 2
            self._run_splitting(requests, batch[:half], results)
            self._run_splitting(requests, batch[half:], results)
            return
        for i, result in zip(batch, out):
            results[i] = result

    # ---- one micro-batch ---------------------------------------------------------------------

    def _encode(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder once per prompt -> memory [R, S, H] and its padding mask [R, S]. Requests that share
        their prompt objects (the samples of one request, see _sample_request) share one encoding."""
        cfg = self.config
        keys: dict[tuple[int, int], int] = {}
        index = [keys.setdefault((id(r.input_ids), id(r.pixel_values)), len(keys)) for r in reqs]
        firsts = list({k: r for r, k in zip(reqs, index)}.values())  # one request per prompt, in order
        longest = max(len(r.input_ids) for r in firsts)
        # The real tokens as one tensor, placed by the mask: a copy per row took 16 ms for 600 rows, this 4 ms.
        mask = torch.arange(longest) < torch.tensor([len(r.input_ids) for r in firsts])[:, None]
        ids = torch.full((len(firsts), longest), cfg.pad_token_id, dtype=torch.long)
        ids[mask] = torch.tensor(list(itertools.chain.from_iterable(r.input_ids for r in firsts)), dtype=torch.long)
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = [r.pixel_values for r in firsts if r.pixel_values is not None]
        pixels = None
        if images:
            dtype = self.model.embed_tokens.weight.dtype
            # uint8 images travel as such and are rescaled and normalized on the device; float ones as given.
            kinds = {image.dtype == torch.uint8 for image in images}
            parts = [torch.cat(images)] if len(kinds) == 1 else images  # one copy and one lookup when all alike
            pixels = torch.cat([self._pixels(part) for part in parts]).to(dtype)
        memory = self._encoder_memory(ids, mask, pixels)  # [P, S, H], P prompts
        self.stats.micro_batches += 1
        self.stats.real_encoder_tokens += sum(len(r.input_ids) for r in firsts)
        self.stats.padded_encoder_tokens += ids.numel()
        if len(firsts) < len(reqs):  # [P, ...] -> [R, ...]: each request its prompt's row
            rows = torch.tensor(index, device=self.device)
            memory, mask = memory.index_select(0, rows), mask.index_select(0, rows)
        return memory, mask

    def _pixels(self, image: torch.Tensor) -> torch.Tensor:
        image = image.to(self.device)
        return self.pixel_normalizer(image) if image.dtype == torch.uint8 else image

    def _encoder_memory(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """The encoder over ids, mask [P, S] -> [P, S, H], through the compiled token-wise parts when this
        Generator has them. A failure there switches to the eager parts for good, with one warning; an error
        the eager encoder raises too is the input's, and propagates."""
        if self._encoder_parts is None:
            return self.model.encode(ids, mask, pixel_values=pixels)
        try:
            return self.model.encode(ids, mask, pixel_values=pixels, parts=self._encoder_parts)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # compile failure: never a failed job
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        memory = self.model.encode(ids, mask, pixel_values=pixels)
        _COMPILE_FAILURES[(id(self._encoder_parts[0]), "encoder")] = reason
        self._encoder_parts = None
        self.compile_fallback = self.compile_fallback or f"encoder: {reason}"
        warnings.warn(f"torch.compile of the encoder's token-wise parts failed ({reason}); they run eagerly from "
                      f"here on", RuntimeWarning, stacklevel=3)
        return memory

    def _compiled_encoder_parts(self) -> EncoderParts | None:
        """The encoder blocks' token-wise halves compiled (shared process-wide; None when they failed before
        in this process). They fuse the norms, rotary and GeGLU that eager runs as separate passes over
        [N, H] tensors (on CPU the encoder's time on the bench's longtail run: 0.66x); dynamic in the token
        count, so a job compiles them once. Off by default on a GPU until measured there (compile_encoder)."""
        options = {"fullgraph": True, "dynamic": True, **self._compile_options}
        parts = (_compiled_step(Block.attention_inputs, options), _compiled_step(Block.attention_output, options))
        return None if (id(parts[0]), "encoder") in _COMPILE_FAILURES else parts

    def _eos_lists(self, reqs: list[Request]) -> list[list[int]]:
        """[R][E] EOS ids per request; short lists padded with their own first id (harmless repeats)."""
        lists = [r.params.eos_token_ids or self.config.eos_token_ids for r in reqs]
        width = max(len(e) for e in lists)
        return [list(e) + [e[0]] * (width - len(e)) for e in lists]

    def _run_batch(self, reqs: list[Request]) -> list[Result]:
        beams = reqs[0].params.num_beams
        if beams > 1:
            return self._run_beam(reqs, beams)
        return self._run_sampling(reqs)

    def _step(self, kind: str, *state) -> None:
        """One decode step (kind "sampling" or "beam"), compiled when asked; a compile failure
        switches to eager for good, with one warning."""
        if self._compiled is not None:
            try:
                if self.device.type == "cuda":  # a new CUDA-graph generation: the last replay's buffers are done with
                    torch.compiler.cudagraph_mark_step_begin()
                return self._compiled[kind](self.model, *state)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # compile or capture failure: never a failed job
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            # Recovered out here, not in the except clause: the exception's traceback holds the failed
            # call's frames, whose buffers a CUDA-graph warm-up took from the graphs' memory pool, and the
            # next capture refuses a pool holding tensors no graph output owns (seen on an H200: the
            # compiled SDPA steps after a failed FlexAttention step failed for that alone).
            gc.collect()
            for key in self._failure_keys():
                _COMPILE_FAILURES[key] = reason
            if self.attention == "flex":
                self._flex_failed(reason, "failed")
                state[0].attend_by_masks(table=self._attention_layout()["table"])
                return self._step(kind, *state)  # compiled SDPA (its own failure falls back to eager)
            self._fall_back(reason, "failed")
            state[0].attend_by_masks(table=False)  # eager steps attend with SDPA over the masks the cache kept
        return (_sampling_step if kind == "sampling" else _beam_step)(self.model, *state)

    def _compiled_steps(self) -> dict:
        """The compiled step functions for this Generator's device and attention (shared process-wide)."""
        options = {"fullgraph": True}
        if self.device.type == "cuda":
            options["mode"] = "reduce-overhead"  # CUDA graphs: one replay per step instead of ~1,000 launches
        if self.attention == "flex":
            # FlexAttention's kernels do not build once dynamo makes a dim dynamic (from the second shape
            # on): their mask code names a symbolic size it never declares (torch 2.13 on CPU:
            # CppCompileError; torch 2.11 on an H200: "NameError: name 's75' is not defined"), and the step
            # fell back. Static shapes build: one graph per bucket shape (9 on the bench's CPU longtail
            # run; recompile_limit is COMPILE_GRAPH_LIMIT).
            options["dynamic"] = False
        options.update(self._compile_options)
        # Beam steps reassign their state (new tensors per step) rather than writing in place,
        # which CUDA graphs would overwrite at the next replay: compiled without them.
        beam_options = {k: v for k, v in options.items() if k != "mode"}
        return {"sampling": _compiled_step(_sampling_step, options), "beam": _compiled_step(_beam_step, beam_options)}

    def _failed_before(self) -> str | None:
        """Why one of this Generator's compiled steps failed earlier in the process, or None."""
        return next((_COMPILE_FAILURES[k] for k in self._failure_keys() if k in _COMPILE_FAILURES), None)

    def _flex_failed(self, reason: str, how: str) -> None:
        """The compiled FlexAttention step failed: compiled SDPA steps from here on (FlexAttention under
        torch.compile, with dynamic shapes and captured tensors, has had compiler bugs; SDPA steps have
        fewer parts to fail), with one warning. A failure of those too falls back to eager."""
        warnings.warn(f"torch.compile of the FlexAttention decode step {how} ({reason}); compiled SDPA steps "
                      f"from here on", RuntimeWarning, stacklevel=3)
        self.compile_fallback = f"flex: {reason}"
        self.attention = "sdpa"
        self._compiled = self._compiled_steps()

    def _failure_keys(self) -> list[tuple[int, str]]:
        """Keys of this Generator's compiled steps in _COMPILE_FAILURES (the step function and the attention)."""
        return [(id(fn), self.attention) for fn in self._compiled.values()]

    def _fall_back(self, reason: str, how: str) -> None:
        """Decode eagerly from here on, with one warning saying why."""
        self.compile_fallback = reason
        warnings.warn(f"torch.compile of the decode step {how} ({reason}); decoding eagerly from here on",
                      RuntimeWarning, stacklevel=3)
        self._compiled = None
        self.compile = False  # later micro-batches need no buckets (the one running keeps its padding rows)
        self.attention = "sdpa"

    def _attention_layout(self) -> dict[str, bool]:
        """How a decode cache lays out its steps' attention: length groups as lists for eager steps, as a
        table (data to the graph) for compiled CPU steps; compiled CUDA steps attend over the whole width
        (FlexAttention skips the padding there)."""
        on_cpu = self.device.type == "cpu"
        return {"split": not self.compile or on_cpu, "flex": self.attention == "flex",
                "table": self.compile and on_cpu and self.attention == "sdpa"}

    def _slots(self, reqs: list[Request]) -> tuple[int, int]:
        """(slots, encoder width) a refill run of `reqs` decodes at: the widest request sets the width
        (compiled: width_bucket), the token budget over that width the slots (compiled:
        padded up to a row bucket, so runs of one bucket share one graph)."""
        width = self._bucket_width(max(len(r.input_ids) for r in reqs))
        steps = max(r.params.max_new_tokens for r in reqs) + 1
        memory = self._memory_cap(width, steps)
        slots = min(self._slot_cap(width), len(reqs), memory or len(reqs))
        if self.compile:
            slots = row_bucket(slots)
            if memory is not None and slots > memory:  # the bucket below instead of one over the budget
                slots = max([b for b in ROW_BUCKETS if b <= memory] or [1])
        return slots, width

    MEMORY_MARGIN = 0.2  # CUDA: share of the free device memory left out of the slots' budget

    def _slot_bytes(self, width: int, steps: int) -> int:
        """What one slot holds on the device: per decoder layer its own keys/values (sliding layers
        at most a window) and the encoder's at `width`, plus a step's logits and their float32 scores."""
        dec = self.config.decoder
        elem = self.model.embed_tokens.weight.element_size()
        own = sum(min(dec.sliding_window, steps) if kind == "sliding_attention" else steps for kind in dec.layer_types)
        keys = own + len(dec.layer_types) * width  # [Hkv, D] key and value vectors per slot
        return 2 * dec.num_kv_heads * dec.head_dim * keys * elem + self.config.vocab_size * (elem + 4)

    def _memory_cap(self, width: int, steps: int) -> int | None:
        """The most slots the memory budget holds (None: no budget)."""
        budget = self._memory_budget()
        return None if budget is None else max(1, budget // self._slot_bytes(width, steps))

    def _memory_budget(self) -> int | None:
        """Bytes a run's slots may hold (None: no budget): `memory_budget` when set, else on CUDA the free
        device memory (weights are already loaded), within memory_share of the card, less MEMORY_MARGIN."""
        budget = self.memory_budget
        if budget is None and self.device.type == "cuda":
            allocated = torch.cuda.memory_allocated(self.device)
            budget = cuda_slot_budget(
                free=torch.cuda.mem_get_info(self.device)[0],
                cached=torch.cuda.memory_reserved(self.device) - allocated,
                held=0 if self._state is None else _state_bytes(*self._state[1:]), allocated=allocated,
                total=torch.cuda.get_device_properties(self.device).total_memory, share=self.memory_share,
                margin=self.MEMORY_MARGIN)
        return budget

    def _slot_cap(self, width: int, steps: int = 1, budget: int | None = None) -> int:
        """The most slots a run at an encoder width may have: max_batch_size, the token budget over the
        width where one caps the slots (slot_token_cap), and `budget` bytes of memory when given."""
        width = self._bucket_width(width)
        cap = self.max_batch_size
        if self.slot_token_cap is not None:
            cap = min(cap, self.slot_token_cap // width)
        if budget is not None:
            cap = min(cap, budget // self._slot_bytes(width, steps))
        return max(1, cap)

    def _bucket_width(self, width: int) -> int:
        """The encoder width a run of prompts up to `width` tokens decodes at (width_bucket when compiled)."""
        return width_bucket(width, ladder=self.attention == "flex") if self.compile else width

    def _tail_bucket(self, running: int) -> int | float:
        """The slots a compiled run shrinks to when `running` rows are left and nothing waits: the smallest
        row bucket holding them, or for static-shape steps the smallest of TAIL_BUCKETS (inf: none)."""
        if self.attention != "flex":
            return row_bucket(running)
        return next((size for size in TAIL_BUCKETS if running <= size), math.inf)

    def _run_sampling(self, reqs: list[Request]) -> list[Result]:
        """Greedy and sampled requests, one row each, through a fixed number of slots (continuous refill).

        The first requests (widest first) fill the slots; per step every slot writes its token into
        `rows.out` at its own position and marks rows that hit an EOS id or their max_new_tokens, all
        on the device. Every check_every steps the loop reads the flags: finished rows' tokens are
        saved, and while requests wait, they take the finished rows' slots (one encoder call per
        refill group, in the order given; their encoder keys/values written into the slot's region
        of the cache, which is as wide as the run's widest request, and their positions reset to
        zero), so no shape changes and a compiled step needs no new graph. Once nothing waits, the
        finished rows leave the cache in one gather when they are compact_fraction of the batch. A
        row's result is its tokens up to the first EOS (EOS is banned before min_new_tokens, so the
        first one counts) or max_new_tokens.

        Rows that finished keep decoding until they are refilled or leave (their tokens past the
        end are never read); they stay at the last own slot, which is one past every request's
        max_new_tokens. Compiled, slots are a bucket size and the width a width_bucket
        size; slots no request holds are marked done.
        """
        dev = self.device
        n = len(reqs)
        # Longest max_new_tokens first: the run's tail, when nothing waits and slots drain, is then
        # made of short requests (the width is the run's widest request whatever the order).
        order = sorted(range(n), key=lambda i: (-reqs[i].params.max_new_tokens, -len(reqs[i].input_ids)))
        slots, width = self._slots(reqs)
        eos = self._eos_lists(reqs)  # one EOS width for every request of the run
        room = max(r.params.max_new_tokens for r in reqs) + 1  # + the parking slot of finished rows
        if self.compile:
            room = -(-room // STEP_MULTIPLE) * STEP_MULTIPLE
        # Each encoder call takes its group in encoder-length order (tight attention groups, little padding).
        first, waiting = sorted(order[:slots], key=lambda i: len(reqs[i].input_ids)), order[slots:]
        memory, mask = self._encode([reqs[i] for i in first])
        pad_width = width - memory.shape[1]
        memory = torch.nn.functional.pad(memory, (0, 0, 0, pad_width, 0, slots - len(first)))
        mask = torch.nn.functional.pad(mask, (0, pad_width, 0, slots - len(first)), value=False)
        alive = first + [-1] * (slots - len(first))  # slot -> request index (-1: free, or a finished row's)
        widths = [len(reqs[i].input_ids) if i >= 0 else 1 for i in alive]
        starting = [reqs[i] for i in first]
        key = (slots, width, room, len(eos[0]), self.attention, self.model.embed_tokens.weight.dtype)
        if self.compile and self._state is not None and self._state[0] == key:
            _, cache, rows = self._state  # the last run's buffers, at the same addresses
            cache.restore()
            cache.refill(range(slots), self.model.cross_kv(memory, mask, packed=True), mask, widths)
            rows.reset(starting, [eos[i] for i in first], self.config.bos_token_id)
        else:
            self._state = None  # freed before the new state is allocated
            cache = self.model.start_decoding(memory, mask, room, widths=widths, per_row=True,
                                              **self._attention_layout())
            rows = _Rows.start(starting, slots, room, [eos[i] for i in first], self.config.bos_token_id, dev)
            if self.compile:
                self._state = (key, cache, rows)
        del memory
        sampler = _Sampler(starting, slots, dev, self.config.decoder.final_logit_softcapping, every=reqs)
        if self.compile and self.device.type == "cuda":
            _mark_static(cache, rows)
        saved = torch.empty((n, room), dtype=torch.long, device=dev)  # by request: rows that finished
        ends = [reqs[i].params.max_new_tokens if i >= 0 else 0 for i in alive]  # host: step each slot is surely done
        step = 0
        while True:
            self._step("sampling", cache, rows, sampler)
            step += 1
            self.stats.decode_row_steps += len(alive)
            self.stats.slot_steps += len(alive)
            check = step % self.check_every == 0 or step >= max(ends)
            if not check:
                # Between checks the host still knows which rows reached their max_new_tokens (no
                # device read): once they are a refill group, waiting requests take their slots.
                due = [s for s, a in enumerate(alive) if a >= 0 and ends[s] <= step] if waiting else []
                if len(due) < max(1, int(self.refill_fraction * len(alive))):
                    continue
                done = None
                finished = due
            else:
                done = rows.done.tolist()  # the loop's one device read, every check_every steps
                finished = [s for s, d in enumerate(done) if d and alive[s] >= 0]
            if finished:  # save their tokens (a device copy) and free their slots
                into = torch.tensor([alive[s] for s in finished], device=dev)
                saved[into] = rows.out[torch.tensor(finished, device=dev)]
                for s in finished:
                    alive[s] = -1
            if all(a < 0 for a in alive) and not waiting:
                break
            if waiting:
                free = [s for s, a in enumerate(alive) if a < 0][: len(waiting)]  # every free slot is done
                if free:
                    group, waiting = waiting[: len(free)], waiting[len(free):]
                    group.sort(key=lambda i: len(reqs[i].input_ids))
                    self._refill(reqs, group, free, eos, cache, rows, sampler)
                    for s, i in zip(free, group):
                        alive[s] = i
                        ends[s] = step + reqs[i].params.max_new_tokens
                continue
            if done is None:
                continue
            # Nothing waits: drop finished rows in bulk once they are compact_fraction of the batch.
            if sum(done) < max(1, int(self.compact_fraction * len(done))):
                continue
            running = [s for s, a in enumerate(alive) if a >= 0]
            keep = running
            if self.compile:  # shrink only to a smaller bucket, filling it with finished rows
                size = self._tail_bucket(len(running))
                if size >= len(done):
                    continue
                keep = sorted(running + [s for s, a in enumerate(alive) if a < 0][: size - len(running)])
            index = torch.tensor(keep, device=dev)
            # Compiled: in place, into the front of the same buffers (the addresses a CUDA graph recorded).
            # FlexAttention steps keep the width: trimming it would be a new static graph and save no reads.
            cache.keep(keep, multiple=WIDTH_MULTIPLE if self.compile else 1, in_place=self.compile,
                       trim=self.attention != "flex")
            rows.keep(index, in_place=self.compile)
            sampler.keep(index)
            if self.compile and self.device.type == "cuda":
                _mark_static(cache, rows)
            alive = [alive[s] for s in keep]
            ends = [ends[s] for s in keep]
        return self._sampling_results(reqs, saved)

    def _refill(self, reqs, group: list[int], free: list[int], eos, cache: DecoderCache, rows: _Rows,
                sampler: _Sampler) -> None:
        """Requests `group` (indices into reqs) take the slots `free`: one encoder call, their encoder
        keys/values into the slots' cache rows, their decoding state into the slots' rows."""
        members = [reqs[i] for i in group]
        memory, mask = self._encode(members)
        widths = [len(r.input_ids) for r in members]
        cache.refill(free, self.model.cross_kv(memory, mask, packed=True), mask, widths)
        index = torch.tensor(free, device=self.device)
        rows.fill(index, members, [eos[i] for i in group], self.config.bos_token_id)
        sampler.fill(index, members)

    def _sampling_results(self, reqs: list[Request], tokens: torch.Tensor) -> list[Result]:
        """Cut each request's row of tokens [R, steps] at its first EOS or its max_new_tokens."""
        results = []
        for req, row in zip(reqs, tokens.tolist()):  # one device read for the micro-batch
            eos = set(req.params.eos_token_ids or self.config.eos_token_ids)
            limit = req.params.max_new_tokens
            end = next((i + 1 for i, t in enumerate(row[:limit]) if t in eos), None)
            results.append(Result(row[:end], "eos") if end is not None else Result(row[:limit], "length"))
            self.stats.generated_tokens += len(results[-1].token_ids)
            self.stats.slot_tokens += len(results[-1].token_ids)
        return results

    def _run_beam(self, reqs: list[Request], beams: int) -> list[Result]:
        """Beam search with the reference's bookkeeping, vectorised over R requests x K beams.

        The state lives in a `_Beams` object and `_beam_step` advances it one token, reading
        nothing back (compiled when `compile` is on). The stop rule (no request can improve, or
        every candidate stopped) is read every check_every steps: steps past a request's stop
        leave its finished hypotheses as they are (their scores carry a -1e9 penalty), so
        checking late changes no result.
        """
        memory, mask = self._encode(reqs)
        eos_lists = self._eos_lists(reqs)
        steps = max(r.params.max_new_tokens for r in reqs)
        cache = self.model.start_decoding(memory, mask, steps, repeat=beams, widths=[len(r.input_ids) for r in reqs],
                                          **self._attention_layout())
        del memory
        state = _Beams.start(reqs, beams, steps, eos_lists, self.config, self.device)
        for step in range(steps):
            self._step("beam", cache, state)
            cache.follow_beams(state.source_rows)  # eager: see _beam_step
            self.stats.decode_row_steps += len(reqs) * beams
            if (step + 1) % self.check_every == 0 and bool(state.stop):  # one read per check
                break
        # [R, K, 1 + steps]: length then tokens of each finished hypothesis, best first; one read per micro-batch
        best = torch.cat((state.fin_len[:, :, None], state.fin_seqs), 2).tolist()
        results = []
        for r, req in enumerate(reqs):
            returned = []
            for length, *tokens in best[r][: req.params.num_return_sequences]:
                ids = tokens[:length]
                ended = bool(length) and ids[-1] in set(eos_lists[r])
                returned.append((ids, "eos" if ended else "length"))
                self.stats.generated_tokens += length
            ids, reason = returned[0]
            results.append(Result(ids, reason, sequences=returned if len(returned) > 1 else None))
        return results


def _samples(request: Request) -> int:
    """Decode rows a request takes as separate requests: its n samples (beams return n from one search)."""
    return request.params.num_return_sequences if request.params.num_beams == 1 else 1


def _sample_request(request: Request, sample: int) -> Request:
    """Sample `sample` of a request: sample 0 is the request as it would run alone with n = 1; the
    others are seeded apart, from its seed and their number. The prompt objects are shared (not
    copied), which is how _encode knows to encode them once."""
    if _samples(request) == 1:  # one sample, or beam search (which returns its n best itself)
        return request
    seed = request.params.seed
    if sample > 0:
        digest = hashlib.blake2b(f"{_seed32(request)}:{sample}".encode(), digest_size=4).digest()
        seed = int.from_bytes(digest, "little")
    params = replace(request.params, seed=seed, num_return_sequences=1)
    return Request(request.input_ids, pixel_values=request.pixel_values, params=params)


def _kind(request: Request) -> int:
    """Requests of one micro-batch share a decoding loop: beam width groups them."""
    return request.params.num_beams


@dataclass
class _Beams:
    """Beam search state of R requests x K beams, on the device; `_beam_step` advances it."""

    K: int  # beams per request
    keep_k: int  # candidates kept per request each step: enough that K survive every EOS hit
    vocab: int
    eos: torch.Tensor  # [R, E] long
    eos_cols: torch.Tensor  # [R, K, E] long: eos expanded over the beams (the ban's columns)
    max_new: torch.Tensor  # [R] long
    min_new: torch.Tensor  # [R] long
    penalty: torch.Tensor  # [R] float32: length_penalty
    row_base: torch.Tensor  # [R, 1] long: first cache row of each request (r * K)
    top_mask: torch.Tensor  # [keep_k] bool: the first K candidates
    tokens: torch.Tensor  # [R * K] long: the tokens the next step reads
    seqs: torch.Tensor  # [R, K, steps] long: running beams' tokens
    run_scores: torch.Tensor  # [R, K] float32: running beams' summed log-probs
    fin_seqs: torch.Tensor  # [R, K, steps] long: best finished hypotheses, best first
    fin_len: torch.Tensor  # [R, K] long
    fin_scores: torch.Tensor  # [R, K] float32: length-normalised
    fin_done: torch.Tensor  # [R, K] bool: slot holds a real hypothesis
    open_: torch.Tensor  # [R] bool: improvement still possible
    stop: torch.Tensor  # [] bool: no request can improve, or every candidate stopped
    source_rows: torch.Tensor  # [R * K] long: cache row each beam continues after the last step

    @classmethod
    def start(cls, reqs: list[Request], K: int, steps: int, eos_lists: list[list[int]], cfg, device) -> _Beams:
        R = len(reqs)
        eos = torch.tensor(eos_lists, device=device)
        keep_k = max(2, 1 + eos.shape[1]) * K
        run_scores = torch.zeros((R, K), device=device)
        run_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand at step 0
        return cls(
            K=K, keep_k=keep_k, vocab=cfg.vocab_size, eos=eos, eos_cols=eos[:, None, :].expand(R, K, eos.shape[1]),
            max_new=torch.tensor([r.params.max_new_tokens for r in reqs], device=device),
            min_new=torch.tensor([r.params.min_new_tokens for r in reqs], device=device),
            penalty=torch.tensor([r.params.length_penalty for r in reqs], device=device, dtype=torch.float32),
            row_base=torch.arange(R, device=device)[:, None] * K,
            top_mask=torch.arange(keep_k, device=device) < K,
            tokens=torch.full((R * K,), cfg.bos_token_id, dtype=torch.long, device=device),
            seqs=torch.zeros((R, K, steps), dtype=torch.long, device=device),
            run_scores=run_scores,
            fin_seqs=torch.zeros((R, K, steps), dtype=torch.long, device=device),
            fin_len=torch.zeros((R, K), dtype=torch.long, device=device),
            fin_scores=torch.full((R, K), -1e9, device=device),
            fin_done=torch.zeros((R, K), dtype=torch.bool, device=device),
            open_=torch.ones(R, dtype=torch.bool, device=device),
            stop=torch.zeros((), dtype=torch.bool, device=device),
            source_rows=torch.arange(R * K, device=device),
        )


def _beam_step(model: T5Gemma2, cache: DecoderCache, b: _Beams) -> None:
    """One beam-search step for every request, on the device, with no read back (the compile target)."""
    R, K, keep_k, vocab = b.run_scores.shape[0], b.K, b.keep_k, b.vocab
    steps = b.seqs.shape[2]
    step = cache.position.clone()  # [1]: the position decoded now
    length = step + 1  # [1]: hypothesis length after this step
    logits = model.lm_logits(model.decode_step(b.tokens, cache))
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32).view(R, K, vocab)
    # EOS ban before min_new_tokens, after the softmax as the reference.
    logprobs = _ban_eos(logprobs, b.eos_cols, (step < b.min_new)[:, None, None])  # [R, K, V]; banned [R, 1, 1]
    totals = (logprobs + b.run_scores[:, :, None]).view(R, K * vocab)
    cand_scores, cand_idx = torch.topk(totals, keep_k, dim=1)  # [R, 2K]
    cand_beam, cand_tok = cand_idx // vocab, cand_idx % vocab
    cand_seqs = torch.gather(b.seqs, 1, cand_beam[:, :, None].expand(R, keep_k, steps))  # a new tensor
    cand_seqs.index_copy_(2, step, cand_tok[:, :, None])
    at_limit = (length >= b.max_new)[:, None]
    hits = (cand_tok[:, :, None] == b.eos[:, None, :]).any(-1) | at_limit  # [R, 2K]
    # Running beams: best K candidates that did not stop.
    run_cand = cand_scores - 1e9 * hits.float()
    next_idx = torch.topk(run_cand, K, dim=1)[1]
    b.run_scores = torch.gather(run_cand, 1, next_idx)
    b.seqs = torch.gather(cand_seqs, 1, next_idx[:, :, None].expand(R, K, steps))
    source_beam = torch.gather(cand_beam, 1, next_idx)  # [R, K]
    # Finished hypotheses: stopped candidates among the top K, length-normalised.
    norm = length.float() ** b.penalty  # [R]
    just_done = hits & b.top_mask[None, :]
    normed = cand_scores / norm[:, None]
    normed = normed - 1e9 * (~just_done).float() - 1e9 * (~b.open_).float()[:, None]
    merged_scores = torch.cat([b.fin_scores, normed], 1)
    best = torch.topk(merged_scores, K, dim=1)[1]
    b.fin_scores = torch.gather(merged_scores, 1, best)
    b.fin_seqs = torch.gather(torch.cat([b.fin_seqs, cand_seqs], 1), 1, best[:, :, None].expand(R, K, steps))
    b.fin_len = torch.gather(torch.cat([b.fin_len, length.expand(R, keep_k)], 1), 1, best)
    b.fin_done = torch.gather(torch.cat([b.fin_done, just_done], 1), 1, best)
    # The self caches must follow the surviving beams (cross k/v are equal across beams): the
    # caller does that gather after the step, eagerly. Inside a compiled graph, inductor may fuse
    # "own slots <- own slots gathered by row" into one kernel reading rows it already overwrote.
    b.source_rows = (source_beam + b.row_base).view(-1)  # beams may be duplicated or dropped
    b.tokens = b.seqs.index_select(2, step).reshape(-1)
    # The reference's early-stop rule: stop once the best running beam, normalised by the
    # current length, cannot beat the worst finished hypothesis.
    best_running = b.run_scores[:, 0] / norm
    worst = torch.where(b.fin_done, b.fin_scores.min(1, keepdim=True)[0], torch.full_like(b.fin_scores, -1e9))
    b.open_ = b.open_ & (best_running[:, None] > worst).any(1)
    b.stop = ~b.open_.any() | hits.all()


_COMPILED_STEPS: dict = {}  # torch.compile options -> the compiled step, shared by every Generator
# (id of a compiled step, attention) -> why compiling it failed: a later Generator of this process does not
# try again (a failing compile can take a minute, and fails the same way).
_COMPILE_FAILURES: dict[tuple[int, str], str] = {}


def _compiled_step(step, options: dict):
    """One compiled step function per set of options for the whole process: each torch.compile call
    is a new backend to dynamo, so a step compiled per Generator would be traced again for each."""
    key = (step.__name__,) + tuple(sorted((k, v if isinstance(v, (str, int, float, bool, type(None))) else id(v))
                                          for k, v in options.items()))
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = torch.compile(step, **options)
    return _COMPILED_STEPS[key]


def cuda_slot_budget(free: int, cached: int, held: int, allocated: int, total: int, share: float | None,
                     margin: float) -> int:
    """Bytes a run's slots may take on a CUDA device, from its readings: `free` (the driver's free memory),
    `cached` (blocks PyTorch's allocator keeps from earlier runs: free to us, not to the driver), `held`
    (the last run's decode state, ours to reuse or free: counted as free, or the next run would get fewer
    slots, another shape and a new state, back and forth), `allocated` (everything this process holds,
    weights and that state included) and `total` (the card). With a `share`, what this process holds
    beyond the held state counts against share x total, and the rest of the card is its neighbours'.
    The `margin` share is left out."""
    available = free + cached + held
    if share is not None:
        available = min(available, int(share * total) - (allocated - held))
    return max(0, int(available * (1 - margin)))


def _state_bytes(cache: DecoderCache, rows: _Rows) -> int:
    """Device bytes of a decode state as allocated (its keys and values dominate)."""
    tensors = [t for layer in cache.layers for t in layer.full] + list(rows.full.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def _mark_static(cache: DecoderCache, rows: _Rows) -> None:
    """CUDA graphs: the tensors a step writes in place keep their addresses across replays, so they
    are marked static (not copied into the graph's own buffers, which would lose the writes' point).
    guard=False: a new micro-batch's buffers do not force a recompile, only a new recording."""
    tensors = [cache.position, cache.lengths, rows.tokens, rows.out, rows.done, *cache.masks.values()]
    tensors += [t for layer in cache.layers for t in (layer.keys, layer.values)]
    for t in tensors:
        torch._dynamo.mark_static_address(t, guard=False)


@dataclass
class _Rows:
    """The running rows' decoding state, all on the device (one row per present row)."""

    tokens: torch.Tensor  # [B] long: the tokens the next step reads
    out: torch.Tensor  # [B, steps] long: tokens generated so far, column t written at step t
    done: torch.Tensor  # [B] bool: hit an EOS id or max_new_tokens (the row may still decode)
    max_new: torch.Tensor  # [B] long
    min_new: torch.Tensor  # [B] long: EOS is banned at steps < min_new
    eos: torch.Tensor  # [B, E] long: EOS ids (repeats pad short lists)
    full: dict | None = None  # the tensors as allocated (keep(in_place) leaves views of them: see reset)

    FIELDS = ("tokens", "out", "done", "max_new", "min_new", "eos")

    @classmethod
    def start(cls, reqs: list[Request], rows: int, steps: int, eos: list[list[int]], bos: int, device) -> _Rows:
        pad = rows - len(reqs)  # padding rows: done from the start, limit 1, any EOS list
        state = cls(
            tokens=torch.full((rows,), bos, dtype=torch.long, device=device),
            out=torch.zeros((rows, steps), dtype=torch.long, device=device),
            done=torch.tensor([False] * len(reqs) + [True] * pad, device=device),
            max_new=torch.tensor([r.params.max_new_tokens for r in reqs] + [1] * pad, device=device),
            min_new=torch.tensor([r.params.min_new_tokens for r in reqs] + [0] * pad, device=device),
            eos=torch.tensor(eos + [eos[0]] * pad, device=device),
        )
        state.full = {name: getattr(state, name) for name in cls.FIELDS}
        return state

    def reset(self, reqs: list[Request], eos: list[list[int]], bos: int) -> None:
        """Start a new run in the tensors as allocated (in place: a captured graph's addresses stay):
        the first rows take `reqs`, the rest pad (done, limit 1)."""
        for name, tensor in self.full.items():
            setattr(self, name, tensor)
        n = len(reqs)
        self.fill(torch.arange(n, device=self.tokens.device), reqs, eos, bos)
        self.done[n:] = True
        self.max_new[n:] = 1
        self.min_new[n:] = 0
        self.eos[n:] = self.eos[0]

    def fill(self, index: torch.Tensor, reqs: list[Request], eos: list[list[int]], bos: int) -> None:
        """Rows at `index` start the requests `reqs` (in place: a compiled step's buffers stay)."""
        dev = self.tokens.device
        self.tokens.index_fill_(0, index, bos)
        self.done.index_fill_(0, index, False)
        self.max_new.index_copy_(0, index, torch.tensor([r.params.max_new_tokens for r in reqs], device=dev))
        self.min_new.index_copy_(0, index, torch.tensor([r.params.min_new_tokens for r in reqs], device=dev))
        self.eos.index_copy_(0, index, torch.tensor(eos, device=dev))

    def keep(self, index: torch.Tensor, in_place: bool = False) -> None:
        """Keep the rows at `index`: new tensors, or (in_place) moved to the front of these and viewed."""
        for name in self.FIELDS:
            tensor = getattr(self, name)
            picked = tensor.index_select(0, index)
            setattr(self, name, tensor[: index.shape[0]].copy_(picked) if in_place else picked)


def _sampling_step(model: T5Gemma2, cache: DecoderCache, rows: _Rows, sampler: _Sampler) -> None:
    """One decode step of every present row, in place, on the device, with no read back:
    embed -> decoder layers -> final norm -> LM head -> EOS ban -> token choice -> flags.

    The compile target: every input that changes per step is a tensor (cache.position, the
    cache buffers, rows.*), so the same graph serves every step of a micro-batch.
    """
    step = cache.position.clone()  # [1]: the position decoded now (decode_step advances the cache)
    hidden = model.decode_step(rows.tokens, cache)  # [B, H]
    logits = model.lm_logits(hidden, softcap=False)  # [B, V] in the model dtype; the sampler caps its candidates
    logits = _ban_eos(logits, rows.eos, (step < rows.min_new)[:, None])  # EOS banned before min_new_tokens
    tokens = sampler.choose(logits, step)  # [B]
    # Each row at its own position. An index_put_, not a scatter_: in a graph, inductor writes an
    # input's index_put_ in place, while a scatter_ into an input copied the whole [B, steps] buffer twice.
    rows.out.index_put_((torch.arange(tokens.shape[0], device=tokens.device), step), tokens)
    rows.done.logical_or_((tokens[:, None] == rows.eos).any(1) | (rows.max_new <= step + 1))
    rows.tokens.copy_(tokens)
    if cache.flex:
        # A finished row decodes on until it is refilled or leaves, its tokens never read: FlexAttention's
        # block mask then skips its encoder keys (a refill writes the new request's length). Rows a static
        # run keeps in its tail buckets (TAIL_BUCKETS) then cost their own slots only. Not yet measured.
        cache.lengths.masked_fill_(rows.done, 0)


def _ban_eos(scores: torch.Tensor, eos: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """scores [..., V] with the EOS ids `eos` [..., E] at -inf in the rows where `banned` [..., 1] holds.

    In place, and only the EOS columns are read and written (a gather, then a write of E columns, not a
    pass over the vocabulary). Traced (a compiled step) the write is an index_put_, which inductor does
    in place in the LM head's output: a scatter_ there made the graph copy the whole [B, V] logits, and a
    where over each row's vocabulary (fused into the argmax, index vectors built per logit) cost the
    compiled longtail bench run 4%.
    """
    values = scores.gather(-1, eos).masked_fill(banned, float("-inf"))
    if torch.compiler.is_compiling():
        # One index per leading dim, broadcast against eos: [B, 1] (or [R, 1, 1] and [1, K, 1] for beams).
        lead = tuple(torch.arange(n, device=scores.device).view([n if d == i else 1 for d in range(eos.dim())])
                     for i, n in enumerate(scores.shape[:-1]))
        return scores.index_put_((*lead, eos), values)
    return scores.scatter_(-1, eos, values)


class _Sampler:
    """Chooses next tokens: argmax for greedy rows, hash-noise Gumbel-max for sampled rows.

    Nothing here reads the device: every present row's sampled token is computed when any row
    samples, and greedy rows take the argmax through a where. When every sampled row has a top_k,
    only the best max(top_k) tokens are candidates (a top-k, no sort of the whole vocabulary) and
    the noise is drawn at those token ids only; the result is the same as over the whole vocabulary.
    """

    def __init__(self, reqs: list[Request], rows: int, device, softcap: float | None,
                 every: list[Request] | None = None):
        """reqs: the requests of the first rows (the rest pad, decoding greedily); every: all requests
        these rows will ever hold (refill), which set the sampler's static choices (default: reqs)."""
        pad = [GenerationParams()] * (rows - len(reqs))  # padding rows decode greedily
        params = [r.params for r in reqs] + pad
        every_params = [r.params for r in (reqs if every is None else every)]
        self.any_sampled = any(not p.greedy for p in every_params)
        self.softcap = softcap
        sampled = [p for p in every_params if not p.greedy]
        # Candidates per row when every sampled row bounds them with top_k (0 = the whole vocabulary).
        # Rounded up to a power of two (the result does not depend on it) so that a compiled step
        # sees few distinct values.
        bound = max(p.top_k for p in sampled) if sampled and all(p.top_k > 0 for p in sampled) else 0
        self.top_k_bound = 1 << (bound - 1).bit_length() if bound else 0
        self.filtered = any(p.top_k > 0 or p.top_p < 1 for p in sampled)
        self.sampled = torch.tensor([not p.greedy for p in params], device=device)  # [B]
        self.temperature = torch.tensor([max(p.temperature, 1e-6) for p in params], device=device)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        seeds = [_seed32(r) for r in reqs] + [0] * len(pad)
        self.seed = torch.tensor(seeds, device=device, dtype=torch.long)

    def fill(self, index: torch.Tensor, reqs: list[Request]) -> None:
        """Rows at `index` start the requests `reqs` (in place)."""
        dev = self.seed.device
        params = [r.params for r in reqs]
        self.sampled.index_copy_(0, index, torch.tensor([not p.greedy for p in params], device=dev))
        self.temperature.index_copy_(0, index, torch.tensor([max(p.temperature, 1e-6) for p in params], device=dev))
        self.top_k.index_copy_(0, index, torch.tensor([p.top_k for p in params], device=dev))
        self.top_p.index_copy_(0, index, torch.tensor([p.top_p for p in params], device=dev))
        self.seed.index_copy_(0, index, torch.tensor([_seed32(r) for r in reqs], device=dev, dtype=torch.long))

    def keep(self, index: torch.Tensor) -> None:
        for name in ("sampled", "temperature", "top_k", "top_p", "seed"):
            setattr(self, name, getattr(self, name).index_select(0, index))

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Model-dtype logits -> float32 soft-capped scores / temperature (-inf stays -inf)."""
        scores = logits.float()
        if self.softcap is not None:
            scores = torch.where(scores == float("-inf"), scores, torch.tanh(scores / self.softcap) * self.softcap)
        return scores / self.temperature[:, None]

    def choose(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (model dtype, not soft-capped) of the present rows, step [1] -> tokens [B]."""
        # In the model dtype: no float32 copy of the logits. max's indices are argmax's (the first
        # best, NaN counting as best) at 1.6x (float32) to 4x (bfloat16) its speed on CPU.
        greedy = logits.max(-1).indices
        if not self.any_sampled:
            return greedy
        vocab = logits.shape[-1]
        if self.top_k_bound:
            cand, ids = logits.topk(min(self.top_k_bound, vocab), dim=-1)  # [B, k], best first
            scores = _filter_sorted(self._scores(cand), self.top_k, self.top_p)
            pick = (scores + _gumbel(self.seed, step, ids)).max(-1, keepdim=True).indices
            drawn = ids.gather(1, pick)[:, 0]
        else:
            scores = self._scores(logits)  # [B, V] float32: some row samples from the whole vocabulary
            if self.filtered:
                ordered, order = scores.sort(dim=-1, descending=True)
                scores = torch.empty_like(scores).scatter_(1, order, _filter_sorted(ordered, self.top_k, self.top_p))
            token = torch.arange(vocab, device=logits.device)[None, :]
            drawn = (scores + _gumbel(self.seed, step, token)).max(-1).indices
        return torch.where(self.sampled, drawn, greedy)


def _filter_sorted(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scores [B, n] sorted best first -> -inf outside each row's top-k and smallest top-p nucleus.

    The nucleus is measured with a running sum of exp(score - best) cut at the row's own k, so a
    row's result does not depend on n (how many candidates its batch kept) beyond its top_k.
    """
    n = scores.shape[-1]
    rank = torch.arange(n, device=scores.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, n)).clamp(max=n)[:, None]  # [B, 1]
    remove = rank >= k
    weight = torch.exp(scores - scores[:, :1]).masked_fill(remove, 0.0)  # unnormalised probabilities
    running = weight.cumsum(-1)
    total = running.gather(1, k - 1)  # [B, 1]: the mass of the row's top-k
    remove |= (running - weight >= top_p[:, None] * total) & (rank > 0)  # the best token always stays
    return scores.masked_fill(remove, float("-inf"))


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = (x ^ (x >> 16)) * 0x7FEB352D & _MASK32
    x = (x ^ (x >> 15)) * 0x846CA68B & _MASK32
    return x ^ (x >> 16)


def _gumbel(seeds: torch.Tensor, step: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [B, n] at token ids token [B or 1, n] that depends only on (seed, step, token id):
    batch-independent sampling. step is a [1] tensor (no host value per step)."""
    step = step.view(-1, 1)  # [1, 1] or [B, 1]: rows at their own positions
    key = _mix32((seeds[:, None] ^ _mix32((step * 0x9E3779B1) & _MASK32)) & _MASK32)  # [B, 1]
    bits = _mix32((key + token * 0x85EBCA77) & _MASK32)
    uniform = (bits.double() + 0.5) / 2.0**32  # in (0, 1)
    return -torch.log(-torch.log(uniform)).float()


def _seed32(request: Request) -> int:
    seed = request.params.seed
    if seed is None:  # reproducible without a seed: derived from the prompt itself
        digest = hashlib.blake2b(repr(request.input_ids).encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")
    return (seed ^ (seed >> 32)) & _MASK32
