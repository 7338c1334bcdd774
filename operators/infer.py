"""Model stage: prepared rows -> generated token ids (or candidate scores), one model call per batch.

`Infer(source, dtype, device, tasks, ...)` loads the model once (in `__init__`, so once per actor;
with `adapter`, a PEFT LoRA adapter merged into its weights) and on each call turns every task's
prompt ids (and the row's PIXELS, uint8, rescaled and normalized on the model's device by the
generator or scorer) into a `model.Request`, runs all requests of the batch, every generating task
together, through one `Generator.generate` call (which sorts and packs them by a token budget
itself) and writes each task's output ids and finish reason. Classify tasks go to the Scorer
instead (model/score.py), all of them in one `score` call: a row's prompt and its candidates
(prepare's token ids) make one ScoreRequest, and each candidate's score (its summed
log-probability, or per token with score = "mean") is written.
A row whose long text prepare split into pieces (long_input = "chunk") is map-reduced here: its
pieces' prompts go into that same first Generator call, beside the other rows' requests; then, round
by round, each such row's outputs (EOS dropped) are joined into prompts that fit (chunking.Frame,
chunking.group_outputs) and run, every row's joins of a round in one Generator call, until a row's
outputs fit one prompt, whose output is the row's. A failed request of a row fails the row (its kind,
the message saying which piece or round); outputs that can never be joined into one prompt make the
row text_too_long. The row's pieces, rounds and prompt tokens go to finish (TaskColumns.chunking).
Rows that prepare already marked as errors are passed through untouched, and so are the keep
columns. A request the model cannot run becomes that row's error (its kind from the generator or
scorer: out_of_memory, invalid_request); an unexpected exception of a whole call is retried one
request at a time so that only the rows that cause it become "model_error" rows, with the message
kept.
Each call leaves what it did (device, dtype, model seconds, generated tokens, slot-steps, and how it
decoded: compiled or eager, the attention, why compiling failed) as JSON in ENGINE on its first row;
the committer sums these into the done-markers and the run report's `engine` (pipeline/report.py).

Not here: actor pools and GPU reservation (pipeline/build.py), detokenizing (finish.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pyarrow as pa
import torch

from model.generate import GenerationParams, Generator, Request, Result
from model.images import ImageProcessor
from model.score import Scorer, ScoreRequest, ScoreResult
from model.weights import load_pretrained

from . import chunking
from . import columns as C

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferTask:
    """What inference needs to know about one task."""

    output_column: str  # names the task's columns
    params: GenerationParams | None  # how its requests are decoded (None for a classify task)
    uses_image: bool = False  # its requests carry the row's image
    score: str | None = None  # a classify task: "sum" | "mean" of each candidate's token log-probabilities

    def __post_init__(self):
        if (self.params is None) == (self.score is None):
            raise ValueError(f"task {self.output_column}: a generating task has params, a classify task a score mode")

    @property
    def classify(self) -> bool:
        return self.score is not None


class Infer:
    """Runs the model over a batch of prepared rows."""

    def __init__(
        self,
        source: str,
        dtype: str,
        device: str,
        tasks: list[InferTask],
        max_batch_tokens: int | None = None,  # None: the Generator's and Scorer's defaults
        memory_share: float | None = None,  # on CUDA, this process's share of the card (Generator's memory_share)
        storage_options: dict | None = None,
        model=None,
        image_processor: ImageProcessor | None = None,
        keep: tuple[str, ...] = (),
        adapter: str | None = None,
        adapter_storage_options: dict | None = None,
    ):
        """`model` and `image_processor` let a caller pass them ready (tests); otherwise they are loaded
        here from the checkpoint (the processor only when a task reads images: it finishes the uint8
        pixels prepare ships, on the model's device). `keep`: the job's output.keep_columns, whose KEEP
        columns pass through."""
        self.tasks = list(tasks)
        self.keep = tuple(keep)
        self.model = model if model is not None else load_pretrained(
            source, dtype=dtype, device=device, storage_options=storage_options, adapter=adapter,
            adapter_storage_options=adapter_storage_options,
        )
        self.config = self.model.config
        normalizer = None
        if any(t.uses_image for t in self.tasks):
            processor = image_processor or ImageProcessor.from_pretrained(source, storage_options)
            normalizer = processor.normalizer()
        self.generator = Generator(self.model, max_batch_tokens=max_batch_tokens, device=device,
                                   memory_share=memory_share, pixel_normalizer=normalizer)
        self.scorer = Scorer(self.model, max_batch_tokens=max_batch_tokens, device=device,
                             pixel_normalizer=normalizer)
        size = self.config.vision.image_size
        self.pixel_shape = (self.config.vision.num_channels, size, size)
        weights = self.model.embed_tokens.weight
        self.device_name = _device_name(weights.device)
        self.dtype_name = str(weights.dtype).removeprefix("torch.")

    @staticmethod
    def required_columns(tasks: list[InferTask], keep: tuple[str, ...] = ()) -> list[str]:
        """The columns a batch must have: from prepare, per task its prompt ids (classify: and candidates,
        labels) and error columns; the keep columns. (A job with long_input = "chunk" also gives each task's
        chunk prompts and frame: read when present.)"""
        per_task = []
        for t in tasks:
            cols = C.TaskColumns.of(t.output_column)
            per_task += [cols.prompt_ids, cols.error_kind, cols.error_message]
            per_task += [cols.candidates, cols.labels] if t.classify else []
        return ([C.UNIT, C.ROW, C.ID] + [C.keep_column(k) for k in keep] + [C.PIXELS] * any(t.uses_image for t in tasks)
                + per_task)

    def __call__(self, batch: pa.Table) -> pa.Table:
        C.require(batch, self.required_columns(self.tasks, self.keep), "infer")
        n = batch.num_rows
        needs_pixels = any(t.uses_image for t in self.tasks)
        pixels = batch.column(C.PIXELS).to_pylist() if needs_pixels else [None] * n
        images: list[torch.Tensor | None] = [
            None if p is None else torch.from_numpy(C.pixels_from_bytes(p, self.pixel_shape))[None]
            for p in pixels
        ]

        requests: list[Request] = []
        owners: list[tuple[int, int]] = []  # (task index, row) of each request
        scoring: list[ScoreRequest] = []
        scored: list[tuple[int, int]] = []  # (task index, row) of each score request
        kinds, messages = [], []
        for t, task in enumerate(self.tasks):
            cols = C.TaskColumns.of(task.output_column)
            ids_column = batch.column(cols.prompt_ids).to_pylist()
            candidates = batch.column(cols.candidates).to_pylist() if task.classify else None
            kinds.append(batch.column(cols.error_kind).to_pylist())
            messages.append(batch.column(cols.error_message).to_pylist())
            for r, ids in enumerate(ids_column):
                if kinds[t][r] is not None or ids is None:
                    continue
                pixel_values = images[r] if task.uses_image else None
                if task.classify:
                    scoring.append(ScoreRequest(input_ids=ids, candidates=candidates[r], pixel_values=pixel_values))
                    scored.append((t, r))
                else:
                    requests.append(Request(input_ids=ids, pixel_values=pixel_values, params=task.params))
                    owners.append((t, r))

        # Split rows (long_input = "chunk"): every piece's prompt joins the first Generator call.
        split: dict[tuple[int, int], _SplitRow] = {}
        first_round = len(requests)
        for t, task in enumerate(self.tasks):
            cols = C.TaskColumns.of(task.output_column)
            if task.classify or cols.chunk_prompts not in batch.column_names:
                continue
            frames = batch.column(cols.chunk_frame).to_pylist()
            for r, prompts in enumerate(batch.column(cols.chunk_prompts).to_pylist()):
                if kinds[t][r] is not None or prompts is None:
                    continue
                split[(t, r)] = row = _SplitRow(chunking.Frame.from_row(frames[r]), chunks=len(prompts))
                for prompt in prompts:
                    row.input_tokens += len(prompt)
                    requests.append(Request(input_ids=prompt, params=task.params))
                    owners.append((t, r))

        before = self._counters()
        results = self._generate(requests)
        scores = self._score(scoring)
        if split:
            self._map_reduce(split, owners[first_round:], results[first_round:])
            owners, results = owners[:first_round], results[:first_round]
        engine = self.engine_record(before)  # the joining rounds included

        output_ids = [[None] * n for _ in self.tasks]
        finish = [[None] * n for _ in self.tasks]
        candidate_scores = [[None] * n for _ in self.tasks]
        for (t, r), result in zip(owners, results):
            if result.finish_reason == "error":
                kinds[t][r] = result.error_kind or "model_error"
                messages[t][r] = result.error or "generation failed"
            elif self.tasks[t].params.num_return_sequences > 1:  # n sequences: lists, best or sample 0 first
                output_ids[t][r] = [ids for ids, _ in result.sequences or [(result.token_ids, result.finish_reason)]]
                finish[t][r] = [reason for _, reason in result.sequences or [(result.token_ids, result.finish_reason)]]
            else:
                output_ids[t][r] = result.token_ids
                finish[t][r] = result.finish_reason
        chunk_rows = [[None] * n for _ in self.tasks]
        for (t, r), row in split.items():
            if row.error is not None:
                kinds[t][r], messages[t][r] = row.error
            else:
                output_ids[t][r], finish[t][r] = row.result.token_ids, row.result.finish_reason
                chunk_rows[t][r] = {"chunks": row.chunks, "depth": row.depth, "input_tokens": row.input_tokens}
        for (t, r), result in zip(scored, scores):
            if result.error is not None:
                kinds[t][r] = result.error_kind or "model_error"
                messages[t][r] = result.error
            else:
                candidate_scores[t][r] = result.scores(self.tasks[t].score)

        out = C.row_columns(batch)  # PIXELS end here
        for name in self.keep:
            out[C.keep_column(name)] = batch.column(C.keep_column(name))
        for t, task in enumerate(self.tasks):
            cols = C.TaskColumns.of(task.output_column)
            out[cols.prompt_ids] = batch.column(cols.prompt_ids)
            if task.classify:
                out[cols.labels] = batch.column(cols.labels)
                out[cols.candidate_scores] = pa.array(candidate_scores[t], type=pa.list_(pa.float64()))
            else:
                many = task.params.num_return_sequences > 1
                ids_type, reason_type = pa.list_(pa.int32()), pa.string()
                out[cols.output_ids] = pa.array(output_ids[t], type=pa.list_(ids_type) if many else ids_type)
                out[cols.finish_reason] = pa.array(finish[t], type=pa.list_(reason_type) if many else reason_type)
                if cols.chunk_prompts in batch.column_names:
                    out[cols.chunking] = pa.array(chunk_rows[t], type=C.CHUNKING_TYPE)
            out[cols.error_kind] = pa.array(kinds[t], type=pa.string())
            out[cols.error_message] = pa.array(messages[t], type=pa.string())
        out[C.ENGINE] = pa.array([json.dumps(engine)] + [None] * (n - 1) if n else [], type=pa.string())
        return pa.table(out)

    def _counters(self) -> dict[str, float]:
        g, s = self.generator.stats, self.scorer.stats
        return {"seconds": g.seconds + s.seconds, "generated_tokens": g.generated_tokens,
                "slot_steps": g.slot_steps, "slot_tokens": g.slot_tokens, "oom_splits": g.oom_splits + s.oom_splits}

    def engine_record(self, before: dict[str, float]) -> dict:
        """What this call did since the counters `before` (C.ENGINE; summed by pipeline/report.engine_totals):
        where the model ran, its seconds, generated tokens and slot-steps, and how it decoded: "compiled" or
        "eager" with the attention used and why compiling failed, when it did (only for calls that decoded)."""
        now = self._counters()
        record = {"device": self.device_name, "dtype": self.dtype_name,
                  **{key: now[key] - before[key] for key in now}}
        stats = self.generator.stats
        if record["generated_tokens"] > 0:
            record["decode"] = "compiled" if stats.compiled else "eager"
            record["attention"] = stats.attention
            record["compile_fallback"] = stats.compile_fallback
        record["seconds"] = round(record["seconds"], 6)
        return record

    def _map_reduce(self, split: dict, owners: list[tuple[int, int]], results: list[Result]) -> None:
        """The split rows from their pieces' results to their final output, round by round (see the
        module docstring); each round's joins of every row in one Generator call."""
        for key, result in zip(owners, results):
            split[key].take(result, self._eos(key[0]))
        active = list(split)
        while active:
            requests, owners = [], []
            for key in active:
                row = split[key]
                if row.error is not None:
                    continue
                groups = chunking.group_outputs(row.outputs, row.frame)
                if groups is None:
                    longest = max(len(o) for o in row.outputs)
                    row.error = ("text_too_long", f"the outputs of the text's {len(row.outputs)} parts (up to "
                                                  f"{longest} tokens each) cannot be joined into prompts of at most "
                                                  f"input.max_input_tokens = {row.frame.limit} tokens with the prompt "
                                                  f"template; raise max_input_tokens or lower max_new_tokens")
                    continue
                prompts = [row.frame.wrap([row.outputs[i] for i in group]) for group in groups]
                row.start_round(len(prompts))
                for prompt in prompts:
                    row.input_tokens += len(prompt)
                    requests.append(Request(input_ids=prompt, params=self.tasks[key[0]].params))
                    owners.append(key)
            for key, result in zip(owners, self._generate(requests)):
                split[key].take(result, self._eos(key[0]))
            active = [key for key in dict.fromkeys(owners) if split[key].result is None and split[key].error is None]

    def _eos(self, t: int) -> tuple[int, ...]:
        return self.tasks[t].params.eos_token_ids or self.config.eos_token_ids

    def _generate(self, requests: list[Request]) -> list[Result]:
        return _isolating("generate", self.generator.generate, requests,
                          lambda message: Result([], "error", message, "model_error"))

    def _score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        return _isolating("score", self.scorer.score, requests,
                          lambda message: ScoreResult([], [], message, "model_error"))


def _device_name(device: torch.device) -> str:
    """"cpu", or "cuda" with the card's name ("cuda NVIDIA H200"): what a run report groups calls by."""
    if device.type != "cuda":
        return device.type
    return f"cuda {torch.cuda.get_device_name(device)}"


class _SplitRow:
    """One split row's map-reduce state in Infer._map_reduce."""

    def __init__(self, frame: chunking.Frame, chunks: int):
        self.frame = frame  # the prompt around {text}, and its limit
        self.chunks = chunks  # pieces of the text (the first round's requests)
        self.depth = 0  # rounds of joining started
        self.input_tokens = 0  # prompt tokens of every request so far (updated as each is made)
        self.expected = chunks  # requests of the current round
        self.outputs: list[list[int]] = []  # the current round's outputs so far, EOS dropped
        self.result: Result | None = None  # the final output (set by the round that had one request)
        self.error: tuple[str, str] | None = None  # (kind, message) once a request failed

    def start_round(self, requests: int) -> None:
        self.depth += 1
        self.expected = requests
        self.outputs = []

    def take(self, result: Result, eos: tuple[int, ...]) -> None:
        """One result of the current round, in request order."""
        if self.error is not None:
            return
        if result.finish_reason == "error":
            where = (f"piece {len(self.outputs) + 1} of {self.chunks}" if self.depth == 0 else
                     f"join {len(self.outputs) + 1} of {self.expected} in round {self.depth}")
            self.error = (result.error_kind or "model_error", f"{where}: {result.error or 'generation failed'}")
            return
        ids = list(result.token_ids)
        if result.finish_reason == "eos" and ids and ids[-1] in eos:
            ids = ids[:-1]
        self.outputs.append(ids)
        if self.depth > 0 and self.expected == 1:
            self.result = result


def _isolating(what: str, run, requests: list, failed) -> list:
    """run(requests); when the whole call raises (a bug or a device fault), one request at a time, so
    that only the requests that cause it fail: failed(message) is their result."""
    if not requests:
        return []
    try:
        return run(requests)
    except Exception as exc:
        log.warning("%s failed for a batch of %d requests (%s: %s); retrying one by one",
                    what, len(requests), type(exc).__name__, exc)
    results = []
    for request in requests:
        try:
            results.extend(run([request]))
        except Exception as exc:
            results.append(failed(f"{type(exc).__name__}: {exc}"))
    return results
