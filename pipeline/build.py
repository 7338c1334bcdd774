"""The Ray Data plan of a job: units -> read -> prepare -> infer -> finish, as one Dataset.

    from_items(units)            one block per unit of work still to do
    .map_batches(read)           CPU task: the unit's rows from its Parquet file (needed columns only)
    .map_batches(prepare)        CPU task: prompts, tokens, labels, decoded images, per-row errors
    .map_batches(Infer)          actor pool (GPUs, or CPU when gpus_per_actor = 0): the model,
                                 loaded once per actor; rows_per_call rows per call; generates,
                                 or scores a classify task's candidates
    .map_batches(finish)         CPU task: text or chosen labels, token counts, provenance

The keep columns (output.keep_columns) ride along through every stage in their KEEP columns
(operators/columns.py): each stage names them among the columns it requires and passes them on.

Ray Data streams blocks through these stages concurrently, with its own backpressure between the
CPU tasks and the actor pool. The plan ends in the driver (`iter_batches`), where run.py commits
each unit once all its rows are back (see commit.py for why the commit is not a Ray sink).

CPU stages are plain functions; their heavy objects (tokenizer, image processor) are built once
per worker process and cached by their settings, so tasks stay cheap and nothing large travels
with each task.

Faults: a model actor that dies is restarted and its calls retried, CALL_RETRIES times at most. A
call that runs longer than resources.call_timeout_s is stopped by the actor's hang guard
(CallWatchdog), which exits the process so that the same retry applies; and Ray Data's driver-side
no-progress bound (no_progress_timeout_s) fails a run whose actors are stuck where the guard cannot
act. The tests exercise all this with a subclass of InferActor that injects faults
(tests/helpers/actor_faults.py), handed to build_dataset as `actor_cls`; nothing here knows of it.

Not here: validation and the commit loop (run.py), model internals (model/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import ray
import ray.data

from operators import columns as C
from operators.finish import Finish, FinishTask
from operators.infer import Infer, InferTask
from operators.prepare import Prepare, PromptTask

from .inputs import UNIT_ITEM_FIELDS, ExtraColumn, Unit, read_unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadSettings:
    """What the read stage takes."""

    columns: dict  # "id" / "text" / "image" -> input column name or None
    storage_options: dict  # fsspec options for the input files
    block_rows: int  # rows per block handed downstream
    extra: tuple[ExtraColumn, ...] = ()  # the other input columns: prompt fields, labels, keep columns


@dataclass(frozen=True)
class PrepareSettings:
    """What the prepare stage takes (operators.prepare.Prepare is built from it once per worker)."""

    source: str  # checkpoint (for tokenizer.model or tokenizer.json, and preprocessor_config.json)
    storage_options: dict  # fsspec options for the checkpoint
    tasks: tuple  # PromptTask per task
    max_input_tokens: int  # longest prompt, image tokens included (input.max_input_tokens)
    long_input: str  # "error" | "truncate" | "chunk" (input.long_input)
    keep: tuple[str, ...] = ()  # output.keep_columns, passed through


@dataclass(frozen=True)
class InferSettings:
    """What each model actor (InferActor) takes."""

    source: str  # checkpoint directory or URI
    dtype: str  # weights and compute dtype
    tasks: tuple  # InferTask per task
    max_batch_tokens: int | None  # the Generator's token budget per micro-batch (None: its default)
    storage_options: dict  # fsspec options for the checkpoint
    gpus_per_actor: float  # GPUs Ray reserved for the actor; 0 runs on CPU
    cpus: float  # CPUs Ray reserved for the actor (torch threads on CPU)
    call_timeout_s: float  # the hang guard's limit on one call
    keep: tuple[str, ...] = ()  # output.keep_columns, passed through
    adapter: str | None = None  # PEFT LoRA adapter merged into the weights at load (model.adapter)
    adapter_storage_options: dict = field(default_factory=dict)  # fsspec options for the adapter


@dataclass(frozen=True)
class FinishSettings:
    """What the finish stage takes."""

    source: str  # checkpoint (for the tokenizer)
    storage_options: dict  # fsspec options for the checkpoint
    tasks: tuple  # FinishTask per task
    provenance: dict = field(default_factory=dict)  # model source, revision and run config hash
    keep: tuple[str, ...] = ()  # output.keep_columns, renamed back to their input names


_CACHE: dict[str, object] = {}


def _cache_key(settings) -> str:
    return type(settings).__name__ + hashlib.sha256(
        json.dumps(asdict(settings), sort_keys=True, default=repr).encode()).hexdigest()


def build_prepare(s: PrepareSettings) -> Prepare:
    from model.images import ImageProcessor
    from model.source import CheckpointSource
    from model.tokenizer import Tokenizer

    src = CheckpointSource.open(s.source, s.storage_options)
    tokenizer = Tokenizer.from_pretrained(src)
    processor = ImageProcessor.from_pretrained(src) if any(t.uses_image for t in s.tasks) else None
    return Prepare(tokenizer, processor, list(s.tasks), s.max_input_tokens, s.long_input, keep=s.keep)


def build_finish(s: FinishSettings) -> Finish:
    from model.tokenizer import Tokenizer

    return Finish(Tokenizer.from_pretrained(s.source, s.storage_options), list(s.tasks), s.provenance, keep=s.keep)


def _cached(settings, factory):
    key = _cache_key(settings)
    if key not in _CACHE:
        _CACHE[key] = factory(settings)
    return _CACHE[key]


def read_stage(batch: pa.Table, *, settings: ReadSettings) -> Iterator[pa.Table]:
    C.require(batch, list(UNIT_ITEM_FIELDS), "read")
    for item in batch.to_pylist():
        yield from read_unit(Unit.from_item(item), settings.columns, settings.storage_options, settings.block_rows,
                             settings.extra)


def prepare_stage(batch: pa.Table, *, settings: PrepareSettings) -> pa.Table:
    return _cached(settings, build_prepare)(batch)


def finish_stage(batch: pa.Table, *, settings: FinishSettings) -> pa.Table:
    return _cached(settings, build_finish)(batch)


# ---- the hang guard --------------------------------------------------------------------------

# How often an actor's call may be retried after its process died (a crash, a kill, or the hang
# guard below): Ray Data's default is forever, so a call that kills its actor every time would
# loop for ever. Three retries ride out transient faults; the fourth death of the same call fails
# the job, and run.py says why.
CALL_RETRIES = 3
HANG_EXIT_CODE = 86  # the exit status of an actor process that the hang guard stopped
HANG_GUARD_MESSAGE = "hang guard"  # opens the message an actor logs before the guard stops it
NO_PROGRESS_CALLS = 3  # the driver-side bound, in call timeouts (see no_progress_timeout_s)


class CallWatchdog:
    """Stops this process when one call has run longer than `timeout_s`: the hang guard.

    A model call that stops making progress (a wedged GPU, a stalled read, a deadlock) would
    otherwise hold its actor, and with it the job, for ever. The watchdog is a daemon thread that
    looks at the running calls' start times; when one is over the limit it logs why and exits the
    process (os._exit: nothing in a hung process can be trusted to unwind), so that Ray restarts the
    actor and retries the call, at most CALL_RETRIES times.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._running: dict[int, tuple[float, int]] = {}  # thread id -> (monotonic start, rows)
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="t5g2-hang-guard", daemon=True).start()

    @contextmanager
    def watching(self, rows: int):
        key = threading.get_ident()
        with self._lock:
            self._running[key] = (time.monotonic(), rows)
        try:
            yield
        finally:
            with self._lock:
                del self._running[key]

    def _watch(self) -> None:
        poll = min(5.0, max(0.1, self.timeout_s / 10))  # fine enough that a stop comes close to the limit
        while True:
            time.sleep(poll)
            now = time.monotonic()
            with self._lock:
                over = [(now - start, rows) for start, rows in self._running.values() if now - start > self.timeout_s]
            if over:
                seconds, rows = over[0]
                message = (f"{HANG_GUARD_MESSAGE}: a model call of {rows} rows has run {seconds:.1f} s, longer than "
                           f"resources.call_timeout_s = {self.timeout_s:g} s; stopping this actor process (pid "
                           f"{os.getpid()}) so that Ray restarts it and retries the call (at most {CALL_RETRIES} "
                           f"times). Raise resources.call_timeout_s (or lower rows_per_call) if calls really take "
                           f"this long.")
                log.error(message)
                sys.stderr.flush()  # os._exit skips the flush at exit, and Ray's worker log is a file
                os._exit(HANG_EXIT_CODE)


def actor_device(gpus_per_actor: float, gpu_ids: list, cuda_available: bool,
                 visible_devices: str | None = None) -> str:
    """The torch device of a model actor: "cpu", or the GPU Ray assigned it.

    Ray reserves `gpus_per_actor` for the actor (model_actor_options) and sets CUDA_VISIBLE_DEVICES to
    the assigned device(s), so the actor's GPU is always cuda:0 in its own process; where Ray was told
    not to set it (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), the assigned id is used directly.
    Actors sharing a GPU (gpus_per_actor < 1) get the same device. A model uses one GPU: with
    gpus_per_actor > 1 the others are reserved but idle.
    """
    if gpus_per_actor <= 0:
        return "cpu"
    if not gpu_ids:
        raise RuntimeError(f"resources.gpus_per_actor = {gpus_per_actor:g}, but no GPU was assigned to this actor "
                           f"by Ray (ray.get_gpu_ids() is empty); this is a bug in the actor's Ray options")
    if not cuda_available:
        import torch

        raise RuntimeError(
            f"Ray gave this actor GPU(s) {[str(i) for i in gpu_ids]} (CUDA_VISIBLE_DEVICES={visible_devices!r}), "
            f"but torch cannot use CUDA here (torch {torch.__version__}, CUDA build {torch.version.cuda}): install a "
            f"CUDA build of torch and the NVIDIA driver on the GPU nodes, or set resources.gpus_per_actor = 0 to run "
            f"on CPU")
    return "cuda:0" if visible_devices is not None else f"cuda:{gpu_ids[0]}"


def actor_memory_share(gpus_per_actor: float) -> float | None:
    """The share of its GPU's memory an actor's Generator plans its decode slots within: its share of the
    card when it holds a fraction of one (free memory on a shared card is its neighbours' too), else None
    (a GPU of its own: the card's free memory; CPU: the token budget)."""
    return gpus_per_actor if 0 < gpus_per_actor < 1 else None


def model_actor_options(gpus_per_actor: float, cpus_per_actor: float, memory_bytes: int) -> dict:
    """The Ray options of each model actor: the GPUs, CPUs and host memory it holds, and its restarts.

    Restarts stay unlimited, because a long job on many GPUs may lose actors many times over its
    life (preemption, GPU faults) and each death costs only its calls; but one call is retried
    CALL_RETRIES times at most, so a call that kills or hangs its actor every time fails the job with
    a clear message instead of looping for ever. (Ray Data's defaults in ray 2.60 are -1 and -1, i.e.
    forever; it has no named parameter for these two and warns that **ray_remote_args goes away in
    2.64: revisit then.)
    """
    return {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor, "memory": memory_bytes,
            "max_restarts": -1, "max_task_retries": CALL_RETRIES}


class InferActor(Infer):
    """Infer as a Ray Data callable class: one model per actor, on the GPU Ray gave it or its CPU.

    Every call runs under the hang guard (CallWatchdog) with the job's resources.call_timeout_s.
    """

    def __init__(self, settings: InferSettings):
        import torch

        device = self.choose_device(settings.gpus_per_actor)
        if device == "cpu":
            torch.set_num_threads(max(1, int(settings.cpus)))
        super().__init__(source=settings.source, dtype=settings.dtype, device=device, tasks=list(settings.tasks),
                         max_batch_tokens=settings.max_batch_tokens,
                         memory_share=actor_memory_share(settings.gpus_per_actor),
                         storage_options=settings.storage_options,
                         keep=settings.keep, adapter=settings.adapter,
                         adapter_storage_options=settings.adapter_storage_options)
        self.watchdog = CallWatchdog(settings.call_timeout_s)

    @staticmethod
    def choose_device(gpus_per_actor: float) -> str:
        """The device for this actor's model: what Ray assigned it (actor_device)."""
        import torch

        gpu_ids = ray.get_gpu_ids() if gpus_per_actor > 0 else []
        return actor_device(gpus_per_actor, gpu_ids, torch.cuda.is_available(), os.environ.get("CUDA_VISIBLE_DEVICES"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.watchdog.watching(batch.num_rows):
            return super().__call__(batch)


@dataclass(frozen=True)
class Plan:
    """Everything build_dataset needs, resolved in the driver (run.make_plan)."""

    units: tuple[Unit, ...]  # units still to do
    read: ReadSettings  # the read stage's settings
    prepare: PrepareSettings  # the prepare stage's
    infer: InferSettings  # each model actor's
    finish: FinishSettings  # the finish stage's
    min_actors: int  # model actors at least
    max_actors: int  # and at most (autoscaling between)
    cpus_per_actor: float  # CPUs reserved per model actor
    rows_per_call: int  # rows handed to a model actor per call
    actor_memory_bytes: int  # host memory reserved per model actor


@dataclass(frozen=True)
class Stage:
    """One step of the plan, described once: what runs, what it takes, how Ray Data runs it."""

    name: str  # for messages
    fn: object  # a function over one pyarrow batch, or a callable class (an actor pool)
    settings: object  # its settings dataclass: fn_kwargs["settings"], or the class's constructor argument
    batch_size: int | None  # rows per call; None = whole blocks
    requires: tuple[str, ...] = ()  # the columns it reads (the operator checks them on every batch)
    pool: tuple[int, int] | None = None  # (min, max) actors for a class; None for a task
    remote_args: dict = field(default_factory=dict)  # Ray resources and retry options

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        common = dict(batch_size=self.batch_size, batch_format="pyarrow", **self.remote_args)
        if self.pool is None:
            return ds.map_batches(self.fn, fn_kwargs={"settings": self.settings}, **common)
        return ds.map_batches(self.fn, fn_constructor_args=(self.settings,),
                              compute=ray.data.ActorPoolStrategy(min_size=self.pool[0], max_size=self.pool[1]),
                              **common)


def stages(plan: Plan, actor_cls: type = InferActor) -> list[Stage]:
    """read -> prepare -> infer -> finish.

    Each model actor reserves its GPUs (so Ray places it on a GPU node and gives it its own device)
    and host memory for one copy of the weights plus headroom, so Ray never packs more model actors
    on a node than its RAM holds (loading goes through host memory). The memory reservation also
    keeps Ray Data from fusing read and prepare into the model actor (it fuses tasks into an actor
    pool whose resource requests equal theirs, as on CPU-only runs): prepare always runs in CPU
    tasks, concurrently with the actors, never in front of the model. A dead actor (crash, kill, or
    the hang guard) is restarted and its calls are retried (model_actor_options); the committer drops
    the duplicate rows a retry may produce.
    """
    infer = plan.infer
    return [
        Stage("read", read_stage, plan.read, batch_size=1, requires=UNIT_ITEM_FIELDS),
        Stage("prepare", prepare_stage, plan.prepare, batch_size=None,
              requires=tuple(Prepare.required_columns(list(plan.prepare.tasks), plan.prepare.keep))),
        Stage("infer", actor_cls, infer, batch_size=plan.rows_per_call,
              requires=tuple(Infer.required_columns(list(infer.tasks), infer.keep)),
              pool=(plan.min_actors, plan.max_actors),
              remote_args=model_actor_options(infer.gpus_per_actor, plan.cpus_per_actor, plan.actor_memory_bytes)),
        Stage("finish", finish_stage, plan.finish, batch_size=None,
              requires=tuple(Finish.required_columns(list(plan.finish.tasks), plan.finish.keep))),
    ]


def no_progress_timeout_s(call_timeout_s: float, ray_default_s: float) -> float:
    """How long the whole plan may go without moving a block before Ray Data fails the run.

    The driver-side guard, for what the actors' hang guard cannot see: a process frozen whole (its
    watchdog thread too), an actor that never starts or never loads its model. A healthy pipeline
    can be quiet for one call cut at call_timeout_s, an actor restart with its model load, and the
    retried call: NO_PROGRESS_CALLS call timeouts. Never below Ray Data's own bound (`ray_default_s`,
    30 min unless changed), which is what leaves room for loading a large model.
    """
    return max(NO_PROGRESS_CALLS * call_timeout_s, ray_default_s)


def build_dataset(plan: Plan, actor_cls: type = InferActor) -> ray.data.Dataset:
    """The plan as a Ray Data Dataset; `actor_cls` is the model actor (tests pass a subclass)."""
    items = [u.to_item() for u in plan.units]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    for stage in stages(plan, actor_cls):
        ds = stage.apply(ds)
    if hasattr(ds.context, "execution_no_progress_timeout_s"):  # Ray Data's driver-side guard, where it has one
        ds.context.execution_no_progress_timeout_s = no_progress_timeout_s(
            plan.infer.call_timeout_s, ds.context.execution_no_progress_timeout_s)
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
            fields=t.fields,
            prompt_column=t.prompt_column,
            classify=t.classify,
            labels=t.labels,
            labels_column=t.labels_column,
        )
        for t in spec_tasks
    )


def infer_tasks(spec_tasks) -> tuple[InferTask, ...]:
    return tuple(InferTask(output_column=t.output_column, params=t.generation, uses_image=t.uses_image,
                           score=t.score) for t in spec_tasks)


def finish_tasks(spec_tasks) -> tuple[FinishTask, ...]:
    return tuple(FinishTask(output_column=t.output_column, classify=t.classify, multi_label=t.multi_label,
                            threshold=t.threshold, sequences=t.sequences, language=t.checked_language)
                 for t in spec_tasks)

