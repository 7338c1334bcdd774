"""The Ray Data plan of a job: units -> read -> prepare -> infer -> finish, as one Dataset.

    from_items(units)            one block per unit of work still to do
    .map_batches(read)           CPU task: the unit's rows from its Parquet file (needed columns only)
    .map_batches(prepare)        CPU task: prompts, tokens, decoded images, per-row errors
    .map_batches(Infer)          actor pool (GPUs, or CPU when gpus_per_actor = 0): the model,
                                 loaded once per actor; rows_per_call rows per call
    .map_batches(finish)         CPU task: text, token counts, provenance

Ray Data streams blocks through these stages concurrently, with its own backpressure between the
CPU tasks and the actor pool. The plan ends in the driver (`iter_batches`), where run.py commits
each unit once all its rows are back (see storage.py for why the commit is not a Ray sink).

CPU stages are plain functions; their heavy objects (tokenizer, image processor) are built once
per worker process and cached by their settings, so tasks stay cheap and nothing large travels
with each task.

Not here: validation and the commit loop (run.py), model internals (model/).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow as pa
import ray
import ray.data

from operators.finish import Finish
from operators.infer import Infer, InferTask
from operators.prepare import Prepare, PromptTask

from .storage import Unit, read_unit


@dataclass(frozen=True)
class ReadSettings:
    columns: dict  # "id" / "text" / "image" -> input column name or None
    storage_options: dict  # fsspec options for the input files
    block_rows: int  # rows per block handed downstream


@dataclass(frozen=True)
class PrepareSettings:
    source: str  # checkpoint (for tokenizer.model and preprocessor_config.json)
    storage_options: dict  # fsspec options for the checkpoint
    tasks: tuple  # PromptTask per task
    max_input_tokens: int
    long_input: str
    image_size: int | None  # vision input side, used when the checkpoint has no preprocessor_config.json


@dataclass(frozen=True)
class FinishSettings:
    source: str
    storage_options: dict
    output_columns: tuple
    provenance: dict = field(default_factory=dict)


_CACHE: dict[str, object] = {}


def _cache_key(settings) -> str:
    return type(settings).__name__ + hashlib.sha256(
        json.dumps(asdict(settings), sort_keys=True, default=repr).encode()).hexdigest()


def build_prepare(s: PrepareSettings) -> Prepare:
    from model.images import PREPROCESSOR_FILE, ImageProcessor
    from model.source import CheckpointSource
    from model.tokenizer import Tokenizer

    src = CheckpointSource.open(s.source, s.storage_options)
    tokenizer = Tokenizer.from_pretrained(src)
    processor = None
    if any(t.uses_image for t in s.tasks):
        overrides = {}
        if not src.exists(PREPROCESSOR_FILE) and s.image_size:
            overrides = {"height": s.image_size, "width": s.image_size}
        processor = ImageProcessor.from_pretrained(src, **overrides)
    return Prepare(tokenizer, processor, list(s.tasks), s.max_input_tokens, s.long_input)


def build_finish(s: FinishSettings) -> Finish:
    from model.tokenizer import Tokenizer

    return Finish(Tokenizer.from_pretrained(s.source, s.storage_options), list(s.output_columns), s.provenance)


def _cached(settings, factory):
    key = _cache_key(settings)
    if key not in _CACHE:
        _CACHE[key] = factory(settings)
    return _CACHE[key]


def read_stage(batch: pa.Table, *, settings: ReadSettings) -> Iterator[pa.Table]:
    for unit in batch.to_pylist():
        yield from read_unit(unit, settings.columns, settings.storage_options, settings.block_rows)


def prepare_stage(batch: pa.Table, *, settings: PrepareSettings) -> pa.Table:
    return _cached(settings, build_prepare)(batch)


def finish_stage(batch: pa.Table, *, settings: FinishSettings) -> pa.Table:
    return _cached(settings, build_finish)(batch)


# Fault hook for tests, never set in production: when the environment of the Ray workers has
# T5G2_FAULT_ACTOR_EXIT_FILE=PATH and that file exists, the first model actor to delete it dies
# abruptly (os._exit) at the start of a call, as a crashed GPU process would. Ray restarts the
# actor and retries the call; the committer must still write every row exactly once.
ACTOR_FAULT_ENV = "T5G2_FAULT_ACTOR_EXIT_FILE"


class InferActor(Infer):
    """Infer as a Ray Data callable class: one model per actor, on the actor's GPU or its CPU."""

    def __init__(self, *, source, dtype, use_gpu, tasks, max_batch_tokens, storage_options, cpus):
        import torch

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        super().__init__(source=source, dtype=dtype, device="cuda" if use_gpu else "cpu", tasks=tasks,
                         max_batch_tokens=max_batch_tokens, storage_options=storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        fault = os.environ.get(ACTOR_FAULT_ENV)
        if fault:
            try:
                os.remove(fault)  # only one process can remove it
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        return super().__call__(batch)


@dataclass(frozen=True)
class Plan:
    """Everything build_dataset needs, resolved by run.validate in the driver."""

    units: tuple[Unit, ...]  # units still to do
    read: ReadSettings
    prepare: PrepareSettings
    finish: FinishSettings
    infer_kwargs: dict  # InferActor constructor arguments
    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    rows_per_call: int
    actor_memory_bytes: int  # host memory reserved per model actor


def build_dataset(plan: Plan) -> ray.data.Dataset:
    items = [{"key": u.key, "uri": u.uri, "start": u.start, "stop": u.stop} for u in plan.units]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(read_stage, batch_size=1, batch_format="pyarrow", fn_kwargs={"settings": plan.read})
    ds = ds.map_batches(prepare_stage, batch_size=None, batch_format="pyarrow", fn_kwargs={"settings": plan.prepare})
    use_gpu = plan.gpus_per_actor > 0
    # Each actor reserves host memory for one copy of the weights (plus headroom), so Ray never
    # packs more model actors on a node than its RAM holds (loading goes through host memory).
    # The reservation also keeps Ray Data from fusing read and prepare into the model actor (it
    # fuses tasks into an actor pool whose resource requests equal theirs, as on CPU-only runs):
    # prepare always runs in CPU tasks, concurrently with the actors, never in front of the model.
    # Dead actors are restarted and their calls retried (Ray Data's defaults); the committer drops
    # the duplicate rows a retry may produce.
    remote = {"num_cpus": plan.cpus_per_actor, "memory": plan.actor_memory_bytes}
    ds = ds.map_batches(
        InferActor,
        batch_size=plan.rows_per_call,
        batch_format="pyarrow",
        fn_constructor_kwargs=dict(plan.infer_kwargs, use_gpu=use_gpu, cpus=plan.cpus_per_actor),
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        **remote,
    )
    ds = ds.map_batches(finish_stage, batch_size=None, batch_format="pyarrow", fn_kwargs={"settings": plan.finish})
    return ds


def prompt_tasks(spec_tasks) -> tuple[PromptTask, ...]:
    return tuple(
        PromptTask(
            output_column=t.output_column,
            template=t.prompt,
            constants={k: v for k, v in (("source_language", t.source_language),
                                         ("target_language", t.target_language)) if v is not None},
            uses_text=t.uses_text,
            uses_image=t.uses_image,
        )
        for t in spec_tasks
    )


def infer_tasks(spec_tasks) -> list[InferTask]:
    from model.generate import GenerationParams

    return [InferTask(output_column=t.output_column, params=GenerationParams(**t.generation), uses_image=t.uses_image)
            for t in spec_tasks]

