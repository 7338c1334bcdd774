"""Generation: requests in, results out in input order.

`Generator(model).generate(requests)`:
1. checks each request (a malformed one becomes that request's error result);
2. sorts by encoder length and packs micro-batches under a token budget
   (`max_batch_tokens` counts padded encoder tokens, image tokens included, times rows;
   beam requests count one row per beam), so padding stays small;
3. per micro-batch: runs the encoder once (vision tower for the images), computes the
   encoder's keys/values once per request and layer into preallocated decoder buffers
   (cache.py), then decodes one token per row per step. Finished rows are dropped from the
   running batch as they accumulate, so they stop costing compute;
4. a micro-batch that runs out of device memory is split in half and retried, down to one
   request, which then becomes an "out_of_memory" error result instead of a crash.

Strategies: greedy (temperature 0), sampling (temperature, top_k, top_p) with noise drawn
from a counter-based hash of (seed, step, token), so a request's sample never depends on
what it is batched with; beam search with the reference's scoring (length_penalty, EOS
candidates kept beside the running beams, its early-stop rule).

Not here: tokenization (tokenizer.py), rows and columns (operators/).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import torch

from .t5gemma2 import T5Gemma2


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
        if self.eos_token_ids is not None and not self.eos_token_ids:
            raise ValueError("eos_token_ids must be None (the checkpoint's) or a non-empty tuple")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.num_beams == 1


@dataclass
class Request:
    """One prompt: token ids with image placeholders already expanded, and its images."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [N, 3, S, S] for the N images of the prompt, or None
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass
class Result:
    token_ids: list[int]  # generated ids; ends with EOS when finish_reason == "eos"
    finish_reason: str  # "eos" | "length" | "error"
    error: str | None = None  # what went wrong when finish_reason == "error"
    error_kind: str | None = None  # "out_of_memory" | "invalid_request"


@dataclass
class GeneratorStats:
    """Counters over the generator's lifetime (the benchmark prints them)."""

    requests: int = 0
    micro_batches: int = 0
    real_encoder_tokens: int = 0  # tokens of the prompts themselves
    padded_encoder_tokens: int = 0  # rows x longest prompt, summed over micro-batches
    generated_tokens: int = 0
    decode_row_steps: int = 0  # rows present in the running batch, summed over steps
    oom_splits: int = 0
    seconds: float = 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.real_encoder_tokens / max(1, self.padded_encoder_tokens)


class Generator:
    """Bucketed, batch-invariant decoding for a T5Gemma2 model."""

    def __init__(
        self,
        model: T5Gemma2,
        max_batch_tokens: int = 65536,
        max_batch_size: int = 256,
        device: str | torch.device | None = None,
        compact_fraction: float = 0.25,
    ):
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
        self.model = model
        self.config = model.config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        # Finished rows stay in the running batch until they are this share of it: dropping
        # them copies the caches, so it is done in bulk rather than at every finish.
        self.compact_fraction = compact_fraction
        self.stats = GeneratorStats()

    # ---- planning ----------------------------------------------------------------------------

    def _check(self, request: Request) -> str | None:
        """Why a request cannot run, or None."""
        cfg = self.config
        ids = request.input_ids
        if len(ids) == 0:
            return "empty prompt: input_ids has no tokens"
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            return f"token id out of range [0, {cfg.vocab_size})"
        n_images = 0 if request.pixel_values is None else int(request.pixel_values.shape[0])
        slots = sum(1 for t in ids if t == cfg.image_token_id)
        if slots != n_images * cfg.mm_tokens_per_image:
            return (f"{slots} image-token positions for {n_images} image(s) x {cfg.mm_tokens_per_image} tokens: "
                    f"expand each image placeholder with the tokenizer")
        if n_images:
            size = cfg.vision.image_size
            if tuple(request.pixel_values.shape[1:]) != (cfg.vision.num_channels, size, size):
                return f"pixel_values must be [N, {cfg.vision.num_channels}, {size}, {size}]"
        return None

    def plan(self, requests: list[Request], order: list[int]) -> list[list[int]]:
        """Pack request indices (sorted by length) into micro-batches under the token budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        rows = longest = 0
        for i in order:
            req = requests[i]
            beams = req.params.num_beams
            length = len(req.input_ids)
            same_kind = not current or _kind(requests[current[0]]) == _kind(req)
            fits = (rows + beams) * max(longest, length) <= self.max_batch_tokens and rows + beams <= self.max_batch_size
            if current and (not same_kind or not fits):
                batches.append(current)
                current, rows, longest = [], 0, 0
            current.append(i)
            rows += beams
            longest = max(longest, length)
        if current:
            batches.append(current)
        return batches

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
        # Beam requests first grouped by width, then every group sorted by encoder length.
        runnable.sort(key=lambda i: (_kind(requests[i]), len(requests[i].input_ids)))
        with torch.inference_mode():
            for batch in self.plan(requests, runnable):
                self._run_splitting(requests, batch, results)
        self.stats.requests += len(requests)
        self.stats.seconds += time.perf_counter() - start
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
        """Encoder once per request -> memory [R, S, H] and its padding mask [R, S]."""
        cfg = self.config
        longest = max(len(r.input_ids) for r in reqs)
        ids = torch.full((len(reqs), longest), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), longest), dtype=torch.bool)
        for row, req in enumerate(reqs):
            ids[row, : len(req.input_ids)] = torch.tensor(req.input_ids)
            mask[row, : len(req.input_ids)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = [r.pixel_values for r in reqs if r.pixel_values is not None]
        pixels = torch.cat(images).to(self.device, self.model.embed_tokens.weight.dtype) if images else None
        memory = self.model.encode(ids, mask, pixel_values=pixels)  # [R, S, H]
        self.stats.micro_batches += 1
        self.stats.real_encoder_tokens += sum(len(r.input_ids) for r in reqs)
        self.stats.padded_encoder_tokens += ids.numel()
        return memory, mask

    def _eos_table(self, reqs: list[Request]) -> torch.Tensor:
        """[R, E] EOS ids per request; short lists padded with their own first id (harmless repeats)."""
        lists = [r.params.eos_token_ids or self.config.eos_token_ids for r in reqs]
        width = max(len(e) for e in lists)
        return torch.tensor([list(e) + [e[0]] * (width - len(e)) for e in lists], device=self.device)

    def _run_batch(self, reqs: list[Request]) -> list[Result]:
        beams = reqs[0].params.num_beams
        if beams > 1:
            return self._run_beam(reqs, beams)
        return self._run_sampling(reqs)

    def _run_sampling(self, reqs: list[Request]) -> list[Result]:
        """Greedy and sampled requests, one row each.

        Per step the running batch writes its tokens into `out` (one row per present row) and
        marks rows that hit an EOS id or their max_new_tokens. Finished rows keep decoding
        (harmlessly) until they are compact_fraction of the batch; then their tokens are saved
        and they leave the cache in one gather. A row's result is its tokens up to the first EOS
        (EOS is banned before min_new_tokens, so the first one counts) or max_new_tokens.
        """
        memory, mask = self._encode(reqs)
        dev = self.device
        max_new_list = [r.params.max_new_tokens for r in reqs]
        steps = max(max_new_list)
        cache = self.model.start_decoding(memory, mask, steps)
        del memory
        max_new = torch.tensor(max_new_list, device=dev)  # per present row from here on
        min_new = torch.tensor([r.params.min_new_tokens for r in reqs], device=dev)
        last_ban = max(r.params.min_new_tokens for r in reqs)  # no EOS ban from this step on
        eos = self._eos_table(reqs)
        sampler = _Sampler(reqs, dev)
        alive = torch.arange(len(reqs), device=dev)  # present row -> request index
        out = torch.empty((len(reqs), steps), dtype=torch.long, device=dev)  # present rows' tokens
        saved = torch.empty_like(out)  # by request index: tokens of rows that left the batch
        done = torch.zeros(len(reqs), dtype=torch.bool, device=dev)
        tokens = torch.full((len(reqs),), self.config.bos_token_id, dtype=torch.long, device=dev)
        for step in range(steps):
            logits = self.model.lm_logits(self.model.decode_step(tokens, cache)).float()  # [B, V]
            self.stats.decode_row_steps += len(tokens)
            if step < last_ban:  # EOS gets -inf (added, so other rows' logits stay exact)
                penalty = torch.where(step < min_new, float("-inf"), 0.0)[:, None].expand_as(eos)
                logits.scatter_add_(1, eos, penalty)
            tokens = sampler.choose(logits, alive, step)
            out[:, step] = tokens
            done |= (tokens[:, None] == eos).any(1) | (max_new <= step + 1)
            finished = int(done.sum())
            if finished == len(done):
                break
            if finished >= max(1, int(self.compact_fraction * len(done))):
                gone, keep = done.nonzero()[:, 0], (~done).nonzero()[:, 0]
                saved[alive[gone]] = out[gone]
                cache.keep(keep)
                alive, tokens, out = alive[keep], tokens[keep], out[keep]
                max_new, min_new, eos, done = max_new[keep], min_new[keep], eos[keep], done[keep]
        saved[alive] = out
        return self._sampling_results(reqs, saved.cpu())

    def _sampling_results(self, reqs: list[Request], tokens: torch.Tensor) -> list[Result]:
        """Cut each request's row of tokens [R, steps] at its first EOS or its max_new_tokens."""
        results = []
        for req, row in zip(reqs, tokens.tolist()):
            eos = set(req.params.eos_token_ids or self.config.eos_token_ids)
            limit = req.params.max_new_tokens
            end = next((i + 1 for i, t in enumerate(row[:limit]) if t in eos), None)
            results.append(Result(row[:end], "eos") if end is not None else Result(row[:limit], "length"))
            self.stats.generated_tokens += len(results[-1].token_ids)
        return results

    def _run_beam(self, reqs: list[Request], beams: int) -> list[Result]:
        """Beam search with the reference's bookkeeping, vectorised over R requests x K beams."""
        memory, mask = self._encode(reqs)
        dev = self.device
        R, K = len(reqs), beams
        eos = self._eos_table(reqs)  # [R, E]
        keep_k = max(2, 1 + eos.shape[1]) * K  # candidates kept per request each step
        max_new = torch.tensor([r.params.max_new_tokens for r in reqs], device=dev)
        min_new = torch.tensor([r.params.min_new_tokens for r in reqs], device=dev)
        penalty = torch.tensor([r.params.length_penalty for r in reqs], device=dev, dtype=torch.float32)
        steps = int(max_new.max())
        cache = self.model.start_decoding(memory, mask, steps, repeat=K)
        del memory
        vocab = self.config.vocab_size
        seqs = torch.zeros((R, K, steps), dtype=torch.long, device=dev)  # running beams' tokens
        run_scores = torch.zeros((R, K), device=dev)
        run_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand at step 0
        fin_seqs = torch.zeros((R, K, steps), dtype=torch.long, device=dev)
        fin_len = torch.zeros((R, K), dtype=torch.long, device=dev)
        fin_scores = torch.full((R, K), -1e9, device=dev)
        fin_done = torch.zeros((R, K), dtype=torch.bool, device=dev)
        open_ = torch.ones(R, dtype=torch.bool, device=dev)  # improvement still possible
        tokens = torch.full((R * K,), self.config.bos_token_id, dtype=torch.long, device=dev)
        top_mask = torch.arange(keep_k, device=dev) < K
        for step in range(steps):
            logits = self.model.lm_logits(self.model.decode_step(tokens, cache)).float()
            logprobs = torch.log_softmax(logits, dim=-1).view(R, K, vocab)
            self.stats.decode_row_steps += R * K
            banned = step < min_new
            if bool(banned.any()):
                idx = banned.nonzero()[:, 0]
                logprobs[idx[:, None, None], torch.arange(K, device=dev)[None, :, None], eos[idx][:, None, :]] = float("-inf")
            totals = (logprobs + run_scores[:, :, None]).view(R, K * vocab)
            cand_scores, cand_idx = torch.topk(totals, keep_k, dim=1)  # [R, 2K]
            cand_beam, cand_tok = cand_idx // vocab, cand_idx % vocab
            cand_seqs = torch.gather(seqs, 1, cand_beam[:, :, None].expand(R, keep_k, steps)).clone()
            cand_seqs[:, :, step] = cand_tok
            at_limit = (step + 1 >= max_new)[:, None]
            hits = (cand_tok[:, :, None] == eos[:, None, :]).any(-1) | at_limit  # [R, 2K]
            # Running beams: best K candidates that did not stop.
            run_cand = cand_scores - 1e9 * hits.float()
            next_idx = torch.topk(run_cand, K, dim=1)[1]
            run_scores = torch.gather(run_cand, 1, next_idx)
            seqs = torch.gather(cand_seqs, 1, next_idx[:, :, None].expand(R, K, steps))
            source_beam = torch.gather(cand_beam, 1, next_idx)  # [R, K]
            # Finished hypotheses: stopped candidates among the top K, length-normalised.
            just_done = hits & top_mask[None, :]
            normed = cand_scores / (float(step + 1) ** penalty)[:, None]
            normed = normed - 1e9 * (~just_done).float() - 1e9 * (~open_).float()[:, None]
            merged_scores = torch.cat([fin_scores, normed], 1)
            best = torch.topk(merged_scores, K, dim=1)[1]
            fin_scores = torch.gather(merged_scores, 1, best)
            fin_seqs = torch.gather(torch.cat([fin_seqs, cand_seqs], 1), 1, best[:, :, None].expand(R, K, steps))
            new_len = torch.full((R, keep_k), step + 1, device=dev, dtype=torch.long)
            fin_len = torch.gather(torch.cat([fin_len, new_len], 1), 1, best)
            fin_done = torch.gather(torch.cat([fin_done, just_done], 1), 1, best)
            # Reorder the self caches to follow the surviving beams (cross k/v are equal across beams).
            rows = (source_beam + torch.arange(R, device=dev)[:, None] * K).view(-1)
            cache.follow_beams(rows)  # a gather: beams may be duplicated or dropped
            tokens = seqs[:, :, step].reshape(-1)
            # The reference's early-stop rule: stop once the best running beam, normalised by the
            # current length, cannot beat the worst finished hypothesis.
            best_running = run_scores[:, 0] / (float(step + 1) ** penalty)
            worst = torch.where(fin_done, fin_scores.min(1, keepdim=True)[0], torch.full_like(fin_scores, -1e9))
            open_ = open_ & (best_running[:, None] > worst).any(1)
            if not bool(open_.any()) or bool(hits.all()):
                break
        self.stats.generated_tokens += int(fin_len[:, 0].sum())
        results = []
        for r in range(R):
            length = int(fin_len[r, 0])
            ids = fin_seqs[r, 0, :length].tolist()
            ended = bool(length) and ids[-1] in set(eos[r].tolist())
            results.append(Result(ids, "eos" if ended else "length"))
        return results


def _kind(request: Request) -> int:
    """Requests of one micro-batch share a decoding loop: beam width groups them."""
    return request.params.num_beams


class _Sampler:
    """Chooses next tokens: argmax for greedy rows, hash-noise Gumbel-max for sampled rows."""

    def __init__(self, reqs: list[Request], device):
        self.sampled = torch.tensor([not r.params.greedy for r in reqs], device=device)
        self.any_sampled = bool(self.sampled.any())
        if self.any_sampled:
            self.temperature = torch.tensor([max(r.params.temperature, 1e-6) for r in reqs], device=device)
            self.top_k = torch.tensor([r.params.top_k for r in reqs], device=device)
            self.top_p = torch.tensor([r.params.top_p for r in reqs], device=device)
            self.seed = torch.tensor([_seed32(r) for r in reqs], device=device, dtype=torch.long)

    def choose(self, logits: torch.Tensor, alive: torch.Tensor, step: int) -> torch.Tensor:
        """logits [B, V] of the present rows (alive maps them to requests) -> tokens [B]."""
        tokens = logits.argmax(-1)
        if not self.any_sampled:
            return tokens
        rows = self.sampled[alive].nonzero()[:, 0]
        if rows.numel() == 0:
            return tokens
        req = alive[rows]
        scores = logits[rows] / self.temperature[req, None]
        scores = _filter_top_k_top_p(scores, self.top_k[req], self.top_p[req])
        noise = _gumbel(self.seed[req], step, scores.shape[-1])
        tokens[rows] = (scores + noise).argmax(-1)
        return tokens


def _filter_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside each row's top-k and smallest top-p nucleus."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    vocab = scores.shape[-1]
    rank = torch.arange(vocab, device=scores.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None]
    remove = rank >= k
    probs = torch.softmax(sorted_scores.masked_fill(remove, float("-inf")), dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of strictly better tokens
    remove |= (mass_before >= top_p[:, None]) & (rank > 0)  # the best token always stays
    filtered = sorted_scores.masked_fill(remove, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, filtered)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = (x ^ (x >> 16)) * 0x7FEB352D & _MASK32
    x = (x ^ (x >> 15)) * 0x846CA68B & _MASK32
    return x ^ (x >> 16)


def _gumbel(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, V] that depends only on (seed, step, token id): batch-independent sampling."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.long)[None, :]
    key = _mix32((seeds[:, None] ^ _mix32(torch.tensor(step * 0x9E3779B1 & _MASK32, device=seeds.device))) & _MASK32)
    bits = _mix32((key + token * 0x85EBCA77) & _MASK32)
    uniform = (bits.double() + 0.5) / 2.0**32  # in (0, 1)
    return -torch.log(-torch.log(uniform)).float()


def _seed32(request: Request) -> int:
    seed = request.params.seed
    if seed is None:  # reproducible without a seed: derived from the prompt itself
        digest = hashlib.blake2b(repr(request.input_ids).encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")
    return (seed ^ (seed >> 32)) & _MASK32
