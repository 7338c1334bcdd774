"""GPU actors hold their GPUs: placement on a local Ray with fake GPU resources, on a CPU machine.

The session's Ray (tests/conftest.py) is started with num_gpus=2, which Ray accepts without any
GPU: it schedules by those resources and sets CUDA_VISIBLE_DEVICES for each actor as it would on
real devices. The model cannot go to CUDA here, so the placement probe of tests/helpers/actor_faults.py
(armed by creating the directory its variable names) makes every model actor write down what Ray
gave it (its GPU ids, CUDA_VISIBLE_DEVICES, the device it would use) and run the model on CPU.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import ray

import model
from helpers import actor_faults as fault_hooks
from helpers.checkpoints import tiny_pair
from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from operators.infer import Infer, InferTask
from pipeline import build
from pipeline import run as run_module
from pipeline.spec import JobError, load_job

TASK = """
[[task]]
kind = "summarize"
max_new_tokens = 2
"""


def run_job(spec):
    """A run whose model actors carry the placement probe (FaultyInferActor)."""
    return run_module.run_job(spec, hooks=fault_hooks.FAULTY)


@pytest.fixture
def placements(ray_cluster):
    """Arms the placement probe; yields a function returning the records written so far."""
    probe = Path(os.environ[fault_hooks.PLACEMENT_PROBE_ENV])
    probe.mkdir(exist_ok=True)
    for old in probe.glob("*.json"):
        old.unlink()

    def records() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(probe.glob("*.json"))]

    yield records
    for old in probe.glob("*.json"):
        old.unlink()
    probe.rmdir()


@pytest.fixture
def small_job(tiny_checkpoint, tmp_path):
    rows, _ = mixed_rows(good=8)
    write_inputs(rows[:8], str(tmp_path / "in"), files=2)
    return job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=TASK,
                    rows_per_file=2)


def test_one_gpu_per_actor_gives_each_actor_its_own_device(placements, small_job):
    report = run_job(load_job(small_job, ["resources.gpu_actors=2", "resources.gpus_per_actor=1",
                                          "resources.cpus_per_actor=1"]))
    assert report["complete"]
    seen = {r["pid"]: r for r in placements()}
    assert len(seen) == 2, seen
    devices = sorted(r["cuda_visible_devices"] for r in seen.values())
    assert devices == ["0", "1"], seen
    for r in seen.values():
        assert [str(i) for i in r["ray_gpu_ids"]] == [r["cuda_visible_devices"]]
        assert r["would_use"] == "cuda:0"  # the first (only) device CUDA_VISIBLE_DEVICES leaves visible


def test_half_a_gpu_per_actor_puts_two_actors_on_each_device(placements, small_job):
    report = run_job(load_job(small_job, ["resources.gpu_actors=4", "resources.gpus_per_actor=0.5",
                                          "resources.cpus_per_actor=0.5"]))
    assert report["complete"]
    seen = {r["pid"]: r for r in placements()}
    assert len(seen) == 4, seen
    assert Counter(r["cuda_visible_devices"] for r in seen.values()) == {"0": 2, "1": 2}


def test_a_third_whole_gpu_actor_waits(ray_cluster):
    """The model actors' Ray options reserve their GPUs: on 2 GPUs, a third 1-GPU actor is not placed."""
    options = build.model_actor_options(gpus_per_actor=1, cpus_per_actor=0.1, memory_bytes=1 << 20)
    assert options["num_gpus"] == 1

    @ray.remote
    class Holder:
        def devices(self) -> str:
            return os.environ.get("CUDA_VISIBLE_DEVICES", "")

    actors = [Holder.options(**options).remote() for _ in range(3)]
    try:
        calls = [a.devices.remote() for a in actors]
        ready, waiting = ray.wait(calls, num_returns=3, timeout=8)
        assert len(ready) == 2 and len(waiting) == 1
        assert sorted(ray.get(ready)) == ["0", "1"]
    finally:
        for a in actors:
            ray.kill(a)


def test_too_few_gpus_fails_before_any_work(ray_cluster, small_job, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "_connect", lambda address=None: True)  # as if this run started Ray itself
    with pytest.raises(JobError, match=r"needs 3 GPUs \(3 actor\(s\) x 1\) but the cluster has 2; .*"
                                       r"resources.gpus_per_actor"):
        run_job(load_job(small_job, ["resources.gpu_actors=3", "resources.gpus_per_actor=1",
                                     "resources.cpus_per_actor=0.5"]))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_the_actor_device_follows_what_ray_gave():
    assert build.actor_device(0, gpu_ids=[], cuda_available=False) == "cpu"
    # Ray's CUDA_VISIBLE_DEVICES leaves only the assigned device visible: it is cuda:0 in the actor.
    assert build.actor_device(1, gpu_ids=["3"], cuda_available=True, visible_devices="3") == "cuda:0"
    assert build.actor_device(0.5, gpu_ids=["1"], cuda_available=True, visible_devices="1") == "cuda:0"
    # Where Ray was told not to set it, the assigned id is the device.
    assert build.actor_device(1, gpu_ids=["3"], cuda_available=True, visible_devices=None) == "cuda:3"
    with pytest.raises(RuntimeError, match=r"Ray gave this actor GPU\(s\) \['3'\] .*torch cannot use CUDA"):
        build.actor_device(1, gpu_ids=["3"], cuda_available=False, visible_devices="3")
    with pytest.raises(RuntimeError, match=r"no GPU was assigned"):
        build.actor_device(1, gpu_ids=[], cuda_available=True)


def test_actors_sharing_a_gpu_plan_slots_within_their_share_of_it(tmp_path, monkeypatch):
    """An actor on a fraction of a card plans its decode slots within that share of the card's memory (its
    neighbours use the same free memory); a whole-GPU or CPU actor gets no share (free memory on a GPU, the
    token budget on CPU); Infer hands the share to its Generator. max_batch_tokens stays optional."""
    assert build.actor_memory_share(0.5) == 0.5 and build.actor_memory_share(0.25) == 0.25
    assert build.actor_memory_share(1) is None and build.actor_memory_share(2) is None
    assert build.actor_memory_share(0) is None
    net = tiny_pair(tmp_path / "tiny")[1]
    tasks = [InferTask("s", model.GenerationParams())]
    assert Infer("unused", "float32", "cpu", tasks, model=net, memory_share=0.5).generator.memory_share == 0.5
    # The actor class, built here as Ray would build it on half a GPU (the device stubbed to CPU).
    settings = build.InferSettings(source=str(tmp_path / "tiny"), dtype="float32", tasks=tuple(tasks),
                                   max_batch_tokens=None, storage_options={}, gpus_per_actor=0.5, cpus=1,
                                   call_timeout_s=60)
    monkeypatch.setattr(build.InferActor, "choose_device", staticmethod(lambda gpus: "cpu"))
    actor = build.InferActor(settings)
    assert actor.generator.memory_share == 0.5  # on CPU the token budget still caps its slots:
    assert actor.generator.slot_token_cap == model.generate.DEFAULT_BATCH_TOKENS
    src = tmp_path / "job.toml"
    src.write_text('[model]\nsource = "m"\n[input]\npath = "in/*.parquet"\ntext_column = "text"\n'
                   '[output]\npath = "out/"\n[[task]]\nkind = "summarize"\n')
    assert load_job(str(src)).resources.max_batch_tokens is None
    src.write_text(src.read_text() + "[resources]\nmax_batch_tokens = 8192\n")
    assert load_job(str(src)).resources.max_batch_tokens == 8192
