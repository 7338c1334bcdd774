"""The run report's counts of quality flags: per unit (done-markers), summed over units, in the
report and in the summary line; the model calls' engine records, summed the same way."""

from __future__ import annotations

import json

import pyarrow as pa

from operators import columns as C
from pipeline import report as reports

FLAGS = pa.list_(pa.string())


def unit(summary_flags, answer_flags) -> pa.Table:
    """A committed unit with a one-sequence task (summary), a two-sequence task (answer) and a classify task."""
    rows = len(summary_flags)
    return pa.table({
        C.ERROR_KIND: pa.array([None] * rows, pa.string()),
        "summary_error_kind": pa.array([None] * rows, pa.string()),
        "summary_finish_reason": pa.array(["length"] * rows, pa.string()),
        "summary_input_tokens": pa.array([5] * rows, pa.int32()),
        "summary_output_tokens": pa.array([9] * rows, pa.int32()),
        "summary_flags": pa.array(summary_flags, FLAGS),
        "answer_error_kind": pa.array([None] * rows, pa.string()),
        "answer_finish_reason": pa.array([["eos", "eos"]] * rows, pa.list_(pa.string())),
        "answer_input_tokens": pa.array([5] * rows, pa.int32()),
        "answer_output_tokens": pa.array([[2, 2]] * rows, pa.list_(pa.int32())),
        "answer_flags": pa.array(answer_flags, pa.list_(FLAGS)),
        "topic_error_kind": pa.array([None] * rows, pa.string()),
        "topic_input_tokens": pa.array([5] * rows, pa.int32()),
    })


def report_of(computed: reports.RunStats) -> dict:
    return reports.make_report(job="j", output="/o", run_config_hash="h", provenance={}, rows_in=computed.rows,
                               units_total=computed.units, skipped=reports.RunStats(), computed=computed,
                               wall_seconds=1, compute_seconds=1)


def test_flags_are_counted_per_output_and_summed_over_units():
    tasks = ["summary", "answer", "topic"]
    first = reports.unit_stats(unit([["max_new_tokens", "repetition"], [], None],
                                    [[["empty"], []], [["empty"], ["repetition"]], None]), tasks)
    assert first["tasks"]["summary"]["flags"] == {"max_new_tokens": 1, "repetition": 1}
    assert first["tasks"]["answer"]["flags"] == {"empty": 2, "repetition": 1}  # every sequence counts
    assert first["tasks"]["topic"]["flags"] == {}  # a classify task has no flags
    second = reports.unit_stats(unit([["repetition"]], [[[], []]]), tasks)
    old = {"rows": 1, "errors": {}, "tasks": {"summary": {"ok": 1, "errors": {}, "finish_reasons": {"eos": 1},
                                                          "input_tokens": 1, "output_tokens": 1}}}
    computed = reports.RunStats()
    for stats in (first, second, old):  # a done-marker written before flags has none
        computed.add(stats)
    report = report_of(computed)
    assert report["tasks"]["summary"]["flags"] == {"max_new_tokens": 1, "repetition": 2}
    assert report["tasks"]["answer"]["flags"] == {"empty": 2, "repetition": 1}
    line = reports.summary(report)
    assert "flagged outputs this run: summary max_new_tokens 1, repetition 2; answer empty 2, repetition 1" in line
    clean = reports.RunStats()
    clean.add(reports.unit_stats(unit([[]], [[[], []]]), tasks))
    assert "flagged" not in reports.summary(report_of(clean))


def test_model_call_records_are_summed_per_unit_and_over_units_and_warn_of_compile_failures():
    def call(seconds, tokens, decode=None, fallback=None, device="cpu"):
        record = {"device": device, "dtype": "float32", "seconds": seconds, "generated_tokens": tokens,
                  "slot_steps": 2 * tokens, "slot_tokens": tokens, "oom_splits": 0}
        if decode:  # the call decoded (a scoring-only call has no decode fields)
            record.update(decode=decode, attention="sdpa", compile_fallback=fallback)
        return json.dumps(record)

    reason = "BackendCompilerFailed: boom"
    first = reports.engine_totals([call(1.5, 30, "compiled"), call(0.5, 10, "eager", reason)])
    second = reports.engine_totals([call(1.0, 0), call(2.0, 60, "compiled", device="cuda NVIDIA H200")])
    assert first["calls"] == 2 and first["decode"] == {"compiled": 1, "eager": 1}
    assert first["compile_fallbacks"] == {reason: 1} and "compile_fallbacks" not in second
    computed = reports.RunStats()
    for engine in (first, second, {}):  # a unit committed before engine records has none
        computed.add({"rows": 1, "errors": {}, "tasks": {}, **({"engine": engine} if engine else {})})
    engine = report_of(computed)["engine"]
    assert engine["model_calls"] == 4 and engine["devices"] == {"cpu": 3, "cuda NVIDIA H200": 1}
    assert engine["decode"] == {"compiled": 2, "eager": 1} and engine["attention"] == {"sdpa": 3}
    assert engine["model_seconds"] == 5.0 and engine["generated_tokens"] == 100
    assert engine["tokens_per_model_second"] == 20.0 and engine["slot_occupancy"] == 0.5
    assert engine["compile_fallbacks"] == {reason: 1}
    lines = reports.summary(report_of(computed)).splitlines()
    assert any(line.startswith("  engine: 4 model calls on cpu 3, cuda NVIDIA H200 1") for line in lines)
    assert any("WARNING" in line and reason in line and "1 model call" in line for line in lines)
    nothing = report_of(reports.RunStats())["engine"]
    assert nothing["model_calls"] == 0 and nothing["slot_occupancy"] is None
    assert "engine:" not in reports.summary(report_of(reports.RunStats()))
