"""Composition and IO: job files (spec.py), tasks (tasks.py), fsspec paths (paths.py), the input and
its units of work (inputs.py), checks before any work (validate.py), the exactly-once commit
(commit.py), the Ray Data plan (build.py), running and resuming (run.py), reports (report.py).

Public entry points: `pipeline.spec.load_job(path_or_text, overrides) -> JobSpec` and
`pipeline.run.run_job(spec, address=None) -> report dict`.

Not here: model math (model/), per-row work on columns (operators/), command lines (jobs/).
"""
