"""The dry run (`t5g2 run JOB.toml --dry-run`): validation as a run, a bounded sample through the run's
own read and prepare stages, the token histogram, what a rerun recomputes, and the estimate; and the
cost model and calibration table it prices with (pipeline/estimate.py, docs/perf.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from helpers.pipeline_data import job_toml, mixed_rows, rows_table, write_inputs
from jobs import cli, demo
from pipeline import build, dryrun, estimate
from pipeline import run as run_module
from pipeline.inputs import InputFile
from pipeline.run import run_job
from pipeline.spec import load_job
from pipeline.status import output_status

REPO = Path(__file__).resolve().parents[2]
SUMMARIZE = """
[[task]]
kind = "summarize"
max_new_tokens = 4
"""


@pytest.fixture
def no_model_work(monkeypatch):
    """A dry run must start no Ray and load no model: each of those fails the test."""
    import model.weights

    monkeypatch.setattr(run_module, "_connect", lambda address=None: pytest.fail("a dry run must not start Ray"))
    monkeypatch.setattr(model.weights, "load_pretrained", lambda *a, **k: pytest.fail("no weights in a dry run"))
    monkeypatch.setattr(build.InferActor, "__init__", lambda *a, **k: pytest.fail("no model actor in a dry run"))


@pytest.fixture(scope="module")
def demo_jobs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.generate(out, rows=24)
    return out, demo.write_job_files(out, max_new_tokens=8)


def test_the_dry_run_of_a_demo_job_prints_its_estimate(demo_jobs, no_model_work, capsys):
    out, jobs = demo_jobs
    assert cli.main(["run", str(jobs["summarize"]), "--dry-run"]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "the job is valid" in printed
    assert "input     24 rows in 4 file(s)" in printed
    assert "4 unit(s); 0 already committed (0 rows, reused), 4 to compute (24 rows)" in printed
    assert "sample    24 row(s)" in printed and "through the run's own read and prepare stages" in printed
    # The demo's two bad documents are error rows in the sample too; the histogram counts the others.
    assert "22 of 24 sampled rows make a prompt; error rows: text_empty 1, text_missing 1" in printed
    assert re.search(r"<= 128 +\d+ +#", printed) and "no sampled prompt is over input.max_input_tokens" in printed
    assert "output tokens at most 176 (rows x max_new_tokens 8)" in printed  # 22 rows x 8
    # Priced from the CPU row measured at the demo's own shape (so not moved across shapes).
    assert "from calibration 'cpu-demo'" in printed and "moved from shape" not in printed
    assert re.search(r"upper bound \(every row to max_new_tokens\): [0-9.e-]+ actor-hours \([0-9.]+ s of model time\), "
                     r"wall ", printed)
    assert not (out / "outputs" / "summarize" / "_job.json").exists()  # a dry run writes nothing of a run

    # A GPU job: no GPU calibration exists yet, and the estimate says plainly that it is a CPU figure.
    assert cli.main(["run", str(jobs["caption"]), "--dry-run", "--set", "resources.gpus_per_actor=1",
                     "--json"]) == cli.EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["estimate"]["calibration"]["device"] == "cpu"
    assert "no CUDA calibration has been measured yet" in result["estimate"]["note"]
    assert result["estimate"]["upper_bound"]["gpu_hours"] == result["estimate"]["upper_bound"]["actor_hours"]
    images = result["images"]
    assert images["per_row"] == 1 and images["tokens_per_image"] == demo.DEMO_MM_TOKENS
    assert images["sampled_unusable_by_kind"] == {"image_decode": 2, "image_missing": 1}
    (task,) = result["tasks"]
    assert task["sampled_rows"] == demo.image_count(24) and task["prompt_tokens"]["max"] >= demo.DEMO_MM_TOKENS

    # A classify job generates nothing: its candidates are scored, and priced as such.
    assert cli.main(["run", str(jobs["classify-topics"]), "--dry-run", "--json"]) == cli.EXIT_OK
    (task,) = json.loads(capsys.readouterr().out)["tasks"]
    assert task["max_new_tokens"] is None and task["output_tokens_upper_bound"] == 0
    labels = len(demo.DEMO_TOPICS)
    assert task["scored_tokens_per_row"] >= 2 * labels  # each label's tokens and its EOS
    assert cli.main(["run", str(jobs["classify-topics"]), "--dry-run"]) == cli.EXIT_OK
    assert "candidate tokens scored per row (one decoder pass)" in capsys.readouterr().out


def test_a_bad_job_fails_the_dry_run_as_it_fails_the_run(tiny_checkpoint, tmp_path, capsys, no_model_work):
    rows, _ = mixed_rows(good=4)
    write_inputs(rows[:4], str(tmp_path / "in"), files=1)
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=SUMMARIZE))
    for bad in (["--set", "input.text_column=body"], ["--set", f"model.source={tmp_path}/nothing"],
                ["--set", f"output.path={tmp_path}/in"], ["--set", "task.kind=poem"]):
        assert cli.main(["run", str(job), *bad]) == cli.EXIT_INVALID
        as_run = capsys.readouterr().err
        assert cli.main(["run", str(job), "--dry-run", *bad]) == cli.EXIT_INVALID
        assert capsys.readouterr().err == as_run and "the job cannot run: " in as_run, bad


def test_long_prompts_are_counted_against_max_input_tokens(tiny_checkpoint, tmp_path):
    rows, expected = mixed_rows(good=8, long_text_chars=3000)
    write_inputs(rows, str(tmp_path / "in"), files=2)
    text = job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=SUMMARIZE)

    result = dryrun.dry_run(load_job(text))
    (task,) = result["tasks"]
    assert task["sampled_rows"] == len(rows) == result["input"]["rows"]  # small input: every row sampled
    # Every text error of mixed_rows is there, as the run would give it (text_too_long among them).
    want = {}
    for kinds in expected.values():
        if "text" in kinds:
            want[kinds["text"]] = want.get(kinds["text"], 0) + 1
    assert task["sampled_errors_by_kind"] == want and want["text_too_long"] == 1
    assert task["over_max_input_tokens"] == 1
    # The histogram holds the true length of the long prompt (past 256, the job's limit), and every prompt.
    assert sum(b["rows"] for b in task["histogram"]) == task["sampled_ok"] + 1
    longest = [b for b in task["histogram"] if b["up_to"] is None or b["up_to"] > 256]
    assert [b["rows"] for b in longest] == [1] and longest[0]["up_to"] >= 2048

    truncated = dryrun.dry_run(load_job(text, ["input.long_input=\"truncate\""]))
    (task,) = truncated["tasks"]
    assert task["over_max_input_tokens"] == 1 and "text_too_long" not in task["sampled_errors_by_kind"]
    assert task["prompt_tokens"]["max"] <= 256 and task["long_input"] == "truncate"  # cut, as the run cuts it

    chunked = dryrun.dry_run(load_job(text, ["input.long_input=\"chunk\""]))
    (task,) = chunked["tasks"]
    assert task["over_max_input_tokens"] == 1 and "text_too_long" not in task["sampled_errors_by_kind"]
    assert task["prompt_tokens"]["max"] > 2048  # the long text's pieces, every one of them sent
    assert "are split into pieces that fit" in dryrun.summary(chunked)


def test_the_sample_is_bounded_and_spread_over_files_and_row_groups(tmp_path):
    files = [InputFile(uri=f"file:///f{i}", num_rows=12, schema=pa.schema([])) for i in range(40)]
    plan = dryrun.sample_plan(files, 64)
    assert sum(plan.values()) == 64 and set(plan.values()) == {dryrun.MIN_PER_FILE}
    assert sorted(plan) == [int(k * 40 / 16) for k in range(16)]  # 16 files, evenly over the listing
    assert dryrun.sample_plan(files[:2], 512) == {0: 12, 1: 12}  # never more than a file has

    # Within a file: positions spread over its row groups, each group read from its head only.
    assert dryrun._row_groups_to_read([5, 5, 5, 5], 20, 4) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert dryrun._row_groups_to_read([100], 100, 3) == [(0, 3)]
    assert dryrun._row_groups_to_read([5, 5, 5], 7, 4) == [(0, 3), (1, 1)]  # --limit 7: group 2 unread

    rows, _ = mixed_rows(good=20)
    path = tmp_path / "one.parquet"
    pq.write_table(rows_table(rows[:20]), path, row_group_size=5)
    f = InputFile(uri=str(path), num_rows=20, schema=pq.read_schema(path))
    table = dryrun.read_sample(f, 4, ["id", "text", "nothing"], {})
    assert table.column_names == ["id", "text"]  # only the columns asked for, that the file has
    assert table.column("id").to_pylist() == ["good-000", "good-005", "good-010", "good-015"]


def test_a_rerun_is_priced_on_what_the_output_does_not_hold_yet(ray_cluster, tiny_checkpoint, tmp_path):
    rows, _ = mixed_rows(good=24)
    good = rows[:24]
    write_inputs(good[:16], str(tmp_path / "in"), files=2)  # 2 files x 8 rows -> 2 x 2 units
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=SUMMARIZE,
                            rows_per_file=4))
    done = run_job(load_job(str(job)))
    assert done["complete"] and done["units_total"] == 4

    pq.write_table(rows_table(good[16:]), tmp_path / "in" / "part-9.parquet")  # a new file of 8 rows
    (tmp_path / "in" / "part-0.parquet").unlink()  # and one gone
    result = dryrun.dry_run(load_job(str(job)))
    units = result["units"]
    assert (units["total"], units["committed"], units["to_compute"], units["rows_to_compute"]) == (4, 2, 2, 8)
    assert (units["to_retract"], units["rows_to_retract"]) == (2, 8)
    (task,) = result["tasks"]
    assert task["rows_to_compute"] == 8 and task["output_tokens_upper_bound"] == 8 * 4
    # The typical output length is measured on the rows the output already holds.
    measured = done["tasks"]["summary"]["output_tokens"] / done["tasks"]["summary"]["ok"]
    assert task["output_tokens_per_row_typical"] == pytest.approx(measured, abs=0.01)
    assert task["typical_measured_on_rows"] == 16 and task["output_tokens_typical"] == round(8 * measured)
    assert result["estimate"]["typical"]["actor_hours"] <= result["estimate"]["upper_bound"]["actor_hours"]


def test_the_dry_run_reads_the_input_from_s3(s3, tiny_checkpoint, no_model_work):
    endpoint, _, fs = s3
    for bucket in ("corpus", "models", "results"):
        fs.mkdir(bucket)
    fs.put(str(tiny_checkpoint) + "/", "models/tiny/", recursive=True)
    rows, _ = mixed_rows(good=30)
    write_inputs(rows[:30], "corpus/docs", fs=fs, files=3)
    storage = f'[storage.s3]\nendpoint_url = "{endpoint}"\n'
    text = job_toml("s3://models/tiny/", "s3://corpus/docs/*.parquet", "s3://results/run/", tasks=SUMMARIZE,
                    storage=storage)
    result = dryrun.dry_run(load_job(text), sample_rows=12)
    assert result["input"]["files"] == 3 and result["input"]["rows"] == 30
    assert [f["rows"] for f in result["input"]["per_file"]] == [10, 10, 10]
    assert result["sample"]["rows"] == 12 and result["sample"]["files"] == 3
    assert result["tasks"][0]["sampled_ok"] == 12
    fs.invalidate_cache()
    assert not [p for p in fs.find("results") if not p.endswith("/")]  # the probe came and went


def test_limit_prices_and_runs_only_the_first_rows_in_an_output_of_their_own(ray_cluster, tiny_checkpoint,
                                                                              tmp_path):
    rows, _ = mixed_rows(good=20)
    write_inputs(rows[:20], str(tmp_path / "in"), files=2)  # 10 rows per file
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(out), tasks=SUMMARIZE))
    spec = load_job(str(job))
    result = dryrun.dry_run(spec, limit=13)
    limited = f"{out}/_limit/{spec.run_config_hash()[:16]}"
    assert result["output"] == limited and result["limit"] == 13
    assert result["input"]["rows"] == 13 and [f["rows"] for f in result["input"]["per_file"]] == [10, 3]
    assert result["units"]["total"] == 3 and result["units"]["rows_to_compute"] == 13  # 5 + 5 + 3 rows

    report = run_job(spec, limit=13)
    assert report["complete"] and report["limit"] == 13 and report["rows_in"] == report["rows_out"] == 13
    assert report["output"] == limited
    assert pq.read_table(limited).num_rows == 13
    # The job's own output is untouched: readers skip "_limit", and its status is empty.
    assert not list(out.glob("part-*")) and not (out / "_job.json").exists()
    assert pads.dataset(str(out), format="parquet").count_rows() == 0
    assert output_status(str(out))["state"] == "empty" and output_status(limited)["state"] == "complete"
    # Another prompt on the same first rows: an output of its own again, never mixed with the first.
    other = load_job(str(job), ["task.prompt=\"Shorter: {text}\""])
    assert run_job(other, limit=5)["output"] == f"{out}/_limit/{other.run_config_hash()[:16]}" != limited


# ---- the cost model and its calibrations ------------------------------------------------------


def test_pricing_uses_the_calibration_rates_at_its_own_shape_and_scales_elsewhere():
    cal = estimate.CALIBRATIONS[0]
    same = estimate.ModelCost(cal.prefill_flops, cal.decode_flops, cal.image_flops)
    work = estimate.Work(rows=100, prompt_tokens=cal.prefill_tokens_per_s * 3600,
                         decode_tokens=cal.decode_tokens_per_s * 3600, images=0)
    e = estimate.estimate(work, same, device="cpu", threads=cal.threads, min_actors=1, max_actors=4,
                          gpus_per_actor=0)
    assert e["calibration"]["name"] == cal.name and e["note"] == ""
    assert e["upper_bound"]["actor_hours"] == pytest.approx(2.0)  # an hour of prefill and one of decode
    assert e["upper_bound"]["wall_hours_at_max_actors"] == pytest.approx(0.5)
    assert e["upper_bound"]["wall_hours_at_min_actors"] == pytest.approx(2.0)
    assert e["upper_bound"]["gpu_hours"] == 0
    # Twice the work per token: half the rate; two threads: twice it (assumed linear).
    double = estimate.ModelCost(2 * cal.prefill_flops, 2 * cal.decode_flops, 2 * cal.image_flops)
    e2 = estimate.estimate(work, double, device="cpu", threads=2 * cal.threads, min_actors=1, max_actors=1,
                           gpus_per_actor=0, calibrations=(cal,))
    assert e2["upper_bound"]["actor_hours"] == pytest.approx(2.0) and "moved from shape" in e2["note"]
    # A GPU job with no GPU row: the CPU row, said so.
    g = estimate.estimate(work, same, device="cuda", threads=1, min_actors=2, max_actors=2, gpus_per_actor=0.5,
                          calibrations=(cal,))
    assert g["calibration"]["device"] == "cpu" and "no CUDA calibration has been measured yet" in g["note"]
    assert g["upper_bound"]["gpu_hours"] == pytest.approx(2.0 * 0.5)
    gpu = estimate.Calibration(**{**cal.as_dict(), "name": "cuda-x", "device": "cuda", "threads": 0})
    assert estimate.pick((cal, gpu), "cuda", same)[0] is gpu


def test_model_cost_counts_the_weights_a_token_passes_through():
    import model
    from jobs.bench import shape_config

    cfg = shape_config("tiny")
    cost = estimate.model_cost(cfg)
    net = model.random_model(cfg)
    params = dict(net.named_parameters())
    vocab_table = cfg.vocab_size * cfg.encoder.hidden_size

    def matrices(prefix):  # weight matrices (2-D) of the layers under prefix, norms and biases aside
        return sum(p.numel() for n, p in params.items() if n.startswith(prefix) and p.dim() == 2)

    encoder_layers = matrices("encoder.layers.")
    decoder_layers = matrices("decoder.layers.")
    assert encoder_layers > 0 and decoder_layers > 0
    d = cfg.decoder
    cross = d.num_layers * 2 * d.hidden_size * d.num_kv_heads * d.head_dim
    assert cost.prefill_per_token == 2 * (encoder_layers + cross)
    assert cost.decode_per_token == 2 * (decoder_layers + vocab_table)
    v = cfg.vision
    patches = (v.image_size // v.patch_size) ** 2
    tower = sum(p.numel() for n, p in params.items() if n.startswith("vision_tower.layers.") and p.dim() == 2)
    projector = params["projector.mm_input_projection_weight"].numel()
    assert cost.per_image == 2 * (patches * tower + cfg.mm_tokens_per_image * projector)


def test_the_calibration_table_in_docs_perf_md_is_the_one_the_code_prices_with():
    text = (REPO / "docs" / "perf.md").read_text()
    section = text[text.index("## Dry-run calibration"):]
    rows = [line for line in section.splitlines() if line.startswith("| cpu-") or line.startswith("| cuda-")]
    from jobs.calibrate import table_row

    assert rows == [table_row(c) for c in estimate.CALIBRATIONS]
    assert "no GPU" in section


def test_calibrate_times_the_jobs_shape_here_and_prices_from_it(demo_jobs, capsys, monkeypatch, no_model_work):
    import model
    from model.weights import load_config

    real = model.random_model
    built = []
    monkeypatch.setattr(model, "random_model", lambda config, **kw: built.append(config) or real(config, **kw))
    out, jobs = demo_jobs
    assert cli.main(["run", str(jobs["summarize"]), "--dry-run", "--calibrate", "--json"]) == cli.EXIT_OK
    e = json.loads(capsys.readouterr().out)["estimate"]
    cal = e["calibration"]
    assert cal["name"] == "measured now" and cal["device"] == "cpu" and cal["shape"] == "this job's"
    assert cal["prefill_tokens_per_s"] > 0 and cal["decode_tokens_per_s"] > 0
    assert "moved from shape" not in e["note"]  # measured at the job's own shape
    # Random weights at the checkpoint's shape: its config, never its weights (no_model_work).
    assert built == [load_config(out / "checkpoint")]
