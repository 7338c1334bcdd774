"""The run report's JSON schema as the README documents it is the one make_report writes: the table
cannot rot. (A real run's report is checked the same way in tests/jobs/test_run_process.py.)"""

from __future__ import annotations

import pyarrow as pa

from helpers.report_schema import documented_keys, report_keys
from operators import columns as C
from pipeline import report as reports


def test_the_documented_report_keys_are_the_reports_keys():
    table = pa.table({
        C.ERROR_KIND: pa.array([None, "text_empty"], pa.string()),
        "summary_error_kind": pa.array([None, "text_empty"], pa.string()),
        "summary_finish_reason": pa.array(["eos", None], pa.string()),
        "summary_input_tokens": pa.array([7, None], pa.int32()),
        "summary_output_tokens": pa.array([3, None], pa.int32()),
        "summary_flags": pa.array([["max_new_tokens"], None], pa.list_(pa.string())),
    })
    computed = reports.RunStats()
    computed.add(reports.unit_stats(table, ["summary"]))
    report = reports.make_report(
        job="job.toml", output="/out", run_config_hash="h", provenance={}, rows_in=2, units_total=1,
        skipped=reports.RunStats(), computed=computed, wall_seconds=1.0, compute_seconds=1.0,
        inputs={"paths": ["/in/*.parquet"], "files": 1, "fingerprint": "f", "storage": {}},
        changes={"generation": 1, "rows": {"new": 2, "changed": 0, "unchanged": 0, "removed": 0}})
    documented = documented_keys()
    assert documented and report_keys(report) == documented
    assert "tasks.<column>.finish_reasons" in documented and "all_runs.errors_by_kind" in documented
    assert "tasks.<column>.flags" in documented
    # The default inputs record (no input known) has the same keys as a real one.
    bare = reports.make_report(job="j", output="/o", run_config_hash="h", provenance={}, rows_in=0, units_total=0,
                               skipped=reports.RunStats(), computed=reports.RunStats(), wall_seconds=0,
                               compute_seconds=0)
    assert set(bare["inputs"]) == set(report["inputs"])
