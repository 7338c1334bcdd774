"""The t5g2 command line: run, inspect, dispatch to demo/bench, exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from jobs import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def job_file(tiny_checkpoint, tmp_path):
    rows, _ = mixed_rows(good=4)
    write_inputs(rows[:6], str(tmp_path / "in"), files=1)
    path = tmp_path / "job.toml"
    path.write_text(job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"),
                             max_new_tokens=3))
    return path


def test_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0 and "t5g2 {run,status,inspect,demo,bench}" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


def test_run_and_rerun(ray_cluster, job_file, tmp_path, capsys):
    # The input has two bad texts: complete, with error rows (exit 3), now and on a rerun that computes nothing.
    assert cli.main(["run", str(job_file), "--set", "resources.rows_per_call=4"]) == cli.EXIT_ERROR_ROWS
    out = capsys.readouterr().out
    assert "rows in 6, written now 6, already done 0" in out
    assert cli.main(["run", str(job_file)]) == cli.EXIT_ERROR_ROWS
    assert "written now 0, already done 6" in capsys.readouterr().out


def test_bad_job_exits_2_with_the_fix(job_file, capsys, monkeypatch):
    import pipeline.run

    monkeypatch.setattr(pipeline.run, "_connect", lambda address=None: pytest.fail("Ray must not start"))
    assert cli.main(["run", str(job_file), "--set", "input.text_column=body"]) == 2
    err = capsys.readouterr().err
    assert "input.text_column 'body' is not a column" in err and "set input.text_column to one of them" in err
    assert cli.main(["run", str(job_file), "--set", "resources.gpu_actor=2"]) == 2
    assert "did you mean 'gpu_actors'" in capsys.readouterr().err


def test_inspect_job_and_checkpoint(job_file, tiny_checkpoint, capsys):
    assert cli.main(["inspect", str(job_file)]) == 0
    out = capsys.readouterr().out
    assert "1 file(s), 6 rows" in out and "2 unit(s) of <= 5 rows, 0 done, 2 to compute" in out
    assert "task      summarize -> summary" in out and "1 actor(s) x (CPU" in out
    assert "a call taken as hung after 1800 s" in out
    assert cli.main(["inspect", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "encoder  3 layers (2 sliding (window 5) + 1 full)" in out and "tokenizer.model yes" in out
    assert "tokenizer read from tokenizer.model" in out and "generation  generation_config.json: eos [1]" in out
    assert "ignored" not in out and "adapter" not in out
    assert cli.main(["inspect", str(tiny_checkpoint) + "-missing"]) == 2


def test_inspect_shows_what_a_checkpoint_brings(tiny_checkpoint, job_file, tmp_path, capsys):
    """tokenizer.json read, generation_config.json's ids and settings, ignored settings, an adapter."""
    import json

    from peft import LoraConfig, get_peft_model

    from helpers.checkpoints import TEXT_A, build_reference
    from tests.model.test_tokenizer_json import convert_to_tokenizer_json

    ckpt = tmp_path / "ckpt"
    convert_to_tokenizer_json(tiny_checkpoint, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["decoder"]["attn_logit_softcapping"] = 50.0
    (ckpt / "config.json").write_text(json.dumps(raw))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3], "bos_token_id": 2,
                                                             "do_sample": True, "temperature": 0.6}))
    adapter = tmp_path / "adapter"
    get_peft_model(build_reference(TEXT_A), LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"])
                   ).save_pretrained(adapter)
    assert cli.main(["inspect", str(ckpt), "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer read from tokenizer.json (tokenizer.model no, tokenizer.json yes)" in out
    assert "eos [1, 3]" in out and "generation_config.json: eos [1, 3], bos 2 (its ids are used" in out
    assert 'do_sample=true, temperature=0.6: shown only, not applied; a job\'s [[task]] settings decide' in out
    assert "ignored     " in out and "decoder.attn_logit_softcapping is 50: ignored" in out
    assert f"adapter     {adapter}: LoRA rank 2, alpha 6 (scale 3), 14 projections: k_proj, up_proj" in out
    (adapter / "adapter_model.safetensors").unlink()
    assert cli.main(["inspect", str(ckpt), "--adapter", str(adapter)]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
    assert cli.main(["inspect", str(job_file), "--adapter", str(adapter)]) == 2


def test_inspect_job_shows_its_adapter(job_file, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from helpers.checkpoints import TEXT_A, build_reference

    adapter = tmp_path / "adapter"
    get_peft_model(build_reference(TEXT_A), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    assert cli.main(["inspect", str(job_file), "--set", f"model.adapter={adapter}"]) == 0
    out = capsys.readouterr().out
    assert f"LoRA adapter {adapter}, tokenizer from tokenizer.model" in out
    assert f"adapter     {adapter}: LoRA rank 2, alpha 2 (scale 1)" in out


def test_demo_and_bench_are_imported_lazily(monkeypatch):
    code = "import sys, jobs.cli; print(any(m in sys.modules for m in ('jobs.demo', 'jobs.bench', 'ray')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    calls = []
    fake = types.ModuleType("jobs.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "jobs.bench", fake)
    import jobs

    monkeypatch.setattr(jobs, "bench", fake, raising=False)
    assert cli.main(["bench", "--shape", "tiny"]) == 0 and calls == [["--shape", "tiny"]]


def test_run_exit_codes_by_failure(job_file, capsys, monkeypatch):
    """What cmd_run makes of each way run_job can end (the README's exit-code table)."""
    import pipeline.run
    from pipeline.paths import StorageError
    from pipeline.run import ClusterError, InfrastructureError, Interrupted

    out = str(job_file.parent / "out")

    def ending(result=None, error=None, report=None):
        def run_job(spec, address=None, limit=None):
            if error is not None:
                if report is not None:
                    error.report = report
                raise error
            return result
        monkeypatch.setattr(pipeline.run, "run_job", run_job)
        code = cli.main(["run", str(job_file)])
        return code, capsys.readouterr()

    complete = {"output": out, "complete": True, "all_runs": {"errors_by_kind": {}}}
    code, seen = ending(result=complete)
    assert code == cli.EXIT_OK and seen.out.splitlines()[-1] == f"{out}/_report.json"
    code, seen = ending(result={**complete, "all_runs": {"errors_by_kind": {"text_empty": 2}}})
    assert code == cli.EXIT_ERROR_ROWS and seen.out.splitlines()[-1] == f"{out}/_report.json"
    assert ending(result={**complete, "complete": False})[0] == cli.EXIT_INFRASTRUCTURE
    code, seen = ending(error=InfrastructureError("actors kept dying"), report={"output": out})
    assert code == cli.EXIT_INFRASTRUCTURE and "the job stopped: actors kept dying" in seen.err
    assert seen.out.splitlines()[-1] == f"{out}/_report.json"  # the report written for the failure
    code, seen = ending(error=StorageError("cannot write 'part-x.parquet'"))
    assert code == cli.EXIT_INFRASTRUCTURE and not seen.out.strip()  # no report after a storage failure
    assert ending(error=ClusterError("no Ray cluster answers at 1.2.3.4:6379"))[0] == cli.EXIT_INFRASTRUCTURE
    ray_error = type("RaySystemError", (Exception,), {"__module__": "ray.exceptions"})
    assert ending(error=ray_error("the GCS went away"))[0] == cli.EXIT_INFRASTRUCTURE
    code, seen = ending(error=Interrupted(15), report={"output": out})
    assert code == 143 and seen.out.splitlines()[-1] == f"{out}/_report.json"
    with pytest.raises(KeyError):  # a bug is not hidden behind an exit code: the traceback, exit 1
        ending(error=KeyError("oops"))


def test_a_transient_storage_error_in_validation_is_infrastructure():
    from pipeline.paths import StorageError
    from pipeline.spec import JobError

    def chained(*errors):
        for outer, inner in zip(errors, errors[1:]):
            outer.__cause__ = inner
        return errors[0]

    refused = chained(JobError("input.path ..."), StorageError("cannot list"), ConnectionRefusedError(111, "refused"))
    assert cli.is_infrastructure(refused)
    slow_down = Exception("SlowDown")
    slow_down.response = {"ResponseMetadata": {"HTTPStatusCode": 503}}
    assert cli.is_infrastructure(chained(JobError("x"), StorageError("y"), slow_down))
    denied = Exception("AccessDenied")
    denied.response = {"ResponseMetadata": {"HTTPStatusCode": 403}}
    assert not cli.is_infrastructure(chained(JobError("no write access"), StorageError("y"), denied))
    assert not cli.is_infrastructure(chained(JobError("not a column"), FileNotFoundError("gone")))
