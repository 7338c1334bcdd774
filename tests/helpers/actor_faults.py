"""Fault hooks of the model actors, for tests: FaultyInferActor, a pipeline.build.InferActor that
crashes, hangs or runs out of device memory on purpose, and a placement probe.

The reliability tests (tests/pipeline/test_actor_faults.py, test_run.py, test_gpu_placement.py) run
jobs with `run_job(spec, hooks=FAULTY)`, so the plan's model actors are FaultyInferActor, inside
real Ray actor processes, to prove the pipeline still writes every row exactly once. Production
code never imports this module. Ray's workers import it as `helpers.actor_faults` (tests/conftest.py
puts tests/ on the PYTHONPATH of the session's Ray), and each hook is inert unless its variable
below is set in the environment of the Ray workers and its file armed.

Not here: the hang guard and retry limits themselves (pipeline/build.py), the driver's crash hook
(tests/helpers/crash_driver.py).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pyarrow as pa

from operators import columns as C
from operators.infer import InferTask
from pipeline.build import InferActor
from pipeline.run import RunHooks

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
#   T5G2_FAULT_PLACEMENT_DIR         the placement probe, not a fault: while the directory exists, each
#                                    model actor writes <pid>.json there with what Ray gave it (its GPU
#                                    ids, CUDA_VISIBLE_DEVICES, the device it would use) and runs the
#                                    model on CPU, so GPU placement is testable on fake GPU resources.
#
# Ray restarts a dead actor and retries its calls; the committer must still write every row once.
ACTOR_FAULT_ENV = "T5G2_FAULT_ACTOR_EXIT_FILE"
ACTOR_EXIT_EVERY_ENV = "T5G2_FAULT_ACTOR_EXIT_EVERY_FILE"
ACTOR_EXIT_MID_BATCH_ENV = "T5G2_FAULT_ACTOR_EXIT_MID_BATCH_FILE"
ACTOR_HANG_ENV = "T5G2_FAULT_ACTOR_HANG_FILE"
ACTOR_OOM_ENV = "T5G2_FAULT_OOM_FILE"
PLACEMENT_PROBE_ENV = "T5G2_FAULT_PLACEMENT_DIR"
FAULT_ENVS = (ACTOR_FAULT_ENV, ACTOR_EXIT_EVERY_ENV, ACTOR_EXIT_MID_BATCH_ENV, ACTOR_HANG_ENV, ACTOR_OOM_ENV)
FAULT_LOG_SUFFIX = ".fired"
FAULT_EXIT_CODE = 1


def _fault_fired(env: str, fault: str, **facts) -> None:
    """Appends "<fault> key=value ... pid=<pid>" to the hook's log, before the fault takes effect."""
    words = [fault, *(f"{k}={v}" for k, v in facts.items()), f"pid={os.getpid()}"]
    with open(os.environ[env] + FAULT_LOG_SUFFIX, "a") as log:
        log.write(" ".join(words) + "\n")


def _armed(env: str, take: bool = False) -> str | None:
    """The armed file's text, or None when the hook is unset or not armed. With `take` the file is
    also deleted, and only the one process whose delete succeeds gets the text."""
    path = os.environ.get(env)
    if not path:
        return None
    try:
        with open(path) as f:
            text = f.read()
        if take:
            os.remove(path)
    except FileNotFoundError:
        return None
    return text


def placement_probe(gpu_ids: list, would_use: str) -> bool:
    """The placement probe (see above): True when armed, after recording this actor's placement; the
    caller then runs the model on CPU instead of `would_use`."""
    directory = os.environ.get(PLACEMENT_PROBE_ENV)
    if not directory or not os.path.isdir(directory):
        return False
    record = {"pid": os.getpid(), "ray_gpu_ids": [str(i) for i in gpu_ids],
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "would_use": would_use}
    with open(os.path.join(directory, f"{os.getpid()}.json"), "w") as f:
        json.dump(record, f)
    return True


class FaultyInferActor(InferActor):
    """The model actor with the hooks above: the production actor plus whatever the armed files say."""

    def __init__(self, settings):
        super().__init__(settings)
        self.faults = ActorFaults.if_armed(self.model, self.tasks, self.pixel_shape, self.generator.pixel_normalizer)

    @staticmethod
    def choose_device(gpus_per_actor: float) -> str:
        import ray

        from pipeline.build import actor_device

        gpu_ids = ray.get_gpu_ids() if gpus_per_actor > 0 else []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if placement_probe(gpu_ids, actor_device(gpus_per_actor, gpu_ids, True, visible)):
            return "cpu"  # placement recorded; the model runs on CPU on this machine without CUDA
        return InferActor.choose_device(gpus_per_actor)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.watchdog.watching(batch.num_rows):  # the hang guard sees the injected hangs too
            if self.faults is not None:
                self.faults.before_call(batch)
            return super(InferActor, self).__call__(batch)


FAULTY = RunHooks(actor_cls=FaultyInferActor)  # run_job(spec, hooks=FAULTY): a run whose actors take faults


class ActorFaults:
    """The test fault hooks of one model actor (see above); inert unless their variables are set."""

    @classmethod
    def if_armed(cls, model, tasks: list[InferTask], pixel_shape: tuple[int, ...],
                 pixel_normalizer=None) -> ActorFaults | None:
        """The hooks for this actor when any fault variable is set, else None (production)."""
        armed = any(os.environ.get(env) for env in FAULT_ENVS)
        return cls(model, tasks, pixel_shape, pixel_normalizer) if armed else None

    def __init__(self, model, tasks: list[InferTask], pixel_shape: tuple[int, ...], pixel_normalizer=None):
        self.tasks = tasks
        self.pixel_shape = pixel_shape
        self.pixel_normalizer = pixel_normalizer  # the actor's: uint8 pixels -> what the encoder sees
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
        if _armed(ACTOR_FAULT_ENV, take=True) is not None:
            self._die(ACTOR_FAULT_ENV, "exit-at-call-start")
        every = _armed(ACTOR_EXIT_EVERY_ENV)
        if every and self.calls % int(every) == 0 and not self._died_on_this_batch():
            self._die(ACTOR_EXIT_EVERY_ENV, "exit-every")
        hang = _armed(ACTOR_HANG_ENV)
        if hang is not None and (hang.strip() == "always" or _armed(ACTOR_HANG_ENV, take=True) is not None):
            self._hang(hang.strip())
        oom = _armed(ACTOR_OOM_ENV)
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
        if _armed(ACTOR_EXIT_MID_BATCH_ENV, take=True) is not None:
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
            shipped = [torch.from_numpy(C.pixels_from_bytes(pixels[r], self.pixel_shape))[None]
                       for r in rows if pixels[r] is not None]
            # as the encoder sees them: the uint8 shipped, finished on the device
            self.poison_images = [self.pixel_normalizer(image)[0] for image in shipped]

    def _out_of_memory(self, encode):
        import torch

        def encode_or_oom(input_ids, *args, pixel_values=None, **kwargs):
            settings = _armed(ACTOR_OOM_ENV)
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
