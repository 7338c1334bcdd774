"""The `t5g2` command line: run | status | inspect | demo | bench.

  t5g2 run JOB.toml [--set key=value ...] [--address RAY_ADDRESS] [--limit N]
      Validate the job (fails before any GPU work with the fix), then run or resume it. Without an
      address it starts a local Ray; with one (or RAY_ADDRESS) it joins that cluster. The last line
      it prints on stdout is the path of the run report, whenever the run wrote one. --limit N runs
      the first N rows only, into an output of their own (pipeline.run.limited_spec).
  t5g2 run JOB.toml --dry-run [--limit N] [--sample N] [--calibrate] [--json]
      Validate the job exactly as a run does, sample and tokenize rows, and print what the run would
      do and cost (pipeline/dryrun.py), without Ray and without loading the model's weights.
  t5g2 status OUTPUT_PATH | JOB.toml [--option key=value ...] [--json]
      Whether an output is complete, in progress, stale or empty (pipeline/status.py), without Ray.
  t5g2 inspect JOB.toml [--set ...]     validate a job and print its plan, without running it
  t5g2 inspect CHECKPOINT [--adapter A]  print a checkpoint's config summary (dir, URI or hub id): its
                                        tokenizer file, generation_config.json, the settings and tensors
                                        it ignores, and a LoRA adapter checked against it
  t5g2 demo ...                         jobs/demo.py (a dataset, a checkpoint and five jobs)
  t5g2 bench ...                        jobs/bench.py (throughput)

demo and bench are imported only when asked for, so `run` works whatever state they are in.
Exit codes (EXIT_*; the README's table): 0 complete, 3 complete with error rows, 2 the job or its
arguments are invalid (nothing was computed), 4 infrastructure failure (storage, the Ray cluster,
model actors: committed units stay, the same command resumes), 1 an unexpected error (a traceback is
printed), 128 + N stopped by signal N (130 for Ctrl-C / SIGINT, 143 for SIGTERM). `t5g2 status` adds
5 in progress, 6 stale and 7 empty.

Not here: what a run does (pipeline/run.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import asdict

LOG_LEVELS = ("debug", "info", "warning", "error")

# Exit codes, for schedulers (the README's table). A job's fault is never retried by itself; an
# infrastructure failure may be, and the rerun resumes from what was committed.
EXIT_OK = 0  # complete: one output row per input row, none an error row (a dry run: the job is valid)
EXIT_UNEXPECTED = 1  # an error nobody classified (a bug): Python's own code, with its traceback
EXIT_INVALID = 2  # the job or the arguments are invalid: nothing was computed; the message names the fix
EXIT_ERROR_ROWS = 3  # complete, and some output rows are error rows (counted by kind in the report)
EXIT_INFRASTRUCTURE = 4  # storage, the Ray cluster or the model actors failed: committed units stay
EXIT_IN_PROGRESS = 5  # status: a run started on the output and has not completed (running, or stopped)
EXIT_STALE = 6  # status: the output was complete but no longer mirrors its input (or its records)
EXIT_EMPTY = 7  # status: no run has written to the output
_PACKAGES = ("pipeline", "operators", "model", "jobs")  # the project's loggers, one tree per package
_handlers: list[logging.Handler] = []


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def configure_logging(level: str = "info") -> None:
    """The project's log lines on the terminal as a person reads them: progress and run summaries on
    stdout, warnings ("warning: ...") and errors ("error: ...") on stderr. Ray's own INFO lines are
    quieted on a terminal unless --log-level debug. Calling it again replaces what it set before."""
    numeric = getattr(logging, level.upper())
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))
    err.addFilter(_lower_level_name)
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        for old in _handlers:
            logger.removeHandler(old)
        logger.setLevel(numeric)
        logger.addHandler(out)
        logger.addHandler(err)
    _handlers[:] = [out, err]
    if numeric > logging.DEBUG and sys.stderr.isatty():
        logging.getLogger("ray").setLevel(logging.WARNING)


def _lower_level_name(record: logging.LogRecord) -> bool:
    record.levelname_lower = record.levelname.lower()
    return True


USAGE = """usage: t5g2 {run,status,inspect,demo,bench} ...

commands:
  run JOB.toml [--set key=value ...] [--address ADDR]   run or resume a job (--limit N: its first N rows)
  run JOB.toml --dry-run                                 validate, sample and price a job without running it
  status OUTPUT_PATH | JOB.toml                          is an output complete, in progress, stale or empty
  inspect JOB.toml | CHECKPOINT                          show a job's plan or a checkpoint's config
  demo [...]                                             generate demo data + checkpoint and run the demo jobs
  bench [...]                                            throughput benchmark
Run `t5g2 COMMAND --help` for a command's options."""


def _job_parser(prog: str, with_address: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("job", help="the TOML job file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. --set resources.rows_per_call=64 (repeatable)")
    if with_address:
        parser.add_argument("--address", default=None,
                            help="Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="how much to log (default info: progress and the run summary)")
    return parser


_TRANSIENT_NAMES = frozenset({"ConnectionError", "TimeoutError", "ConnectTimeoutError", "ReadTimeoutError",
                              "EndpointConnectionError", "ConnectionClosedError"})


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether a failure comes from storage or the network being unreachable or overloaded, anywhere in
    its chain of causes (connection refused or timed out, an S3 5xx after the bounded retries): then a
    JobError raised by validation is an infrastructure failure, not a wrong job."""
    for e in _causes(exc):
        if isinstance(e, (ConnectionError, TimeoutError)) or any(k.__name__ in _TRANSIENT_NAMES
                                                                 for k in type(e).__mro__):
            return True
        status = (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) \
            if isinstance(getattr(e, "response", None), dict) else 0
        if status >= 500:
            return True
    return False


def is_infrastructure(exc: BaseException) -> bool:
    """Whether a run that raised `exc` failed under the job rather than because of it: storage (after
    the bounded retries), the Ray cluster (one that does not answer, Ray's own errors), model actors
    that kept dying or hung (InfrastructureError), or a transient storage failure during validation."""
    from pipeline.paths import StorageError
    from pipeline.run import ClusterError, InfrastructureError
    from pipeline.spec import JobError

    if isinstance(exc, (ClusterError, InfrastructureError, StorageError)):
        return True
    if isinstance(exc, JobError):
        return is_transient(exc)
    return type(exc).__module__.split(".")[0] == "ray" or is_transient(exc)


def _print_report_path(report: dict | None) -> None:
    """The run report's path as the last line on stdout (what a scheduler reads with `tail -n 1`)."""
    from pipeline.run import report_location

    if report and report.get("output"):
        for handler in _handlers:
            handler.flush()
        print(report_location(report["output"]), flush=True)


def cmd_run(argv: list[str]) -> int:
    from pipeline.run import INTERRUPTED_EXIT_BASE, Interrupted, run_job
    from pipeline.spec import JobError, load_job

    parser = _job_parser("t5g2 run", with_address=True)
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="run only the first N rows (in file, row order), into OUTPUT/_limit/<run hash>/: to "
                             "check a prompt before the full run")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the job, sample and tokenize rows, and print what the run would compute and "
                             "cost; starts no Ray and loads no model weights")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="--dry-run: rows to sample over the input files (default 512)")
    parser.add_argument("--calibrate", action="store_true",
                        help="--dry-run: time a tiny run of the job's model shape (random weights) on the configured "
                             "device and price the job from it, instead of the table in docs/perf.md")
    parser.add_argument("--json", action="store_true", help="--dry-run: print the result as JSON")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a number of rows >= 1, got {args.limit}")
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be >= 1, got {args.sample}")
    if not args.dry_run and (args.sample is not None or args.calibrate or args.json):
        parser.error("--sample, --calibrate and --json go with --dry-run")
    configure_logging(args.log_level)
    if args.dry_run:
        return _dry_run(args)
    try:
        spec = load_job(args.job, args.overrides)
        report = run_job(spec, address=args.address, limit=args.limit)
    except Interrupted as stop:  # run_job has said what was committed and how to resume
        _print_report_path(getattr(stop, "report", None))
        return stop.exit_code
    except KeyboardInterrupt:  # before run_job took over the signals: nothing was started
        print("t5g2 run: interrupted before the job started; nothing was written", file=sys.stderr)
        return INTERRUPTED_EXIT_BASE + signal.SIGINT
    except Exception as exc:
        if isinstance(exc, JobError) and not is_infrastructure(exc):
            print(f"t5g2 run: the job cannot run: {exc}", file=sys.stderr)
            return EXIT_INVALID
        if not is_infrastructure(exc):
            raise  # a bug: Python prints the traceback and exits with 1 (EXIT_UNEXPECTED)
        # Committed units stay; the same command, run again, resumes.
        print(f"t5g2 run: the job stopped: {exc}", file=sys.stderr)
        _print_report_path(getattr(exc, "report", None))
        return EXIT_INFRASTRUCTURE
    _print_report_path(report)
    return run_exit_code(report)


def run_exit_code(report: dict) -> int:
    """The exit code of a run that returned `report`: complete (with or without error rows) or not."""
    if not report.get("complete"):
        return EXIT_INFRASTRUCTURE  # every unit should be committed when run_job returns: rows went missing
    errors = sum((report.get("all_runs") or {}).get("errors_by_kind", {}).values())
    return EXIT_ERROR_ROWS if errors else EXIT_OK


def _dry_run(args) -> int:
    from pipeline.dryrun import dry_run, summary
    from pipeline.spec import JobError, load_job

    try:
        spec = load_job(args.job, args.overrides)
        calibration = None
        if args.calibrate:
            from jobs.calibrate import calibrate_for_job

            calibration = calibrate_for_job(spec)
        result = dry_run(spec, limit=args.limit, sample_rows=args.sample or 512, calibration=calibration)
    except KeyboardInterrupt:
        print("t5g2 run --dry-run: interrupted; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:
        if isinstance(exc, JobError) and not is_infrastructure(exc):
            print(f"t5g2 run: the job cannot run: {exc}", file=sys.stderr)
            return EXIT_INVALID
        if not is_infrastructure(exc):
            raise
        print(f"t5g2 run --dry-run: stopped: {exc}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else summary(result))
    return EXIT_OK


STATUS_EXIT = {"complete": EXIT_OK, "in_progress": EXIT_IN_PROGRESS, "stale": EXIT_STALE, "empty": EXIT_EMPTY}


def cmd_status(argv: list[str]) -> int:
    from pipeline.spec import JobError, load_job
    from pipeline.status import output_status, summary

    parser = argparse.ArgumentParser(prog="t5g2 status", description="Is an output complete, in progress, stale or "
                                     "empty? Reads only what the commit protocol wrote (and lists the input again); "
                                     "no Ray, no model.")
    parser.add_argument("target", help="the output path or URI, or a job file (its output.path and [storage])")
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="an fsspec option for the output's store, e.g. --option endpoint_url=http://host:9000 "
                             "(repeatable; credentials come from the standard chains, never from here)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    try:
        if args.target.endswith(".toml") or os.path.isfile(args.target):
            if args.options:
                parser.error("--option is for an output path; a job file brings its own [storage]")
            spec = load_job(args.target)
            status = output_status(spec.output.path, storage=spec.storage, input_paths=spec.input.paths)
        else:
            status = output_status(args.target, options=_options(args.options))
    except JobError as exc:
        print(f"t5g2 status: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:  # the store cannot be read (StorageError is an OSError)
        print(f"t5g2 status: cannot read the output: {exc}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else summary(status))
    if status["state"] == "complete" and status.get("error_rows"):
        return EXIT_ERROR_ROWS
    return STATUS_EXIT[status["state"]]


def _options(items: list[str]) -> dict:
    from pipeline.spec import JobError, check_no_credentials, parse_value

    options = {}
    for item in items:
        if "=" not in item:
            raise JobError(f"--option {item!r} must be key=value, e.g. --option endpoint_url=http://127.0.0.1:9000")
        key, value = item.split("=", 1)
        options[key.strip()] = parse_value(value.strip())
    check_no_credentials(options, "--option")
    return options


def _inspect_job(path: str, overrides: list[str]) -> int:
    from model.generate import DEFAULT_BATCH_TOKENS
    from pipeline.spec import JobError, load_job
    from pipeline.validate import validate

    try:
        spec = load_job(path, overrides)
        v = validate(spec)
    except JobError as exc:
        print(f"t5g2 inspect: the job cannot run: {exc}", file=sys.stderr)
        return 2
    done = v.store.done()
    todo = [u for u in v.units if u.key not in done]
    r = spec.resources
    print(f"Job {spec.origin}")
    print(f"  model     {spec.model.source} ({spec.model.dtype}), revision {v.model_revision or '-'}"
          f"{f', LoRA adapter {spec.model.adapter}' if spec.model.adapter else ''}"
          f"{f', tokenizer from {v.checkpoint.tokenizer_file}' if v.checkpoint is not None else ''}")
    print(f"  input     {len(v.files)} file(s), {sum(f.num_rows for f in v.files)} rows; columns "
          f"id={spec.input.id_column or '(derived)'} text={spec.input.text_column or '-'} "
          f"image={spec.input.image_column or '-'}; max_input_tokens {spec.input.max_input_tokens} "
          f"({spec.input.long_input})")
    print(f"  output    {spec.output.path}: {len(v.units)} unit(s) of <= {spec.output.rows_per_file} rows, "
          f"{len(v.units) - len(todo)} done, {len(todo)} to compute ({sum(u.rows for u in todo)} rows)")
    for t in spec.tasks:
        print(f"  task      {t.kind} -> {t.output_column}: {json.dumps(asdict(t.generation), sort_keys=True)}")
        print(f"            prompt {t.prompt!r}")
    actors = str(r.min_actors) if r.min_actors == r.max_actors else f"{r.min_actors}..{r.max_actors}"
    device = f"{r.gpus_per_actor:g} GPU" if r.gpus_per_actor else "CPU"
    if r.max_batch_tokens is not None:
        batching = f"<= {r.max_batch_tokens} tokens/batch"
    elif r.gpus_per_actor >= 1:
        batching = "decode batches by free GPU memory"
    elif r.gpus_per_actor > 0:
        batching = f"decode batches within {r.gpus_per_actor:g} of the GPU's memory"
    else:
        batching = f"<= {DEFAULT_BATCH_TOKENS} tokens/batch"
    print(f"  resources {actors} actor(s) x ({device}, {r.cpus_per_actor:g} CPU), {r.rows_per_call} rows/call, "
          f"{batching}, a call taken as hung after {r.call_timeout_s:g} s")
    for warning in v.drift:
        print(f"  drift     {warning}")
    if v.duplicate_rows:
        print(f"  ids       {v.duplicate_rows} row(s) repeat an earlier id: they become duplicate_id error rows")
    if v.checkpoint is not None:
        for line in _checkpoint_notes(v.checkpoint):
            print(f"  {line}")
    print(f"  run hash  {v.run_hash}")
    return 0


def _checkpoint_notes(summary) -> list[str]:
    """What a checkpoint brings beyond its shapes: generation_config.json, ignored settings, the adapter."""
    lines = []
    g = summary.generation
    if g is None:
        lines.append("generation  no generation_config.json: config.json's eos / pad / decoder start ids")
    else:
        ids = [f"{name} {value if not isinstance(value, tuple) else list(value)}" for name, value in (
            ("eos", g.eos_token_ids), ("decoder start", g.decoder_start_token_id), ("bos", g.bos_token_id),
            ("pad", g.pad_token_id)) if value is not None]
        lines.append(f"generation  generation_config.json: {', '.join(ids) or 'no token ids'} (its ids are used, over "
                     f"config.json's)")
        if g.settings:
            shown = ", ".join(f"{key}={json.dumps(value)}" for key, value in g.settings)
            lines.append(f"            {shown}: shown only, not applied; a job's [[task]] settings decide "
                         f"(greedy by default)")
    for warning in summary.warnings:
        lines.append(f"ignored     {warning}")
    a = summary.adapter
    if a is not None:
        base = f"; trained on {a.base_model}" if a.base_model else ""
        lines.append(f"adapter     {a.description}: {a.describe()}{base}")
    return lines


def _inspect_checkpoint(source: str, adapter: str | None = None) -> int:
    from model.inspect import inspect_checkpoint
    from model.source import CheckpointError

    try:
        summary = inspect_checkpoint(source, adapter=adapter)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"t5g2 inspect: {exc}", file=sys.stderr)
        return 2
    c = summary.config
    e, d, v = c.encoder, c.decoder, c.vision
    print(f"Checkpoint {source} (revision {summary.revision or '-'})")
    for name, t in (("encoder", e), ("decoder", d)):
        kinds = f"{t.layer_types.count('sliding_attention')} sliding (window {t.sliding_window}) + " \
                f"{t.layer_types.count('full_attention')} full"
        print(f"  {name:8} {t.num_layers} layers ({kinds}), hidden {t.hidden_size}, MLP {t.intermediate_size}, "
              f"heads {t.num_heads}/{t.num_kv_heads} kv, head_dim {t.head_dim}")
    print(f"  vocab    {c.vocab_size} (tokenizer {summary.tokenizer_vocab_size}); eos {list(c.eos_token_ids)}, "
          f"pad {c.pad_token_id}, bos {c.bos_token_id}")
    print(f"  vision   {v.num_layers} layers, hidden {v.hidden_size}, {v.image_size}px / patch {v.patch_size}; "
          f"{c.mm_tokens_per_image} tokens per image (boi {c.boi_token_id}, image {c.image_token_id}, "
          f"eoi {c.eoi_token_id}){'' if summary.image_tokens else '; image prompts not possible'}")
    print(f"  weights  {', '.join(summary.weight_files)}: {summary.parameters:,} parameters, "
          f"{'/'.join(summary.weight_dtypes)}, {summary.weight_bytes / 2**20:.1f} MiB")
    has = {name: "yes" if name in summary.files else "no" for name in ("tokenizer.model", "tokenizer.json")}
    print(f"  files    tokenizer read from {summary.tokenizer_file} (tokenizer.model {has['tokenizer.model']}, "
          f"tokenizer.json {has['tokenizer.json']}); "
          f"{'preprocessor_config.json yes' if summary.has_preprocessor else 'no preprocessor_config.json'} "
          f"(images resized to {summary.image_size}px)")
    for line in _checkpoint_notes(summary):
        print(f"  {line}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="t5g2 inspect")
    parser.add_argument("target", help="a TOML job file, or a checkpoint (directory, fsspec URI or hub id)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="job field override (job files only)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA adapter to check against the checkpoint (checkpoints only; a job file "
                             "names its own in [model] adapter)")
    args = parser.parse_args(argv)
    if args.target.endswith(".toml") or os.path.isfile(args.target):
        if args.adapter:
            print("t5g2 inspect: --adapter is for checkpoints; in a job set [model] adapter (or --set "
                  "model.adapter=DIR)", file=sys.stderr)
            return 2
        return _inspect_job(args.target, args.overrides)
    return _inspect_checkpoint(args.target, args.adapter)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    configure_logging()  # `run --log-level` sets its own
    if command == "run":
        return cmd_run(rest)
    if command == "status":
        return cmd_status(rest)
    if command == "inspect":
        return cmd_inspect(rest)
    if command == "demo":
        from jobs import demo

        return demo.main(rest) or 0
    if command == "bench":
        from jobs import bench

        return bench.main(rest) or 0
    print(f"t5g2: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
