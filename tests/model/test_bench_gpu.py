"""`make bench-gpu` (jobs/bench_gpu.py) on CPU at the tiny shape, so that the device check cannot rot:
it runs with Ray unimportable and the network cut, and prints one line per workload."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs import bench_gpu

ROOT = Path(__file__).resolve().parents[2]

# Run as a bare GPU box would: no Ray, no network (any connection attempt raises).
PRELUDE = """
import runpy, socket, sys
sys.modules["ray"] = None  # import ray -> ImportError
def _cut(*args, **kwargs):
    raise OSError("network access attempted (cut by the test)")
socket.socket.connect = _cut
socket.create_connection = _cut
sys.argv = ["bench-gpu", *sys.argv[1:]]
runpy.run_module("jobs.bench_gpu", run_name="__main__")
"""


def test_bench_gpu_runs_on_cpu_without_ray_or_network():
    args = ["--shape", "tiny", "--rows", "4", "--repeats", "1", "--workloads", "summarize,caption,longtail"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PRELUDE, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()}
    for workload in ("summarize", "caption", "longtail"):
        line = lines[workload]
        assert re.search(r"ours +[\d.]+ tok/s +hf +[\d.]+ tok/s", line), line
        assert "same greedy rows 4/4" in line, line  # float32 on CPU: our tokens are transformers'
        assert int(re.search(r"kernels/step (\d+)", line).group(1)) > 0, line
        assert "fallback none" in line, line
        assert 0 < float(re.search(r"slot occupancy ([\d.]+)", line).group(1)) <= 1, line
        assert float(re.search(r"rows/s ([\d.]+)", line).group(1)) > 0, line
        encoder, whole, share = map(float, re.search(r"encoder ([\d.]+) of ([\d.]+) s \((\d+)%\)", line).groups())
        assert 0 < encoder < whole and 0 < share < 100, line
        assert "attention sdpa" in line, line  # eager on CPU: SDPA
    other = lines["attention"]  # longtail once more with the other attention, ours only
    assert re.search(r"attention flex +longtail ours +[\d.]+ tok/s", other) and "fallback none" in other, other
    encoder = lines["encoder"]  # summarize once more with the encoder's halves compiled (eager is the default)
    assert re.search(r"encoder compiled +summarize ours +[\d.]+ tok/s", encoder), encoder
    assert "rows as the default's 4/4" in encoder and "fallback none" in encoder, encoder
    assert "bench-gpu: done" in proc.stdout


def test_a_failing_workload_is_reported_and_the_rest_still_run(capsys):
    failed: list[str] = []

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")

    assert bench_gpu.run_guarded("caption", broken, failed, torch.device("cpu")) is None
    assert bench_gpu.run_guarded("longtail", lambda: 42, failed, torch.device("cpu")) == 42
    out = capsys.readouterr()
    assert failed == ["caption"]
    assert "caption FAILED after 0 s: RuntimeError: CUDA error: an illegal memory access" in out.out
    assert "Traceback" in out.err and "illegal memory access" in out.err


def test_time_budget_skips_the_workloads_not_started(capsys):
    now = time.perf_counter()
    assert not bench_gpu.budget_spent(now, 60, "summarize")
    assert bench_gpu.budget_spent(now - 61, 60, "translate")
    assert capsys.readouterr().out.startswith("translate skipped: 61 s of the 60 s budget spent")


def test_unknown_workload_fails_before_any_weights(capsys):
    with pytest.raises(SystemExit) as exit:
        bench_gpu.main(["--shape", "tiny", "--workloads", "summarize,sumarize"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--workloads: unknown sumarize; choose from summarize, translate, caption, longtail" in err


def test_isolated_workloads_run_in_processes_of_their_own_and_a_failing_one_is_reported():
    """--isolate (the default on CUDA): each workload in a child process, so a fatal device error costs one;
    a child that exits with an error is named in the parent's FAILED line and the exit status."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "jobs.bench_gpu", "--shape", "tiny", "--rows", "2", "--repeats", "1",
            "--workloads", "summarize,translate", "--isolate", "on"]
    good = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stderr[-3000:]
    assert good.stdout.count("bench-gpu: weights ready") == 2  # one build per child
    assert re.search(r"^summarize .* ours", good.stdout, re.M) and re.search(r"^translate .* ours", good.stdout, re.M)
    assert "each workload in its own process" in good.stdout.splitlines()[-1]
    bad = subprocess.run([*base, "--max-batch-tokens", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 1
    assert "summarize FAILED: its process exited" in bad.stdout and "translate FAILED: its process" in bad.stdout
    assert "FAILED: summarize, translate" in bad.stdout.splitlines()[-1]
