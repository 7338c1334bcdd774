"""Shared fixtures: tiny real-format checkpoints and a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes tests/helpers importable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server in server mode; credentials are fakes set for the whole session."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A fresh S3 state per test: (endpoint, storage_options for s3fs, an s3fs filesystem)."""
    import requests
    import s3fs

    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    yield s3_endpoint, options, fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray for the whole session (4 logical CPUs and 2 fake GPUs on any machine); yields its address.

    Ray takes num_gpus without any GPU present: it schedules by the resource and sets
    CUDA_VISIBLE_DEVICES for the actors that reserve one, which is what the placement tests check.

    Fake AWS credentials are set first: Ray's worker processes inherit the environment of the
    process that starts Ray, and s3fs in those workers reads credentials from the standard chain.
    """
    import ray

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # The fault hooks of tests/helpers/actor_faults.py run inside the model actors of runs that ask for
    # them (hooks=FAULTY): Ray's workers import them as helpers.actor_faults, so tests/ goes on their path.
    tests_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    # Armed by a test that creates this file: the next model actor call dies.
    faults = tmp_path_factory.mktemp("faults")
    os.environ["T5G2_FAULT_ACTOR_EXIT_FILE"] = str(faults / "kill-one-actor")
    # The other actor fault hooks, armed the same way (tests/pipeline/test_actor_faults.py).
    os.environ["T5G2_FAULT_ACTOR_EXIT_EVERY_FILE"] = str(faults / "actor-exit-every")
    os.environ["T5G2_FAULT_ACTOR_EXIT_MID_BATCH_FILE"] = str(faults / "actor-exit-mid-batch")
    os.environ["T5G2_FAULT_ACTOR_HANG_FILE"] = str(faults / "actor-hang")
    os.environ["T5G2_FAULT_OOM_FILE"] = str(faults / "oom.json")
    # Model actors record what Ray gave them and run on CPU while this directory exists (test_gpu_placement.py).
    os.environ["T5G2_FAULT_PLACEMENT_DIR"] = str(faults / "placements")
    if not ray.is_initialized():
        # address="local": always a new Ray of our own, never one another process left running
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="warning")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete tiny checkpoint directory (weights, tokenizer.model, configs); see helpers/pipeline_data."""
    from helpers.pipeline_data import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))
