"""Scoring: how likely the decoder finds each of a prompt's candidate continuations (classification).

`Scorer(model).score(requests)` takes ScoreRequests, each a prompt (token ids with image placeholders
expanded, and its images) and candidates (token ids each, e.g. the labels of a classification), and
returns per candidate the log-likelihood of its tokens followed by EOS given the prompt, summed, and
how many tokens that is (so a caller can length-normalise: ScoreResult.scores("mean")). This is the
reference's teacher-forced forward: decoder input [bos, t1 .. tn], targets [t1 .. tn, eos].

1. Each request is checked (a malformed one becomes its error result, kind "invalid_request").
2. Requests are sorted by encoder length and packed into micro-batches under three bounds: padded
   encoder tokens (rows x longest prompt) and padded decoder tokens (rows x most candidates x longest
   candidate + 1) each within `max_batch_tokens`, and the attention scores of the decoder pass
   within `max_score_elements`. A request whose candidates alone exceed them is a micro-batch of
   its own whose candidates go through the decoder in chunks, all against its one encoder output.
3. Per micro-batch the encoder runs once per request, and each decoder layer computes the
   requests' cross keys/values once, [R, Hkv, S, D]. Every candidate is a row of one teacher-forced
   decoder pass [R x N candidates, T]; the rows of a request share its cross keys/values, which
   are never copied per candidate. The reference's merged attention (one softmax over [own keys ;
   encoder keys]) is computed in its two parts: the self part per candidate row, causal (the
   decoder's sliding window limits it, as in the reference), and the cross part with a request's
   candidates folded into the query axis, [R, Hkv, N x G x T, D] against the request's own
   [R, Hkv, S, D] keys, a plain batched matmul over the tensors the projection made. The two are
   joined exactly in one softmax: a shared running maximum, exponentials, one denominator.
4. The LM head runs only at the positions that are scored (each candidate's tokens and EOS), in
   chunks of at most `max_logit_elements` logits, log-softmax in float32 (soft-capped logits when
   the config says so, as the reference computes them).
5. A micro-batch out of device memory is split in half and retried, down to one request, whose
   candidates are then halved per decoder pass down to one; a candidate that still does not fit
   makes its request an "out_of_memory" error result instead of a crash.

Everything runs under torch.inference_mode.

Not here: tokenizing labels or prompts (tokenizer.py), softmax over a row's candidates and the
chosen label (operators/finish.py), generation (generate.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .generate import DEFAULT_BATCH_TOKENS
from .layers import decoder_self_masks
from .t5gemma2 import Block, T5Gemma2, prompt_problem

SCORE_MODES = ("sum", "mean")  # how a candidate's token log-probabilities make its score


@dataclass
class ScoreRequest:
    """One prompt and the continuations to score after it."""

    input_ids: list[int]  # prompt ids, image placeholders already expanded
    candidates: list[list[int]]  # token ids of each candidate, without EOS (the scorer appends it)
    # [N, 3, S, S] for the N images of the prompt, or None: float pixel values, or uint8 before rescale and
    # normalize (the Scorer's pixel_normalizer finishes them on its device, as the Generator's does)
    pixel_values: torch.Tensor | None = None


@dataclass
class ScoreResult:
    sums: list[float]  # per candidate: sum of log-probabilities of its tokens and the EOS after them
    lengths: list[int]  # per candidate: tokens scored (its tokens + 1 for EOS)
    error: str | None = None  # what went wrong (then sums and lengths are empty)
    error_kind: str | None = None  # "invalid_request" | "out_of_memory"

    def scores(self, mode: str) -> list[float]:
        """Per candidate: "sum" = the log-likelihood, "mean" = per scored token (length-normalised)."""
        if mode not in SCORE_MODES:
            raise ValueError(f"score mode must be one of {SCORE_MODES}, got {mode!r}")
        if mode == "sum":
            return list(self.sums)
        return [s / n for s, n in zip(self.sums, self.lengths)]


@dataclass
class ScorerStats:
    """Counters over the scorer's lifetime."""

    requests: int = 0
    candidates: int = 0
    micro_batches: int = 0  # encoder calls
    decoder_passes: int = 0  # teacher-forced decoder calls (more than micro_batches when candidates are chunked)
    oom_splits: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ScoreBatch:
    """One planned micro-batch: requests sharing an encoder call, and how many candidates per pass."""

    requests: tuple[int, ...]  # indices into score()'s requests, in encoder-length order
    chunk: int | None = None  # candidates per decoder pass (one request only); None = all in one pass


@dataclass
class _Accumulated:
    """What the passes of one request produced so far."""

    sums: list[float | None] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (kind, message)


class Scorer:
    """Batched, teacher-forced scoring of candidate continuations for a T5Gemma2 model."""

    def __init__(
        self,
        model: T5Gemma2,
        max_batch_tokens: int | None = None,
        max_batch_size: int = 256,
        device: str | torch.device | None = None,
        max_score_elements: int = 1 << 27,
        max_logit_elements: int = 1 << 25,
        pixel_normalizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """max_batch_tokens bounds padded encoder tokens and padded decoder tokens of a micro-batch;
        max_score_elements its decoder attention scores (rows x heads x T x (T + S)); max_logit_elements
        the LM-head logits computed at once (positions x vocabulary); pixel_normalizer: uint8 [N, 3, S, S]
        -> float pixel values on the device (ImageProcessor.normalizer()), for requests whose
        pixel_values are uint8. max_batch_tokens None: DEFAULT_BATCH_TOKENS, as the Generator's."""
        max_batch_tokens = DEFAULT_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
        if min(max_batch_tokens, max_batch_size, max_score_elements, max_logit_elements) < 1:
            raise ValueError("max_batch_tokens, max_batch_size, max_score_elements and max_logit_elements must be >= 1")
        self.model = model
        self.config = model.config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_score_elements = max_score_elements
        self.max_logit_elements = max_logit_elements
        self.pixel_normalizer = pixel_normalizer
        self.stats = ScorerStats()

    # ---- checks and planning -------------------------------------------------------------------

    def _check(self, request: ScoreRequest) -> str | None:
        """Why a request cannot be scored, or None."""
        cfg = self.config
        problem = prompt_problem(cfg, request.input_ids, request.pixel_values)
        if problem is not None:
            return problem
        if not request.candidates:
            return "no candidates to score"
        for n, cand in enumerate(request.candidates):
            if not cand:
                return f"candidate {n} has no tokens"
            if min(cand) < 0 or max(cand) >= cfg.vocab_size:
                return f"candidate {n} has a token id out of range [0, {cfg.vocab_size})"
        if request.pixel_values is not None and request.pixel_values.dtype == torch.uint8 \
                and self.pixel_normalizer is None:
            return "uint8 pixel_values need a Scorer built with pixel_normalizer (ImageProcessor.normalizer())"
        return None

    def _fits(self, rows: int, width: int, candidates: int, steps: int, encoder: bool = True) -> bool:
        """Whether a micro-batch of `rows` requests (longest prompt `width`), each padded to `candidates`
        candidates of `steps` decoder tokens, is within the bounds (`encoder`: its encoder bounds too;
        a single request's encoder runs whatever its length, as the Generator's does)."""
        heads = self.config.decoder.num_heads
        return ((not encoder or (rows <= self.max_batch_size and rows * width <= self.max_batch_tokens))
                and rows * candidates * steps <= self.max_batch_tokens
                and rows * candidates * heads * steps * (steps + width) <= self.max_score_elements)

    def plan(self, requests: list[ScoreRequest], order: list[int]) -> list[ScoreBatch]:
        """Pack request indices (sorted by encoder length) into micro-batches within the bounds."""
        batches: list[ScoreBatch] = []
        current: list[int] = []
        width = most = steps = 0
        for i in order:
            req = requests[i]
            w, n, t = len(req.input_ids), len(req.candidates), 1 + max(len(c) for c in req.candidates)
            if not self._fits(1, w, n, t, encoder=False):  # its candidates alone are too many: chunks of them
                if current:
                    batches.append(ScoreBatch(tuple(current)))
                    current, width, most, steps = [], 0, 0, 0
                chunk = n
                while chunk > 1 and not self._fits(1, w, chunk, t, encoder=False):
                    chunk = (chunk + 1) // 2
                batches.append(ScoreBatch((i,), chunk))
                continue
            grown = (max(width, w), max(most, n), max(steps, t))
            if current and not self._fits(len(current) + 1, *grown):
                batches.append(ScoreBatch(tuple(current)))
                current, grown = [], (w, n, t)
            current.append(i)
            width, most, steps = grown
        if current:
            batches.append(ScoreBatch(tuple(current)))
        return batches

    # ---- scoring -------------------------------------------------------------------------------

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Results in the order of `requests`."""
        start = time.perf_counter()
        done = [_Accumulated() for _ in requests]
        runnable = []
        for i, req in enumerate(requests):
            problem = self._check(req)
            if problem:
                done[i].error = ("invalid_request", problem)
            else:
                done[i].sums = [None] * len(req.candidates)
                runnable.append(i)
        runnable.sort(key=lambda i: len(requests[i].input_ids))
        with torch.inference_mode():
            for batch in self.plan(requests, runnable):
                self._run_splitting(requests, batch, done)
        results = []
        for req, acc in zip(requests, done):
            if acc.error is not None:
                results.append(ScoreResult([], [], acc.error[1], acc.error[0]))
            else:
                assert all(s is not None for s in acc.sums), "a candidate was never scored"
                results.append(ScoreResult(list(acc.sums), [len(c) + 1 for c in req.candidates]))
        self.stats.requests += len(requests)
        self.stats.candidates += sum(len(r.candidates) for r in requests)
        self.stats.seconds += time.perf_counter() - start
        return results

    def _run_splitting(self, requests: list[ScoreRequest], batch: ScoreBatch, done: list[_Accumulated]) -> None:
        try:
            self._run(requests, batch, done)
            return
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            error = exc
        if len(batch.requests) > 1:
            self.stats.oom_splits += 1
            half = len(batch.requests) // 2
            self._run_splitting(requests, ScoreBatch(batch.requests[:half]), done)
            self._run_splitting(requests, ScoreBatch(batch.requests[half:]), done)
            return
        (i,) = batch.requests
        chunk = batch.chunk or len(requests[i].candidates)
        if chunk > 1:
            self.stats.oom_splits += 1
            self._run_splitting(requests, ScoreBatch(batch.requests, (chunk + 1) // 2), done)
            return
        done[i].error = ("out_of_memory", f"out of device memory even alone, one candidate per pass: {error}")

    def _run(self, requests: list[ScoreRequest], batch: ScoreBatch, done: list[_Accumulated]) -> None:
        """One micro-batch: the encoder once, then the decoder over every candidate (in chunks for a
        single request with `chunk` set)."""
        reqs = [requests[i] for i in batch.requests]
        memory, mask = self._encode(reqs)
        if batch.chunk is None:
            ranges = [(0, len(r.candidates)) for r in reqs]
            sums = self._decode(reqs, ranges, memory, mask)
            for i, row in zip(batch.requests, sums):
                done[i].sums = row
            return
        (i,), (req,) = batch.requests, reqs
        for first in range(0, len(req.candidates), batch.chunk):
            end = min(first + batch.chunk, len(req.candidates))
            (row,) = self._decode(reqs, [(first, end)], memory, mask)
            done[i].sums[first:end] = row

    def _encode(self, reqs: list[ScoreRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder once per request -> memory [R, S, H] and its padding mask [R, S]."""
        cfg = self.config
        longest = max(len(r.input_ids) for r in reqs)
        ids = torch.full((len(reqs), longest), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), longest), dtype=torch.bool)
        for row, req in enumerate(reqs):
            ids[row, : len(req.input_ids)] = torch.tensor(req.input_ids)
            mask[row, : len(req.input_ids)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = [r.pixel_values.to(self.device) for r in reqs if r.pixel_values is not None]
        # uint8 images travel as such and are rescaled and normalized on the device; float ones as given.
        images = [self.pixel_normalizer(i) if i.dtype == torch.uint8 else i for i in images]
        pixels = torch.cat(images).to(self.model.embed_tokens.weight.dtype) if images else None
        self.stats.micro_batches += 1
        return self.model.encode(ids, mask, pixel_values=pixels), mask

    def _decode(self, reqs: list[ScoreRequest], ranges: list[tuple[int, int]], memory: torch.Tensor,
                mask: torch.Tensor) -> list[list[float]]:
        """Candidates reqs[r].candidates[a:b] for each (a, b) of `ranges`, teacher-forced against
        memory [R, S, H] -> per request, each candidate's summed log-probability (tokens + EOS)."""
        cfg, dev = self.config, self.device
        rows = len(reqs)
        most = max(b - a for a, b in ranges)  # N: candidates per request, padded
        steps = 1 + max(len(c) for req, (a, b) in zip(reqs, ranges) for c in req.candidates[a:b])  # T
        inputs = torch.full((rows, most, steps), cfg.pad_token_id, dtype=torch.long)
        targets = torch.full((rows, most, steps), cfg.pad_token_id, dtype=torch.long)
        scored = torch.zeros((rows, most, steps), dtype=torch.bool)
        for r, (req, (a, b)) in enumerate(zip(reqs, ranges)):
            for j, cand in enumerate(req.candidates[a:b]):
                n = len(cand)
                inputs[r, j, 0] = cfg.bos_token_id
                inputs[r, j, 1 : n + 1] = torch.tensor(cand)
                targets[r, j, :n] = torch.tensor(cand)
                targets[r, j, n] = cfg.eos_token_ids[0]
                scored[r, j, : n + 1] = True
        inputs, targets, scored = inputs.to(dev), targets.to(dev), scored.to(dev)

        x = self.model.embed_tokens(inputs.view(rows * most, steps))  # [C, T, H], C = R x N
        positions = torch.arange(steps, device=dev)[None]  # [1, T]: every candidate starts at 0
        angles = self.model.decoder.angles(positions, x.dtype)  # cos, sin [1, T, 1, D] per layer type
        self_bias = {kind: _additive(allowed[0]) for kind, allowed in  # [T, T] per layer type
                     decoder_self_masks(positions, positions, cfg.decoder.sliding_window).items()}
        cross_bias = _additive(mask)[:, None, None, :]  # [R, 1, 1, S]
        for layer, (keys, values) in zip(self.model.decoder.layers, self.model.cross_kv(memory, mask.bool())):
            cos, sin = angles[layer.layer_type]
            x = _score_block(layer, x, cos, sin, self_bias[layer.layer_type], keys, values, cross_bias, rows)
        hidden = self.model.decoder.norm(x)  # [C, T, H]
        self.stats.decoder_passes += 1

        flat = scored.view(-1)
        states = hidden.reshape(-1, hidden.shape[-1])[flat]  # [P, H]: only the scored positions
        wanted = targets.view(-1)[flat]  # [P]
        owner = torch.arange(rows * most, device=dev).repeat_interleave(steps)[flat]  # [P]: candidate row
        logprobs = torch.empty(states.shape[0], dtype=torch.float32, device=dev)
        chunk = max(1, self.max_logit_elements // cfg.vocab_size)
        for a in range(0, states.shape[0], chunk):
            logits = self.model.lm_logits(states[a : a + chunk])  # [p, V], soft-capped as the reference
            logprobs[a : a + chunk] = torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(
                1, wanted[a : a + chunk, None])[:, 0]
        sums = torch.zeros(rows * most, dtype=torch.float64, device=dev).index_add_(0, owner, logprobs.double())
        table = sums.view(rows, most).tolist()  # one device read per pass
        return [table[r][: b - a] for r, (a, b) in enumerate(ranges)]


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """Bool mask (True = may attend) -> float32 additive mask (0 / -inf)."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, -math.inf)


def _score_block(layer: Block, x: torch.Tensor, cos, sin, self_bias: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, cross_bias: torch.Tensor, rows: int) -> torch.Tensor:
    """One decoder block over every candidate row. x [C, T, H] with C = R x N (a request's N candidate
    rows consecutive); self_bias [T, T]; keys, values [R, Hkv, S, D] (the requests' cross keys/values,
    one per request); cross_bias [R, 1, 1, S] -> [C, T, H]."""
    attn = layer.self_attn
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    group = heads // kv_heads  # G: query heads per kv head (query head h reads kv head h // G)
    cands, steps, _ = x.shape
    most = cands // rows
    qk, v = attn.qkv(layer.pre_self_attn_layernorm(x), cos, sin)  # [C, T, Hq + Hkv, D], [C, T, Hkv, D]
    # Query heads of one kv head side by side on the query axis: [C, Hkv, G x T, D].
    q = qk[:, :, :heads].reshape(cands, steps, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(cands, kv_heads, group * steps, dim)
    own_k = qk[:, :, heads:].transpose(1, 2)  # [C, Hkv, T, D]
    own_v = v.transpose(1, 2)

    # Self part, per candidate row: [C, Hkv, G x T, T].
    own = torch.matmul(q, own_k.transpose(-1, -2)).float().mul_(attn.scale)
    own = own.view(cands, kv_heads, group, steps, steps).add_(self_bias).view(cands, kv_heads, group * steps, steps)
    # Cross part: a request's candidates are more queries against its own keys, [R, Hkv, N x G x T, S].
    cross = cross_attention_scores(q.view(rows, most, kv_heads, group * steps, dim), keys, attn.scale)
    cross = cross.add_(cross_bias)

    # One softmax over [own keys ; encoder keys]: shared maximum, one denominator.
    width = group * steps
    top = torch.maximum(own.amax(-1).view(rows, most, kv_heads, width),
                        cross.amax(-1).view(rows, kv_heads, most, width).transpose(1, 2))  # [R, N, Hkv, G x T]
    own = own.sub_(top.reshape(cands, kv_heads, width)[..., None]).exp_()
    cross = cross.sub_(top.transpose(1, 2).reshape(rows, kv_heads, most * width)[..., None]).exp_()
    total = (own.sum(-1).view(rows, most, kv_heads, width)
             + cross.sum(-1).view(rows, kv_heads, most, width).transpose(1, 2))  # [R, N, Hkv, G x T]
    out = torch.matmul(own.to(own_v.dtype), own_v).float().view(rows, most, kv_heads, width, dim)
    out += torch.matmul(cross.to(values.dtype), values).float().view(rows, kv_heads, most, width, dim).transpose(1, 2)
    out /= total[..., None]
    # [R, N, Hkv, G, T, D] -> [C, T, Hq x D], query head h = kv head x G + g.
    out = out.to(x.dtype).view(cands, kv_heads, group, steps, dim).permute(0, 3, 1, 2, 4).reshape(cands, steps, -1)
    x = layer.post_self_attn_layernorm(attn.o_proj(out)).add_(x)
    return layer.feed_forward(x)


def cross_attention_scores(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled scores of every candidate's queries against its request's encoder keys.

    q [R, N, Hkv, W, D] (W = G x T query rows per kv head); keys [R, Hkv, S, D] -> float32 [R, Hkv, N x W, S].
    The candidates are folded into the query axis, so the matmul reads each request's keys as the
    projection left them: one [S, D] block per request and kv head, whatever N is.
    """
    rows, most, kv_heads, width, dim = q.shape
    folded = q.transpose(1, 2).reshape(rows, kv_heads, most * width, dim)  # [R, Hkv, N x W, D]
    return torch.matmul(folded, keys.transpose(-1, -2)).float().mul_(scale)
