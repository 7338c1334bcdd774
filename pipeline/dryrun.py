"""The dry run: what a job would read, compute and cost, before any model work.

`dry_run(spec, limit=None, sample_rows=512)` (the command line's `t5g2 run JOB.toml --dry-run`):

  1. validates the job exactly as `run_job` does (validate.validate: the same JobErrors, before any
     work; like a run's validation it writes and deletes one probe object in the output, and writes
     nothing else), and applies `--limit` as a run would (run.limited_spec, run.apply_limit);
  2. counts what the output already holds as a run counts it: the done-markers of the units of the
     current input are reused, the others would be computed, markers of units the input no longer
     has would be retracted; where there are such, the new units' rows are hashed as a run hashes
     them (incremental.plan_reuse: one read of their input columns), so rows a run would reuse by
     content are not priced, and their new / changed / unchanged counts are given;
  3. reads a bounded sample of rows spread over the files: at most `sample_rows` rows, at least
     MIN_PER_FILE from each file sampled (files spread evenly over the listing when there are more
     than sample_rows / MIN_PER_FILE), the rows of a file spread over its row groups, each group read
     from its head through its first pages only (a row group's tail is never read), only the columns
     the job reads, from the same fsspec filesystems the run uses;
  4. puts those rows through the run's own read and prepare stages (build.read_stage and the Prepare
     that build.build_prepare makes from run.make_plan's settings): the same column policy, prompt
     templates, tokenizer, image checks and long-input rule, so every sampled row gets the prompt or
     the error it would get in the run. The rows are first written to a small local Parquet file per
     input file, with that file's own columns, so the read stage sees them as it would see the file;
  5. tokenizes the rows once more without the token limit, for the histogram of prompt lengths and
     the count of prompts over input.max_input_tokens;
  6. prices the work left (estimate.py): prompt tokens from the sample's mean, output tokens as rows
     x max_new_tokens (an upper bound), and a typical output length when the output's committed
     units measured one, from a calibration of the engine (the table in docs/perf.md, or one timed
     now with `--calibrate`).

No Ray is started or joined and no model weights are read (the checkpoint's config, safetensors
headers and tokenizer are, as validation reads them).

Not here: running the job (run.py), the cost model and its calibrations (estimate.py).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from operators import columns as C

from . import build, estimate, incremental
from .inputs import InputFile, Unit
from .paths import StorageError, open_fs
from .run import apply_limit, limited_spec, make_plan, read_columns
from .spec import JobError, JobSpec
from .validate import validate

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_ROWS = 512
MIN_PER_FILE = 4  # rows taken from each file sampled
CONTEXT_TOKENS = 131_072  # the model's context (128K): the histogram's last bucket is "more than this"
READ_BUFFER = 1 << 20  # bytes read ahead per column while sampling: the first pages of a row group only
PREPARE_ROWS = 32  # sampled rows per prepare call (bounds the decoded images held at once)


# ---- which rows ----------------------------------------------------------------------------


def sample_plan(files: list[InputFile], sample_rows: int) -> dict[int, int]:
    """File index -> rows to sample there: files spread evenly over the listing, MIN_PER_FILE or more
    rows each (never more than the file has), `sample_rows` at most in all."""
    files_with_rows = [i for i, f in enumerate(files) if f.num_rows > 0]
    if not files_with_rows or sample_rows <= 0:
        return {}
    most_files = max(1, sample_rows // MIN_PER_FILE)
    if len(files_with_rows) > most_files:
        step = len(files_with_rows) / most_files
        files_with_rows = [files_with_rows[int(k * step)] for k in range(most_files)]
    per_file = max(MIN_PER_FILE, sample_rows // len(files_with_rows))
    plan, left = {}, sample_rows
    for i in files_with_rows:
        take = min(per_file, files[i].num_rows, left)
        if take > 0:
            plan[i] = take
            left -= take
    return plan


def _row_groups_to_read(group_rows: list[int], num_rows: int, take: int) -> list[tuple[int, int]]:
    """(row group, rows from its head) for `take` positions spread evenly over the first `num_rows` rows."""
    starts, offset = [], 0
    for n in group_rows:
        starts.append(offset)
        offset += n
    wanted: dict[int, int] = {}
    for k in range(take):
        position = int((k + 0.5) * num_rows / take)
        group = max(g for g, s in enumerate(starts) if s <= position)
        wanted[group] = wanted.get(group, 0) + 1
    # Within the limit (`num_rows` may be less than the file's rows under --limit) and the group.
    return [(g, min(n, group_rows[g], num_rows - starts[g])) for g, n in sorted(wanted.items())]


def read_sample(f: InputFile, take: int, columns: list[str], options: dict) -> pa.Table:
    """`take` rows of file `f`, spread over its row groups, each group read from its head (iter_batches
    with a read buffer, so only its first pages are fetched); only `columns` that the file has."""
    fs, p = open_fs(f.uri, options)
    try:
        with fs.open(p, "rb") as handle:
            parquet = pq.ParquetFile(handle, buffer_size=READ_BUFFER)
            meta = parquet.metadata
            present = [c for c in columns if c in parquet.schema_arrow.names]
            schema = pa.schema([parquet.schema_arrow.field(c) for c in present])
            pieces = []
            for group, rows in _row_groups_to_read([meta.row_group(g).num_rows for g in range(meta.num_row_groups)],
                                                   f.num_rows, take):
                batches = parquet.iter_batches(batch_size=rows, row_groups=[group], columns=present,
                                               use_threads=False)
                pieces.append(pa.Table.from_batches([next(batches)]).slice(0, rows))
            return pa.concat_tables(pieces) if pieces else schema.empty_table()
    except (OSError, pa.ArrowException, StopIteration) as exc:
        raise StorageError(f"cannot read a sample of input file {f.uri!r} ({type(exc).__name__}: {exc}); check that "
                           f"the store is reachable and the file readable") from exc


# ---- what the run's stages make of them ----------------------------------------------------


def _read_columns(read_settings) -> list[str]:
    """The input columns the run's read stage takes (its ReadSettings: id, text, image, and the extra
    columns of prompt fields, labels and keep_columns): only these are sampled."""
    named = [c for c in read_settings.columns.values() if c] + [e.column for e in read_settings.extra]
    return list(dict.fromkeys(named))


def prepared_sample(v, plan_files: dict[int, int], files: list[InputFile], prepare_settings,
                    read_settings) -> tuple[list[pa.Table], list[pa.Table], dict]:
    """The sampled rows through the run's read and prepare stages: (prepared batches as the run
    prepares them, the same rows prepared without the token limit, facts about the raw sample)."""
    spec = v.spec
    options = spec.storage_options(spec.input.paths[0])
    columns = _read_columns(read_settings)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(plan_files)))) as pool:
        tables = dict(zip(plan_files, pool.map(lambda i: read_sample(files[i], plan_files[i], columns, options),
                                               plan_files)))
    prepare = build.build_prepare(prepare_settings)
    unbounded = build.build_prepare(replace(prepare_settings, max_input_tokens=max(CONTEXT_TOKENS,
                                                                                   spec.input.max_input_tokens),
                                            long_input="error"))
    local_read = replace(read_settings, storage_options={})  # the sample files are local
    as_run, without_limit = [], []
    image_bytes = []
    with tempfile.TemporaryDirectory(prefix="t5g2-dry-run-") as scratch:
        for i, table in tables.items():
            if spec.input.image_column and spec.input.image_column in table.column_names:
                image_bytes += _image_sizes(table.column(spec.input.image_column))
            path = os.path.join(scratch, f"sample-{i}.parquet")
            pq.write_table(table, path)
            unit = Unit(key="dry-run", uri=path, start=0, stop=table.num_rows)
            blocks = list(build.read_stage(pa.Table.from_pylist([unit.to_item()]), settings=local_read))
            rows = _renamed(pa.concat_tables(blocks), path, files[i].uri) if blocks else None
            if rows is None:
                continue
            for start in range(0, rows.num_rows, PREPARE_ROWS):
                batch = rows.slice(start, PREPARE_ROWS)
                prepared = prepare(batch)
                # Only the prompts and errors are kept: the decoded pixels of a few hundred images would
                # hold gigabytes at 896 px.
                as_run.append(_prompts_only(prepared, prepare_settings))
                without_limit.append(_prompts_only(_unbounded(unbounded, batch, prepared, prepare_settings),
                                                   prepare_settings))
    return as_run, without_limit, {"image_bytes": image_bytes}


def _prompts_only(prepared: pa.Table, settings) -> pa.Table:
    """The prompt ids and error kind of each task (and a classify task's candidates' ids). A row split
    into pieces (long_input = "chunk") counts as its pieces' prompts end to end: the prompt tokens its
    pieces send (the prompts that join their outputs, and the pieces' own outputs, are not counted)."""
    names = []
    for t in settings.tasks:
        cols = C.TaskColumns.of(t.output_column)
        names += [cols.prompt_ids, cols.error_kind] + ([cols.candidates] if t.classify else [])
        if cols.chunk_prompts in prepared.column_names:
            ids = prepared.column(cols.prompt_ids).to_pylist()
            pieces = prepared.column(cols.chunk_prompts).to_pylist()
            joined = [[t for p in split for t in p] if split else own for own, split in zip(ids, pieces)]
            prepared = prepared.set_column(prepared.column_names.index(cols.prompt_ids), cols.prompt_ids,
                                           pa.array(joined, prepared.schema.field(cols.prompt_ids).type))
    return prepared.select(names)


def _renamed(table: pa.Table, scratch_uri: str, uri: str) -> pa.Table:
    """Messages the read stage wrote about the scratch copy name the real input file instead."""
    for name in (C.TEXT_ERROR_MESSAGE, C.IMAGE_ERROR_MESSAGE):
        if name in table.column_names:
            values = [None if m is None else m.replace(scratch_uri, uri) for m in table.column(name).to_pylist()]
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))
    return table


def _image_sizes(column: pa.ChunkedArray) -> list[int]:
    from .inputs import image_bytes

    try:
        return [len(b) for b in image_bytes(column).to_pylist() if b]
    except (pa.ArrowException, TypeError):
        return []  # a column of an unusable type: its rows are column_type errors


def _unbounded(unbounded, batch: pa.Table, prepared: pa.Table, settings) -> pa.Table:
    """Prompt ids of `batch` without the token limit, for the rows whose prompt may have met it (a prompt
    well under the limit was never cut, so its ids are the run's); the others are copied."""
    limit = settings.max_input_tokens
    near = set()
    for task in settings.tasks:
        cols = C.TaskColumns.of(task.output_column)
        kinds = prepared.column(cols.error_kind).to_pylist()
        for r, ids in enumerate(prepared.column(cols.prompt_ids).to_pylist()):
            if kinds[r] == "text_too_long" or (ids is not None and len(ids) >= limit // 2):
                near.add(r)
    if not near:
        return prepared
    again = unbounded(batch.take(pa.array(sorted(near), pa.int64())))
    position = {r: k for k, r in enumerate(sorted(near))}
    out = prepared
    for task in settings.tasks:
        cols = C.TaskColumns.of(task.output_column)
        for name in (cols.prompt_ids, cols.error_kind):
            values = prepared.column(name).to_pylist()
            redo = again.column(name).to_pylist()
            for r, k in position.items():
                values[r] = redo[k]
            out = out.set_column(out.column_names.index(name), name, pa.array(values, prepared.schema.field(name).type))
    return out


# ---- the figures ---------------------------------------------------------------------------


def histogram_edges(limit: int) -> list[int]:
    """Bucket upper bounds: powers of two from 16 to the model's context, and max_input_tokens itself."""
    edges = {2 ** k for k in range(4, int(math.log2(CONTEXT_TOKENS)) + 1)} | {limit}
    return sorted(e for e in edges if e <= max(CONTEXT_TOKENS, limit))


def histogram(lengths: list[int], edges: list[int]) -> list[dict]:
    """[{"up_to": edge, "rows": n}] for the non-empty buckets, and {"up_to": None} for longer prompts."""
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        counts[next((k for k, e in enumerate(edges) if n <= e), len(edges))] += 1
    return [{"up_to": edges[k] if k < len(edges) else None, "rows": c} for k, c in enumerate(counts) if c]


def _quantile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _typical_output(done: dict[str, dict], column: str) -> tuple[float | None, int]:
    """Mean output tokens per ok row of a task over the output's committed units, and the rows it rests on."""
    ok = tokens = 0
    for stats in done.values():
        task = (stats.get("tasks") or {}).get(column) or {}
        ok += int(task.get("ok", 0))
        tokens += int(task.get("output_tokens", 0))
    return (tokens / ok, ok) if ok else (None, 0)


def dry_run(spec: JobSpec, *, limit: int | None = None, sample_rows: int = DEFAULT_SAMPLE_ROWS,
            calibration: estimate.Calibration | None = None) -> dict:
    """Validate, count, sample, tokenize and price a job, as described above; returns the figures
    (summary() prints them). Raises JobError for a job that cannot run, as run_job would."""
    if limit is not None:
        if limit < 1:
            raise JobError(f"--limit must be a number of rows >= 1, got {limit}")
        spec = limited_spec(spec)
    v = apply_limit(validate(spec), limit)
    files = list(v.files)
    done = v.store.done()
    plan_keys = {u.key for u in v.units}
    todo = [u for u in v.units if u.key not in done]
    retract = [k for k in done if k not in plan_keys]
    rows_total = sum(f.num_rows for f in files)
    # What a run would reuse by content (incremental.py): with units to retract, the new units are hashed
    # as a run hashes them (one read of their input columns); without, there is nothing to reuse.
    generation, counted = incremental.generation_of(v.store)
    reuse = incremental.plan_reuse(v.store, todo, set(retract), incremental.ReadSpec(
        columns=read_columns(spec), storage_options=spec.storage_options(spec.input.paths[0]), extra=v.extra),
        generation, counted, load=False)
    rows_todo = reuse.rows_to_compute

    plan = make_plan(v, todo or list(v.units))
    chosen = sample_plan(files, sample_rows)
    as_run, without_limit, raw = prepared_sample(v, chosen, files, plan.prepare, plan.read)
    sampled = sum(t.num_rows for t in as_run)
    checkpoint = v.checkpoint
    cost = estimate.model_cost(checkpoint.config)
    limit_tokens = spec.input.max_input_tokens
    edges = histogram_edges(limit_tokens)

    tasks, work = [], estimate.Work(rows=rows_todo, prompt_tokens=0.0, decode_tokens=0.0, images=0.0)
    typical_known = True
    typical_decode = 0.0
    for t in spec.tasks:
        cols = C.TaskColumns.of(t.output_column)
        kinds = [k for table in as_run for k in table.column(cols.error_kind).to_pylist()]
        ids = [x for table in as_run for x in table.column(cols.prompt_ids).to_pylist()]
        true_ids = [x for table in without_limit for x in table.column(cols.prompt_ids).to_pylist()]
        true_kinds = [k for table in without_limit for k in table.column(cols.error_kind).to_pylist()]
        lengths = [len(x) for x in ids if x is not None]
        # A prompt's length without the limit; one the unlimited pass still refused is past the context.
        true_lengths = [len(x) if x is not None else CONTEXT_TOKENS + 1
                        for x, k, k0 in zip(true_ids, true_kinds, kinds)
                        if x is not None or k == "text_too_long" or k0 == "text_too_long"]
        over = sum(n > limit_tokens for n in true_lengths)
        errors: dict[str, int] = {}
        for k in kinds:
            if k is not None:
                errors[k] = errors.get(k, 0) + 1
        ok_share = len(lengths) / sampled if sampled else 0.0
        rows_ok = rows_todo * ok_share
        mean_prompt = statistics.fmean(lengths) if lengths else 0.0
        work = replace(work, prompt_tokens=work.prompt_tokens + rows_ok * mean_prompt,
                       images=work.images + (rows_ok if t.uses_image else 0.0))
        g = t.generation
        if g is None:  # classify: nothing is generated; every candidate is scored in one decoder pass
            candidates = [c for table in as_run for c in table.column(cols.candidates).to_pylist() if c is not None]
            scored = statistics.fmean(sum(len(c) + 1 for c in row) for row in candidates) if candidates else 0.0
            work = replace(work, scored_tokens=work.scored_tokens + rows_ok * scored)
            sequences, typical, typical_rows = 1, None, 0
        else:
            sequences = g.num_return_sequences
            work = replace(work, decode_tokens=work.decode_tokens
                           + rows_ok * g.max_new_tokens * max(g.num_beams, sequences))
            typical, typical_rows = _typical_output(done, t.output_column)
            if typical is None:
                typical_known = False
            else:
                typical_decode += rows_ok * typical / sequences * max(g.num_beams, sequences)
        tasks.append({
            "output_column": t.output_column, "kind": t.kind,
            "sampled_rows": sampled, "sampled_ok": len(lengths), "sampled_errors_by_kind": dict(sorted(errors.items())),
            "prompt_tokens": {"mean": round(mean_prompt, 1), "p50": _quantile(lengths, 0.5),
                              "p90": _quantile(lengths, 0.9), "p99": _quantile(lengths, 0.99),
                              "max": max(lengths) if lengths else None},
            "histogram": histogram(true_lengths, edges),
            "over_max_input_tokens": over,
            "long_input": spec.input.long_input,
            "uses_image": t.uses_image,
            "max_new_tokens": g.max_new_tokens if g else None,
            "num_return_sequences": sequences,
            "num_beams": g.num_beams if g else None,
            "scored_tokens_per_row": None if g else round(scored, 1),  # classify: candidates x (label tokens + EOS)
            "rows_to_compute": round(rows_ok),
            "prompt_tokens_to_compute": round(rows_ok * mean_prompt),
            "output_tokens_upper_bound": round(rows_ok * g.max_new_tokens * sequences) if g else 0,
            "output_tokens_per_row_typical": round(typical, 2) if typical is not None else None,
            "typical_measured_on_rows": typical_rows,
            "output_tokens_typical": round(rows_ok * typical) if typical is not None else None,
        })
    if typical_known and spec.tasks:
        work = replace(work, decode_tokens_typical=typical_decode)

    images = None
    if any(t.uses_image for t in spec.tasks):
        image_kinds = {"image_missing", "image_decode", "image_format", "image_too_large"}
        image_tasks = [t for t in tasks if t["uses_image"]]
        bad = {k: n for k, n in image_tasks[0]["sampled_errors_by_kind"].items() if k in image_kinds}
        sizes = raw["image_bytes"]
        images = {"column": spec.input.image_column, "per_row": 1, "tasks_reading": len(image_tasks),
                  "tokens_per_image": checkpoint.config.mm_tokens_per_image,
                  "image_size_px": checkpoint.image_size,
                  "sampled_rows": sampled, "sampled_unusable_by_kind": bad,
                  "mean_bytes": round(statistics.fmean(sizes)) if sizes else None,
                  "images_to_compute": round(work.images)}

    r = spec.resources
    device = "cuda" if r.gpus_per_actor > 0 else "cpu"
    priced = estimate.estimate(work, cost, device=device, threads=int(r.cpus_per_actor), min_actors=r.min_actors,
                               max_actors=r.max_actors, gpus_per_actor=r.gpus_per_actor, calibration=calibration)
    sizes = sorted(f.num_rows for f in files)
    return {
        "job": spec.origin,
        "valid": True,
        "output": spec.output.path,
        "limit": limit,
        "model": {"source": spec.model.source, "dtype": spec.model.dtype, "parameters": checkpoint.parameters,
                  "cost_flops": {"prefill_per_token": cost.prefill_per_token,
                                 "decode_per_token": cost.decode_per_token, "per_image": cost.per_image}},
        "input": {"files": len(files), "rows": rows_total,
                  "rows_per_file": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]}
                  if sizes else None,
                  "per_file": [{"uri": f.uri, "rows": f.num_rows} for f in files],
                  "duplicate_id_rows": v.duplicate_rows, "drift": list(v.drift)},
        "sample": {"rows": sampled, "files": len(chosen), "max_rows": sample_rows,
                   "how": f"rows spread over {len(chosen)} of {len(files)} file(s), at least {MIN_PER_FILE} per "
                          f"file sampled, each row group read from its head"},
        "tasks": tasks,
        "images": images,
        "units": {"total": len(v.units), "committed": len(v.units) - len(todo), "to_compute": len(todo),
                  "rows_total": rows_total, "rows_committed": rows_total - rows_todo, "rows_to_compute": rows_todo,
                  "rows_reused": sum(len(u.reused) for u in reuse.units),
                  "changes": reuse.changes(), "to_retract": len(retract),
                  "rows_to_retract": sum(int((done[k] or {}).get("rows", 0)) for k in retract)},
        "resources": {"device": device, "min_actors": r.min_actors, "max_actors": r.max_actors,
                      "gpus_per_actor": r.gpus_per_actor, "cpus_per_actor": r.cpus_per_actor},
        "estimate": priced,
    }


# ---- printing ------------------------------------------------------------------------------


def _hours(h: float) -> str:
    seconds = h * 3600
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{h:.1f} h"


def _bar(n: int, most: int, width: int = 30) -> str:
    return "#" * max(1, round(width * n / most)) if most else ""


def summary(d: dict) -> str:
    """The dry run as a person reads it."""
    u, inp, res = d["units"], d["input"], d["resources"]
    lines = [f"Dry run of {d['job']}: the job is valid (nothing was computed; no Ray, no model weights)"]
    if d["limit"] is not None:
        lines.append(f"  --limit {d['limit']}: the first {inp['rows']} rows, into {d['output']} (not the job's output)")
    per = inp["rows_per_file"]
    lines.append(f"  input     {inp['rows']} rows in {inp['files']} file(s)"
                 + (f" ({per['min']}..{per['max']} rows per file, median {per['median']})" if per else ""))
    for f in inp["per_file"][:8]:
        lines.append(f"            {f['rows']:>10}  {f['uri']}")
    if len(inp["per_file"]) > 8:
        lines.append(f"            ... and {len(inp['per_file']) - 8} more file(s)")
    if inp["duplicate_id_rows"]:
        lines.append(f"  ids       {inp['duplicate_id_rows']} row(s) repeat an earlier id: duplicate_id error rows")
    for warning in inp["drift"]:
        lines.append(f"  drift     {warning}")
    lines.append(f"  output    {d['output']}: {u['total']} unit(s); {u['committed']} already committed "
                 f"({u['rows_committed']} rows, reused), {u['to_compute']} to compute ({u['rows_to_compute']} rows"
                 + (f", besides {u['rows_reused']} rows of the same content reused" if u["rows_reused"] else "") + ")"
                 + (f"; {u['to_retract']} unit(s) of changed or removed input ({u['rows_to_retract']} rows) would be "
                    f"retracted" if u["to_retract"] else ""))
    s = d["sample"]
    lines.append(f"  sample    {s['rows']} row(s) ({s['how']}), through the run's own read and prepare stages")
    for t in d["tasks"]:
        p = t["prompt_tokens"]
        errors = ", ".join(f"{k} {n}" for k, n in t["sampled_errors_by_kind"].items()) or "none"
        lines.append(f"  task      {t['kind']} -> {t['output_column']}: {t['sampled_ok']} of {t['sampled_rows']} "
                     f"sampled rows make a prompt; error rows: {errors}")
        if p["mean"]:
            lines.append(f"            prompt tokens (as sent): mean {p['mean']:g}, median {p['p50']}, p90 {p['p90']}, "
                         f"p99 {p['p99']}, max {p['max']}")
        most = max((b["rows"] for b in t["histogram"]), default=0)
        lines.append("            prompt length without the limit (tokens, images included):")
        for b in t["histogram"]:
            label = f"<= {b['up_to']}" if b["up_to"] is not None else f"> {131_072}"
            lines.append(f"              {label:>10} {b['rows']:>6}  {_bar(b['rows'], most)}")
        if t["over_max_input_tokens"]:
            fate = {"error": "become text_too_long error rows",
                    "truncate": "are cut to max_input_tokens (long_input = \"truncate\")",
                    "chunk": "are split into pieces that fit, whose outputs are joined (long_input = \"chunk\"; "
                             "prompt tokens as sent count every piece, output tokens only one output per row)",
                    }[t["long_input"]]
            lines.append(f"            {t['over_max_input_tokens']} sampled prompt(s) are over input.max_input_tokens: "
                         f"they {fate}")
        else:
            lines.append("            no sampled prompt is over input.max_input_tokens")
        if t["max_new_tokens"] is None:  # classify
            lines.append(f"            to compute: ~{t['rows_to_compute']} rows, ~{t['prompt_tokens_to_compute']} "
                         f"prompt tokens; nothing generated: {t['scored_tokens_per_row']:g} candidate tokens scored "
                         f"per row (one decoder pass)")
            continue
        typical = (f"; typical {t['output_tokens_typical']} ({t['output_tokens_per_row_typical']:g} per row, measured "
                   f"on {t['typical_measured_on_rows']} committed rows of this output)"
                   if t["output_tokens_typical"] is not None else
                   "; no typical figure yet (none committed: `--limit N` measures one on the first rows)")
        lines.append(f"            to compute: ~{t['rows_to_compute']} rows, ~{t['prompt_tokens_to_compute']} prompt "
                     f"tokens; output tokens at most {t['output_tokens_upper_bound']} "
                     f"(rows x max_new_tokens {t['max_new_tokens']}"
                     + (f" x {t['num_return_sequences']} sequences" if t["num_return_sequences"] > 1 else "")
                     + f"){typical}")
    if d["images"]:
        im = d["images"]
        bad = ", ".join(f"{k} {n}" for k, n in im["sampled_unusable_by_kind"].items()) or "none"
        size = f", mean {im['mean_bytes'] / 1024:.1f} KiB encoded" if im["mean_bytes"] else ""
        lines.append(f"  images    {im['per_row']} per row ({im['column']}), read by {im['tasks_reading']} task(s), "
                     f"{im['tokens_per_image']} prompt tokens each at {im['image_size_px']} px{size}; unusable in the "
                     f"sample: {bad}")
    e = d["estimate"]
    actors = str(res["min_actors"]) if res["min_actors"] == res["max_actors"] else \
        f"{res['min_actors']}..{res['max_actors']}"
    device = f"{res['gpus_per_actor']:g} GPU" if res["gpus_per_actor"] else f"CPU, {res['cpus_per_actor']:g} thread(s)"
    if not e.get("calibration"):
        lines.append(f"  estimate  none: {e.get('note')}")
        return "\n".join(lines)
    c = e["calibration"]
    lines.append(f"  estimate  for {actors} actor(s) x ({device}), from calibration {c['name']!r}: {c['machine']}, "
                 f"shape {c['shape']}, {c['dtype']}, {c['threads'] or '-'} thread(s), measured {c['date']}")
    if e["note"]:
        lines.append(f"            NOTE: {e['note']}")
    rates = e["rates"]
    lines.append(f"            rates at this job's shape: prefill {rates['prefill_tokens_per_s']:.0f} tokens/s, decode "
                 f"{rates['decode_tokens_per_s']:.0f} tokens/s"
                 + (f", {rates['images_per_s']:.3g} images/s" if d["images"] else "") + " per actor")
    figures = [("upper bound (every row to max_new_tokens)", e["upper_bound"]), ("typical", e["typical"])]
    if e["typical"] == e["upper_bound"]:  # nothing is generated (classify), or every row runs to its limit
        figures = [("model time", e["upper_bound"])]
    for label, f in figures:
        if f is None:
            continue
        gpu = f", {f['gpu_hours']:.3g} GPU-hours" if res["gpus_per_actor"] else ""
        wall = _hours(f["wall_hours_at_max_actors"]) if res["min_actors"] == res["max_actors"] else \
            f"{_hours(f['wall_hours_at_max_actors'])} (max actors) .. {_hours(f['wall_hours_at_min_actors'])} (min)"
        lines.append(f"            {label}: {f['actor_hours']:.3g} actor-hours ({_hours(f['actor_hours'])} of model "
                     f"time){gpu}, wall {wall}")
    lines.append("            (model loading, attention's growth with long prompts and the CPU stages are not priced)")
    return "\n".join(lines)
