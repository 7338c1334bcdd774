"""jobs/device_pipeline.py, the device session's pipeline check, on a CPU actor: it passes on a good run
and its checks catch a run whose model calls were not where they were asked to be."""

from __future__ import annotations

import copy
import json

from jobs import device_pipeline


def test_the_device_pipeline_check_passes_on_cpu_and_catches_the_wrong_device(tmp_path, capsys, ray_cluster):
    assert device_pipeline.main(["--cpu", "--out", str(tmp_path), "--rows", "24"]) == 0
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and "all checks passed" in printed
    assert printed.count("PASS summarize") == printed.count("PASS caption") == 5
    manifest = json.loads((tmp_path / "demo-manifest.json").read_text())
    report = json.loads((tmp_path / "outputs-cpu" / "summarize" / "_report.json").read_text())
    assert all(ok for ok, _ in device_pipeline.check("summarize", report, manifest, cuda=False))
    # The same run judged as a GPU run: its calls ran on the CPU, eagerly.
    failed = [what for ok, what in device_pipeline.check("summarize", report, manifest, cuda=True) if not ok]
    assert any("model calls on" in what for what in failed) and any("decode" in what for what in failed)
    lost = copy.deepcopy(manifest)
    lost["datasets"]["docs"] += 1  # an input row without its output row
    assert not all(ok for ok, _ in device_pipeline.check("summarize", report, lost, cuda=False))
