"""Model stage: prepared rows -> generated token ids, one Generator call per batch.

`Infer(source, dtype, device, tasks, ...)` loads the model once (in `__init__`, so once per actor;
with `adapter`, a PEFT LoRA adapter merged into its weights) and on each call turns every task's
prompt ids (and the row's PIXELS, uint8, rescaled and normalized on the model's device by the
generator) into a `model.Request`, runs
all requests of the batch, every task together, through one `Generator.generate` call (which
sorts and packs them by a token budget itself) and writes each task's output ids and finish
reason. Rows that prepare already marked as errors are passed through untouched. A request the
generator cannot run becomes that row's error (its kind from the generator: out_of_memory,
invalid_request); an unexpected exception of a whole call is retried one request at a time so
that only the rows that cause it become "model_error" rows, with the message kept.

Not here: actor pools and GPU reservation (pipeline/build.py), detokenizing (finish.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import torch

from model.generate import GenerationParams, Generator, Request, Result
from model.images import ImageProcessor
from model.weights import load_pretrained

from . import columns as C

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferTask:
    """What inference needs to know about one task."""

    output_column: str  # names the task's columns
    params: GenerationParams  # how its requests are decoded
    uses_image: bool = False  # its requests carry the row's image


class Infer:
    """Runs the model over a batch of prepared rows."""

    def __init__(
        self,
        source: str,
        dtype: str,
        device: str,
        tasks: list[InferTask],
        max_batch_tokens: int = 65536,
        storage_options: dict | None = None,
        model=None,
        image_processor: ImageProcessor | None = None,
        adapter: str | None = None,
        adapter_storage_options: dict | None = None,
    ):
        """`model` and `image_processor` let a caller pass them ready (tests); otherwise they are loaded
        here from the checkpoint (the processor only when a task reads images: it finishes the uint8
        pixels prepare ships, on the model's device)."""
        self.tasks = list(tasks)
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
                                   pixel_normalizer=normalizer)
        size = self.config.vision.image_size
        self.pixel_shape = (self.config.vision.num_channels, size, size)

    @staticmethod
    def required_columns(tasks: list[InferTask]) -> list[str]:
        """The columns a batch must have: from prepare, per task its prompt ids and error columns."""
        per_task = [name for t in tasks for name in (C.TaskColumns.of(t.output_column).prompt_ids,
                                                     C.TaskColumns.of(t.output_column).error_kind,
                                                     C.TaskColumns.of(t.output_column).error_message)]
        return [C.UNIT, C.ROW, C.ID] + [C.PIXELS] * any(t.uses_image for t in tasks) + per_task

    def __call__(self, batch: pa.Table) -> pa.Table:
        C.require(batch, self.required_columns(self.tasks), "infer")
        n = batch.num_rows
        needs_pixels = any(t.uses_image for t in self.tasks)
        pixels = batch.column(C.PIXELS).to_pylist() if needs_pixels else [None] * n
        images: list[torch.Tensor | None] = [
            None if p is None else torch.from_numpy(C.pixels_from_bytes(p, self.pixel_shape))[None]
            for p in pixels
        ]

        requests: list[Request] = []
        owners: list[tuple[int, int]] = []  # (task index, row) of each request
        prompt_ids = []
        kinds, messages = [], []
        for t, task in enumerate(self.tasks):
            cols = C.TaskColumns.of(task.output_column)
            ids_column = batch.column(cols.prompt_ids).to_pylist()
            prompt_ids.append(ids_column)
            kinds.append(batch.column(cols.error_kind).to_pylist())
            messages.append(batch.column(cols.error_message).to_pylist())
            for r, ids in enumerate(ids_column):
                if kinds[t][r] is not None or ids is None:
                    continue
                requests.append(Request(input_ids=ids, pixel_values=images[r] if task.uses_image else None,
                                        params=task.params))
                owners.append((t, r))

        results = self._generate(requests)

        output_ids = [[None] * n for _ in self.tasks]
        finish = [[None] * n for _ in self.tasks]
        for (t, r), result in zip(owners, results):
            if result.finish_reason == "error":
                kinds[t][r] = result.error_kind or "model_error"
                messages[t][r] = result.error or "generation failed"
            else:
                output_ids[t][r] = result.token_ids
                finish[t][r] = result.finish_reason

        out = {name: batch.column(name) for name in (C.UNIT, C.ROW, C.ID)}  # PIXELS end here
        for t, task in enumerate(self.tasks):
            cols = C.TaskColumns.of(task.output_column)
            out[cols.prompt_ids] = batch.column(cols.prompt_ids)
            out[cols.output_ids] = pa.array(output_ids[t], type=pa.list_(pa.int32()))
            out[cols.finish_reason] = pa.array(finish[t], type=pa.string())
            out[cols.error_kind] = pa.array(kinds[t], type=pa.string())
            out[cols.error_message] = pa.array(messages[t], type=pa.string())
        return pa.table(out)

    def _generate(self, requests: list[Request]) -> list[Result]:
        if not requests:
            return []
        try:
            return self.generator.generate(requests)
        except Exception as exc:  # a bug or a device fault: find the rows that cause it
            log.warning("generate failed for a batch of %d requests (%s: %s); retrying one by one",
                        len(requests), type(exc).__name__, exc)
        results = []
        for request in requests:
            try:
                results.extend(self.generator.generate([request]))
            except Exception as exc:
                results.append(Result([], "error", f"{type(exc).__name__}: {exc}", "model_error"))
        return results
