"""The run report: counts gathered while committing, written as JSON beside the output and printed.

`RunStats` accumulates what each committed unit contributes (rows, errors by kind, tokens, finish
reasons and quality flags per task); `make_report` turns it into the report dict that `run_job`
returns, writes to `<output>/_report.json` and summarizes on stdout. `unit_stats` gives the per-unit counts stored in
a done-marker, so a resumed run can still report totals over the whole output.
`engine_totals` sums the model calls' engine records (operators/infer.py) of a unit's rows into its
done-marker; the report's `engine` says where and how this run's model calls ran, and the summary
warns of every compile failure (which the actors' logs alone would hide).

Not here: what is committed or when (run.py, commit.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from operators import columns as C


def unit_stats(table: pa.Table, output_columns: list[str]) -> dict:
    """Counts of one committed unit: rows, row errors by kind, and per task tokens, reasons and flags."""
    stats = {"rows": table.num_rows, "errors": {}, "tasks": {}}
    kinds = Counter(k for k in table.column(C.ERROR_KIND).to_pylist() if k is not None)
    stats["errors"] = dict(kinds)
    for name in output_columns:
        cols = C.TaskColumns.of(name)
        task_kinds = Counter(k for k in table.column(cols.error_kind).to_pylist() if k is not None)
        generates = cols.finish_reason in table.column_names  # a classify task has neither of these columns
        # num_return_sequences > 1: list columns, counted over every sequence
        flat = (lambda c: pc.list_flatten(c) if pa.types.is_list(c.type) else c)  # noqa: E731
        reasons = Counter(r for r in flat(table.column(cols.finish_reason)).to_pylist() if r is not None) \
            if generates else Counter()
        flagged = Counter()  # outputs per quality flag (a classify task has no flags column)
        if cols.flags in table.column_names:
            flags = table.column(cols.flags)  # list<string>, or list<list<string>> with sequences
            while pa.types.is_list(flags.type):
                flags = pc.list_flatten(flags)  # null lists (error rows) drop out
            flagged = Counter(flags.to_pylist())
        stats["tasks"][name] = {
            "ok": table.num_rows - sum(task_kinds.values()),
            "errors": dict(task_kinds),
            "finish_reasons": dict(reasons),
            "flags": dict(flagged),
            "input_tokens": int(pc.sum(table.column(cols.input_tokens)).as_py() or 0),
            "output_tokens": int(pc.sum(flat(table.column(cols.output_tokens))).as_py() or 0) if generates else 0,
        }
    return stats


ENGINE_SUMS = ("seconds", "generated_tokens", "slot_steps", "slot_tokens", "oom_splits")  # summed as numbers


def engine_totals(records: Iterable[str]) -> dict:
    """Model calls' C.ENGINE records (JSON, infer.Infer.engine_record) -> their sums, as a unit's done-marker
    keeps them: calls per device, dtype, decode mode, attention and compile failure; seconds, tokens, slot-steps."""
    totals: dict = {}
    for text in records:
        record = json.loads(text)
        one = {"calls": 1, "devices": {record["device"]: 1}, "dtypes": {record["dtype"]: 1},
               **{key: record[key] for key in ENGINE_SUMS}}
        if "decode" in record:  # the call decoded
            one["decode"] = {record["decode"]: 1}
            one["attention"] = {record["attention"]: 1}
            if record["compile_fallback"]:
                one["compile_fallbacks"] = {record["compile_fallback"]: 1}
        _add_engine(totals, one)
    return totals


def _add_engine(into: dict, more: dict) -> None:
    """Add engine sums `more` into `into`: numbers add, {name: calls} tables add name by name."""
    for key, value in more.items():
        if isinstance(value, dict):
            table = into.setdefault(key, {})
            for name, calls in value.items():
                table[name] = table.get(name, 0) + calls
        else:
            into[key] = into.get(key, 0) + value


@dataclass
class RunStats:
    """Sums of unit_stats over units."""

    units: int = 0
    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    tasks: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # engine_totals summed (units committed before it have none)

    def add(self, stats: dict) -> None:
        self.units += 1
        self.rows += int(stats.get("rows", 0))
        self.errors.update(stats.get("errors", {}))
        _add_engine(self.engine, stats.get("engine", {}))
        for name, t in stats.get("tasks", {}).items():
            into = self.tasks.setdefault(name, {"ok": 0, "errors": Counter(), "finish_reasons": Counter(),
                                                "flags": Counter(), "input_tokens": 0, "output_tokens": 0})
            into["ok"] += t.get("ok", 0)
            into["errors"].update(t.get("errors", {}))
            into["finish_reasons"].update(t.get("finish_reasons", {}))
            into["flags"].update(t.get("flags", {}))  # absent from the done-markers of units committed before flags
            into["input_tokens"] += t.get("input_tokens", 0)
            into["output_tokens"] += t.get("output_tokens", 0)

    def engine_report(self) -> dict:
        """The report's `engine`: where and how the model calls of this run's committed rows ran."""
        e = self.engine
        seconds = e.get("seconds", 0)
        return {
            "model_calls": e.get("calls", 0),
            "devices": dict(sorted(e.get("devices", {}).items())),
            "dtypes": dict(sorted(e.get("dtypes", {}).items())),
            "decode": dict(sorted(e.get("decode", {}).items())),
            "attention": dict(sorted(e.get("attention", {}).items())),
            "compile_fallbacks": dict(sorted(e.get("compile_fallbacks", {}).items())),
            "model_seconds": round(seconds, 3),
            "generated_tokens": e.get("generated_tokens", 0),
            "tokens_per_model_second": round(e.get("generated_tokens", 0) / seconds, 1) if seconds > 0 else None,
            "slot_occupancy": round(e["slot_tokens"] / e["slot_steps"], 3) if e.get("slot_steps") else None,
            "oom_splits": e.get("oom_splits", 0),
        }

    def as_dict(self) -> dict:
        return {
            "units": self.units,
            "rows": self.rows,
            "errors_by_kind": dict(sorted(self.errors.items())),
            "input_tokens": sum(t["input_tokens"] for t in self.tasks.values()),
            "output_tokens": sum(t["output_tokens"] for t in self.tasks.values()),
            "tasks": {
                name: {"ok": t["ok"], "errors_by_kind": dict(sorted(t["errors"].items())),
                       "finish_reasons": dict(sorted(t["finish_reasons"].items())),
                       "flags": dict(sorted(t["flags"].items())),
                       "input_tokens": t["input_tokens"], "output_tokens": t["output_tokens"]}
                for name, t in self.tasks.items()
            },
        }


def make_report(*, job: str, output: str, run_config_hash: str, provenance: dict, rows_in: int, units_total: int,
                skipped: RunStats, computed: RunStats, wall_seconds: float, compute_seconds: float,
                retracted_units: int = 0, retracted_rows: int = 0, interrupted: str | None = None,
                failed: str | None = None, limit: int | None = None, inputs: dict | None = None,
                duplicate_rows_dropped: int = 0, reused_rows: int = 0, changes: dict | None = None) -> dict:
    """The report of one run. Units are counted three ways: computed by this run, reused (committed by
    an earlier run of the same input) and retracted (outputs of input that changed or is gone, deleted
    at the end of this run); after a complete run the output holds computed + reused units. The rows a
    run writes are computed, or reused: copied from a retracted unit's row of the same input hash
    (incremental.py). `computed` counts the computed rows only; `changes` is incremental.changes_record
    of a complete run.

    Its keys are documented in the README ("The run report"); tests/pipeline/test_report_schema.py
    checks that the documented keys are exactly these."""
    this_run = computed.as_dict()
    return {
        "job": job,
        "output": output,
        "run_config_hash": run_config_hash,
        "model_source": provenance.get(C.MODEL_SOURCE),
        "model_revision": provenance.get(C.MODEL_REVISION),
        "complete": interrupted is None and failed is None and skipped.rows + computed.rows + reused_rows == rows_in,
        "interrupted": interrupted,  # the signal that stopped the run (SIGINT, SIGTERM), or None
        "failed": failed,  # why the run stopped when something failed under it, or None
        "limit": limit,  # `t5g2 run --limit N`: only the first N rows, in an output of their own; else None
        # What the run read: the input paths as written, the files listed, and a fingerprint of their
        # identities (inputs.inputs_fingerprint) that `t5g2 status` compares with the input as it is now;
        # `storage` is the job's [storage] tables (never credentials), to list the input again.
        "inputs": inputs or {"paths": [], "files": 0, "fingerprint": None, "storage": {}},
        "rows_in": rows_in,
        "rows_out": computed.rows + reused_rows,  # rows written by this run: computed + reused
        "rows_computed": computed.rows,  # rows the model computed in this run
        "rows_reused": reused_rows,  # rows written with the result of an earlier run's row of the same input hash
        "rows_skipped": skipped.rows,  # rows already committed by earlier runs (not recomputed)
        "rows_committed_total": skipped.rows + computed.rows + reused_rows,
        # rows new / changed / unchanged / removed since the last complete run (None until this run completes)
        "changes": (changes or {}).get("rows"),
        "units_total": units_total,
        "units_reused": skipped.units,
        "units_computed": computed.units,
        "units_retracted": retracted_units,  # with their rows_retracted rows
        "rows_retracted": retracted_rows,
        "errors_by_kind": this_run["errors_by_kind"],
        "input_tokens": this_run["input_tokens"],
        "output_tokens": this_run["output_tokens"],
        "tasks": this_run["tasks"],
        "rows_per_second": round(computed.rows / compute_seconds, 3) if compute_seconds > 0 else None,
        "wall_seconds": round(wall_seconds, 3),
        "all_runs": {"errors_by_kind": _merge(skipped, computed)},
        "duplicate_rows_dropped": duplicate_rows_dropped,  # second copies of rows (retried Ray tasks), dropped
        "engine": computed.engine_report(),
    }


def _merge(a: RunStats, b: RunStats) -> dict:
    total = Counter(a.errors)
    total.update(b.errors)
    return dict(sorted(total.items()))


def summary(report: dict) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in report["errors_by_kind"].items()) or "none"
    rate = f"{report['rows_per_second']:.1f} rows/s" if report["rows_per_second"] else "-"
    flagged = "; ".join(f"{name} " + ", ".join(f"{flag} {n}" for flag, n in task["flags"].items())
                        for name, task in report["tasks"].items() if task.get("flags"))
    lines = [
        f"Job {report['job']} -> {report['output']}",
        f"  rows in {report['rows_in']}, written now {report['rows_out']}"
        + (f" ({report['rows_reused']} reused from earlier output)" if report["rows_reused"] else "")
        + f", already done {report['rows_skipped']} "
        f"({report['units_computed']} computed + {report['units_reused']} reused of {report['units_total']} units"
        + (f"; {report['units_retracted']} retracted, {report['rows_retracted']} rows of changed or removed input"
           if report["units_retracted"] else "") + ")"
        + ("" if report["complete"] else "  INCOMPLETE"),
        f"  errors this run: {errors}",
        *(["  changes since the last complete run: " + ", ".join(f"{k} {v}" for k, v in report["changes"].items())]
          if report["changes"] else []),
        *([f"  flagged outputs this run: {flagged}"] if flagged else []),
        f"  tokens in {report['input_tokens']}, out {report['output_tokens']}; {rate}; "
        f"wall {report['wall_seconds']:.1f}s",
        *_engine_lines(report.get("engine")),
    ]
    return "\n".join(lines)


def _engine_lines(engine: dict | None) -> list[str]:
    """The summary's engine line, and a warning line per compile failure (a silent slowdown otherwise: the
    actor decodes the fallback way from there, and only its own log said so)."""
    if not engine or not engine["model_calls"]:
        return []
    names = lambda table: ", ".join(f"{name} {calls}" for name, calls in table.items())  # noqa: E731
    line = (f"  engine: {engine['model_calls']} model calls on {names(engine['devices'])} "
            f"({names(engine['dtypes'])}); {engine['model_seconds']:.1f} model-s")
    if engine["decode"]:
        line += (f"; decode {names(engine['decode'])}, attention {names(engine['attention'])}; "
                 f"{engine['generated_tokens']} tokens, {engine['tokens_per_model_second']} per model-s")
        if engine["slot_occupancy"] is not None:
            line += f", slot occupancy {engine['slot_occupancy']:.2f}"
    if engine["oom_splits"]:
        line += f"; {engine['oom_splits']} out-of-memory splits"
    # A failure stays with its actor: every later call of it decodes the fallback way and carries the reason.
    warnings = [f"  WARNING: compiling the decode step failed ({reason}); {calls} model call(s) decoded after it "
                f"eagerly, or with compiled SDPA steps where FlexAttention failed: same tokens, slower"
                for reason, calls in engine["compile_fallbacks"].items()]
    return [line, *warnings]
