"""The product path on a GPU machine: the demo's data and random checkpoint, its summarize and caption
jobs run end to end by `pipeline.run` on a local Ray with one model actor on the GPU, every output
checked row by row.

A device session (jobs/device_session.sh) runs it on a box that has torch and transformers but no Ray
and no package index: Ray comes from the `.device` bundle (../shared/device/make-ray-bundle), whose
folder the session carries; summarize and caption need nothing else (translate's language check
would need py3langid). On a machine without CUDA it runs the same jobs on a CPU actor, to try it.

Checked per job, and printed as PASS or FAIL lines (exit 1 on any FAIL):
  - the run completes with one output row per input row, and the error rows are exactly the demo's
    deliberately bad rows, each with its error kind (the demo manifest);
  - every model call ran on the device asked for (the report's `engine.devices`), in the dtype asked
    for, and, on CUDA, decoded compiled with no compile fallback (`engine.decode`, `compile_fallbacks`);
  - the run's wall time, model seconds and tokens per model-second are printed.

Not a benchmark (jobs/bench_gpu.py measures speed) and not a check of the model's numbers (tests/):
the weights are random, so the text is nonsense.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from jobs import demo

JOBS = ("summarize", "caption")


def overrides(job: str, out: Path, cuda: bool) -> list[str]:
    """--set items that move a demo job onto one GPU actor (or keep it on a CPU one), into its own output."""
    where = "cuda" if cuda else "cpu"
    items = [f"output.path={out / ('outputs-' + where) / job}/", "resources.rows_per_call=32"]
    if cuda:
        items += ["resources.gpus_per_actor=1", "model.dtype=bfloat16"]
    return items


def check(job: str, report: dict, manifest: dict, cuda: bool) -> list[tuple[bool, str]]:
    """(passed, what) for every check of one job's run."""
    dataset = next(j.dataset for j in demo.DEMO_JOBS if j.name == job)
    bad = manifest["bad_rows"][dataset]
    table = demo.read_output(Path(report["output"]))
    rows = {row["id"]: row for row in table.to_pylist()}
    kinds = {row_id: row["error_kind"] for row_id, row in rows.items() if row["error_kind"]}
    engine = report["engine"]
    devices = set(engine["devices"])
    device_ok = all(name.startswith("cuda") for name in devices) if cuda else devices == {"cpu"}
    dtype = "bfloat16" if cuda else "float32"
    checks = [
        (report["complete"] and len(rows) == table.num_rows == manifest["datasets"][dataset],
         f"one output row per input row: {table.num_rows} rows for {manifest['datasets'][dataset]} inputs"),
        (kinds == bad, f"error rows are the demo's bad rows with their kinds: {len(kinds)} of {len(bad)} expected"),
        (engine["model_calls"] > 0 and device_ok, f"model calls on {engine['devices']}"),
        (engine["dtypes"].keys() == {dtype}, f"dtype {engine['dtypes']}"),
        (engine["generated_tokens"] == report["output_tokens"] > 0,
         f"{engine['generated_tokens']} tokens generated, {report['output_tokens']} in the rows"),
    ]
    if cuda:
        checks.append((engine["decode"].keys() == {"compiled"} and not engine["compile_fallbacks"],
                       f"decode {engine['decode']}, attention {engine['attention']}, "
                       f"fallbacks {engine['compile_fallbacks'] or 'none'}"))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.device_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/t5g2-device-pipeline", help="where the demo data and outputs go")
    parser.add_argument("--rows", type=int, default=96, help="demo documents (images: one per eight)")
    parser.add_argument("--cpu", action="store_true", help="a CPU actor even when CUDA is there")
    args = parser.parse_args(argv)
    from pipeline.run import run_job  # Ray is imported from here on
    from pipeline.spec import load_job

    cuda = torch.cuda.is_available() and not args.cpu
    out = Path(args.out).resolve()
    started = time.perf_counter()
    manifest = demo.generate(out, rows=args.rows)
    paths = demo.write_job_files(out, max_new_tokens=demo.DEFAULT_MAX_NEW_TOKENS)
    print(f"device pipeline: {'cuda ' + torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}, "
          f"demo data and checkpoint in {time.perf_counter() - started:.1f}s", flush=True)
    failed = 0
    for job in JOBS:
        spec = load_job(paths[job], overrides(job, out, cuda))
        began = time.perf_counter()
        try:
            report = run_job(spec)
        except Exception as exc:  # a failed run is this check's finding, not a crash of the session
            print(f"FAIL {job}: the run raised {type(exc).__name__}: {exc}", flush=True)
            failed += 1
            continue
        engine = report["engine"]
        print(f"{job}: {time.perf_counter() - began:.1f}s wall, {engine['model_seconds']}s in the model, "
              f"{engine['tokens_per_model_second']} tokens per model-second, slot occupancy "
              f"{engine['slot_occupancy']}", flush=True)
        for passed, what in check(job, report, manifest, cuda):
            print(f"{'PASS' if passed else 'FAIL'} {job}: {what}", flush=True)
            failed += not passed
        print("engine " + json.dumps(engine), flush=True)
    print(f"device pipeline: {'all checks passed' if not failed else f'{failed} check(s) failed'} "
          f"in {time.perf_counter() - started:.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
