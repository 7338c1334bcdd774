"""transformers' side of `t5g2 bench`: which batch sizes it tries, and which run is kept.

The sweep's rule is tested against a table of run times (real runs' times are noise on a shared
machine); the real runs are in test_bench_gpu.py and `make bench`."""

from __future__ import annotations

from jobs import bench


def test_batch_sizes_halve_and_drop_repeats():
    assert bench.hf_batch_sizes(256, 600) == [256, 128, 64, 32, 16, 8]
    assert bench.hf_batch_sizes(256, 48) == [48, 32, 16, 8]  # 256, 128 and 64 would all be one batch of 48
    assert bench.hf_batch_sizes(256, 4) == [4]
    assert bench.hf_batch_sizes(512, 512)[:3] == [512, 256, 128]


def test_sweep_keeps_the_fastest_and_stops_two_sizes_past_it(monkeypatch):
    seconds = {256: 3.8, 128: 3.1, 64: 3.5, 32: 4.7, 16: 7.1, 8: 2.0}  # 8 is never reached
    ran = []

    def run_hf(ref, requests, batch, device, pad_id, eos_id):
        ran.append(batch)
        return seconds[batch] - 0.01 * ran.count(batch), [[batch]], batch, 0.5

    monkeypatch.setattr(bench, "run_hf", run_hf)
    best, outputs, batch, padding, tried = bench.run_hf_best(None, [], [256, 128, 64, 32, 16, 8], "cpu", 0, [1],
                                                             repeats=3)
    assert tried == [256, 128, 64, 32]
    assert ran == [256, 128, 64, 32, 128, 128]  # then two more runs at the fastest
    assert (batch, outputs) == (128, [[128]]) and best == 3.1 - 0.03
