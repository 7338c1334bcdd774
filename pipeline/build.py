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

Faults: a model actor that dies is restarted and its calls retried, CALL_RETRIES times at most. A
call that runs longer than resources.call_timeout_s is stopped by the actor's hang guard
(CallWatchdog), which exits the process so that the same retry applies; and Ray Data's driver-side
no-progress bound (no_progress_timeout_s) fails a run whose actors are stuck where the guard cannot
act. The test-only fault hooks (T5G2_FAULT_*) that exercise all this are documented below.

Not here: validation and the commit loop (run.py), model internals (model/).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data

from operators import columns as C
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
                print(message, file=sys.stderr, flush=True)
                os._exit(HANG_EXIT_CODE)


# ---- fault hooks: for tests, never set in production ---------------------------------------------
#
# Each variable names a file that arms its fault while it exists, so a test can arm and disarm
# faults in model actors that were started long before (Ray's workers inherit the environment of
# the process that starts Ray: tests/conftest.py sets the variables before ray.init). Every fault
# that fires first appends one line "<fault> batch=<unit>:<row> ... pid=<pid>" to "<file>.fired",
# so tests can count what happened.
#
#   T5G2_FAULT_ACTOR_EXIT_FILE       the first actor to delete the file dies (os._exit) at the start of
#                                    a call, as a crashed GPU process would.
#   T5G2_FAULT_ACTOR_EXIT_EVERY_FILE the file holds an integer k: every actor process dies at the
#                                    start of its k-th, 2k-th, ... call (a restarted actor counts from
#                                    zero again). A batch dies at most once, so the retries always
#                                    finish the job.
#   T5G2_FAULT_ACTOR_EXIT_MID_BATCH_FILE  the first actor to delete the file dies inside the model's
#                                    forward, in a decoder step: after the batch's encoder pass, with
#                                    generation under way.
#   T5G2_FAULT_ACTOR_HANG_FILE       "once": the first call to delete the file sleeps for ever;
#                                    "always": every call sleeps for ever while the file exists;
#                                    "freeze": the first call to delete it stops its whole process
#                                    (SIGSTOP), hang guard included, as a process wedged in a driver
#                                    call would be: only the driver's no-progress bound can end that.
#   T5G2_FAULT_OOM_FILE              JSON {"max_tokens": N, "poison_ids": [...]}: the model's encoder
#                                    raises torch.OutOfMemoryError for a micro-batch of more than N
#                                    (padded) tokens, or one holding a text prompt or the image of a
#                                    row whose id is in poison_ids, as a GPU out of memory would.
#
# Ray restarts a dead actor and retries its calls; the committer must still write every row once.
ACTOR_FAULT_ENV = "T5G2_FAULT_ACTOR_EXIT_FILE"
ACTOR_EXIT_EVERY_ENV = "T5G2_FAULT_ACTOR_EXIT_EVERY_FILE"
ACTOR_EXIT_MID_BATCH_ENV = "T5G2_FAULT_ACTOR_EXIT_MID_BATCH_FILE"
ACTOR_HANG_ENV = "T5G2_FAULT_ACTOR_HANG_FILE"
ACTOR_OOM_ENV = "T5G2_FAULT_OOM_FILE"
FAULT_ENVS = (ACTOR_FAULT_ENV, ACTOR_EXIT_EVERY_ENV, ACTOR_EXIT_MID_BATCH_ENV, ACTOR_HANG_ENV, ACTOR_OOM_ENV)
FAULT_LOG_SUFFIX = ".fired"
FAULT_EXIT_CODE = 1


def _fault_fired(env: str, fault: str, **facts) -> None:
    """Appends "<fault> key=value ... pid=<pid>" to the hook's log, before the fault takes effect."""
    words = [fault, *(f"{k}={v}" for k, v in facts.items()), f"pid={os.getpid()}"]
    with open(os.environ[env] + FAULT_LOG_SUFFIX, "a") as log:
        log.write(" ".join(words) + "\n")


def _take_fault_file(env: str) -> str | None:
    """The armed file's text, deleting it (only one process can), or None when this one did not get it."""
    path = os.environ.get(env)
    if not path:
        return None
    try:
        with open(path) as f:
            text = f.read()
        os.remove(path)
    except FileNotFoundError:
        return None
    return text


def _read_fault_file(env: str) -> str | None:
    """The armed file's text, or None when the hook is not set or not armed."""
    path = os.environ.get(env)
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


class ActorFaults:
    """The test fault hooks of one model actor (see above); inert unless their variables are set."""

    def __init__(self, model, tasks: list[InferTask], pixel_shape: tuple[int, ...]):
        self.tasks = tasks
        self.pixel_shape = pixel_shape
        self.calls = 0  # calls of this process
        self.batch = ""  # "<unit>:<first row>" of the batch in the running call
        self.poison_prompts: list[tuple[int, ...]] = []  # text prompts of the OOM hook's poison rows
        self.poison_images: list = []  # and their images, as the model gets them
        if os.environ.get(ACTOR_EXIT_MID_BATCH_ENV):
            # The decoder's final norm runs once per generated token, after the encoder pass, whatever
            # the decoding loop's method names are: the place to die with generation under way.
            model.decoder.norm.register_forward_pre_hook(self._die_mid_batch)
        if os.environ.get(ACTOR_OOM_ENV):
            model.encode = self._out_of_memory(model.encode)

    def before_call(self, batch: pa.Table) -> None:
        self.calls += 1
        self.batch = f"{batch.column(C.UNIT)[0]}:{batch.column(C.ROW)[0]}" if batch.num_rows else "empty"
        if _take_fault_file(ACTOR_FAULT_ENV) is not None:
            self._die(ACTOR_FAULT_ENV, "exit-at-call-start")
        every = _read_fault_file(ACTOR_EXIT_EVERY_ENV)
        if every and self.calls % int(every) == 0 and not self._died_on_this_batch():
            self._die(ACTOR_EXIT_EVERY_ENV, "exit-every")
        hang = _read_fault_file(ACTOR_HANG_ENV)
        if hang is not None and (hang.strip() == "always" or _take_fault_file(ACTOR_HANG_ENV) is not None):
            self._hang(hang.strip())
        oom = _read_fault_file(ACTOR_OOM_ENV)
        if oom:
            self._find_poison(batch, set(json.loads(oom).get("poison_ids", [])))

    def _died_on_this_batch(self) -> bool:
        try:
            with open(os.environ[ACTOR_EXIT_EVERY_ENV] + FAULT_LOG_SUFFIX) as log:
                return any(f"batch={self.batch}" in line.split() for line in log)
        except FileNotFoundError:
            return False

    def _die(self, env: str, fault: str) -> None:
        _fault_fired(env, fault, batch=self.batch, call=self.calls)
        os._exit(FAULT_EXIT_CODE)

    def _die_mid_batch(self, module, inputs) -> None:
        if _take_fault_file(ACTOR_EXIT_MID_BATCH_ENV) is not None:
            self._die(ACTOR_EXIT_MID_BATCH_ENV, "exit-mid-batch")

    def _hang(self, mode: str) -> None:
        _fault_fired(ACTOR_HANG_ENV, f"hang-{mode}", batch=self.batch, call=self.calls)
        if mode == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)
        while True:
            time.sleep(3600)

    def _find_poison(self, batch: pa.Table, poison_ids: set[str]) -> None:
        """The poison rows' prompts of text-only tasks (their token ids are the row's own) and their
        images (an image task's prompt ids are the same for every row; its pixels are not)."""
        import torch

        rows = [r for r, row_id in enumerate(batch.column(C.ID).to_pylist()) if str(row_id) in poison_ids]
        self.poison_prompts, self.poison_images = [], []
        for task in self.tasks:
            prompts = batch.column(C.TaskColumns.of(task.output_column).prompt_ids).to_pylist()
            if not task.uses_image:
                self.poison_prompts += [tuple(prompts[r]) for r in rows if prompts[r] is not None]
        if any(t.uses_image for t in self.tasks):
            pixels = batch.column(C.PIXELS).to_pylist()
            self.poison_images = [torch.from_numpy(np.frombuffer(pixels[r], dtype=np.float32).reshape(self.pixel_shape))
                                  for r in rows if pixels[r] is not None]

    def _out_of_memory(self, encode):
        import torch

        def encode_or_oom(input_ids, *args, pixel_values=None, **kwargs):
            settings = _read_fault_file(ACTOR_OOM_ENV)
            if settings:
                max_tokens = json.loads(settings).get("max_tokens")
                rows = input_ids.tolist() if input_ids.dim() > 1 else [input_ids.tolist()]
                poisoned = any(_contains(row, p) for row in rows for p in self.poison_prompts) or (
                    pixel_values is not None and any(torch.equal(image.float().cpu(), poison)
                                                     for image in pixel_values for poison in self.poison_images))
                if poisoned or (max_tokens is not None and input_ids.numel() > max_tokens):
                    reason = "poison" if poisoned else "size"
                    _fault_fired(ACTOR_OOM_ENV, f"oom-{reason}", batch=self.batch, tokens=input_ids.numel(),
                                 rows=len(rows))
                    raise torch.OutOfMemoryError(f"injected by {ACTOR_OOM_ENV} ({reason}, {input_ids.numel()} tokens)")
            return encode(input_ids, *args, pixel_values=pixel_values, **kwargs)
        return encode_or_oom


def _contains(row: list[int], prompt: tuple[int, ...]) -> bool:
    """Whether `prompt` is a contiguous run of `row` (a padded row, or a packed sequence of prompts)."""
    n = len(prompt)
    return any(tuple(row[i:i + n]) == prompt for i in range(len(row) - n + 1))


class InferActor(Infer):
    """Infer as a Ray Data callable class: one model per actor, on the actor's GPU or its CPU.

    Every call runs under the hang guard (CallWatchdog) with the job's resources.call_timeout_s.
    """

    def __init__(self, *, source, dtype, use_gpu, tasks, max_batch_tokens, storage_options, cpus,
                 call_timeout_s):
        import torch

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        super().__init__(source=source, dtype=dtype, device="cuda" if use_gpu else "cpu", tasks=tasks,
                         max_batch_tokens=max_batch_tokens, storage_options=storage_options)
        self.watchdog = CallWatchdog(call_timeout_s)
        self.faults = (ActorFaults(self.model, self.tasks, self.pixel_shape)
                       if any(os.environ.get(env) for env in FAULT_ENVS) else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.watchdog.watching(batch.num_rows):
            if self.faults is not None:
                self.faults.before_call(batch)
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
    call_timeout_s: float  # the hang guard's limit on one model call (resources.call_timeout_s)


def no_progress_timeout_s(call_timeout_s: float, ray_default_s: float) -> float:
    """How long the whole plan may go without moving a block before Ray Data fails the run.

    The driver-side guard, for what the actors' hang guard cannot see: a process frozen whole (its
    watchdog thread too), an actor that never starts or never loads its model. A healthy pipeline
    can be quiet for one call cut at call_timeout_s, an actor restart with its model load, and the
    retried call: NO_PROGRESS_CALLS call timeouts. Never below Ray Data's own bound (`ray_default_s`,
    30 min unless changed), which is what leaves room for loading a large model.
    """
    return max(NO_PROGRESS_CALLS * call_timeout_s, ray_default_s)


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
    # A dead actor (crash, kill, or the hang guard) is restarted and its calls are retried; the
    # committer drops the duplicate rows a retry may produce. Both limits are set here rather than
    # left to Ray Data's defaults (in ray 2.60: max_restarts = -1 and max_task_retries = -1, i.e.
    # forever): restarts stay unlimited, because a long job on many GPUs may lose actors many times
    # over its life (preemption, GPU faults) and each death costs only its calls; but one call is
    # retried CALL_RETRIES times at most, so a call that kills or hangs its actor every time fails the
    # job with a clear message instead of looping for ever. (Ray 2.60 has no named parameter for
    # these two and warns that **ray_remote_args goes away in 2.64: revisit then.)
    remote = {"num_cpus": plan.cpus_per_actor, "memory": plan.actor_memory_bytes,
              "max_restarts": -1, "max_task_retries": CALL_RETRIES}
    ds = ds.map_batches(
        InferActor,
        batch_size=plan.rows_per_call,
        batch_format="pyarrow",
        fn_constructor_kwargs=dict(plan.infer_kwargs, use_gpu=use_gpu, cpus=plan.cpus_per_actor,
                                   call_timeout_s=plan.call_timeout_s),
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        **remote,
    )
    ds = ds.map_batches(finish_stage, batch_size=None, batch_format="pyarrow", fn_kwargs={"settings": plan.finish})
    if hasattr(ds.context, "execution_no_progress_timeout_s"):  # Ray Data's driver-side guard, where it has one
        ds.context.execution_no_progress_timeout_s = no_progress_timeout_s(
            plan.call_timeout_s, ds.context.execution_no_progress_timeout_s)
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

