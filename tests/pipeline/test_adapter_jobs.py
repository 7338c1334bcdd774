"""[model] adapter: a PEFT LoRA adapter named in the job file, checked before any work, part of the run
config (path and the files' identity), and merged by every model actor.

The adapter is built with peft on a transformers model of the tiny checkpoint's shape (random,
non-zero LoRA weights) and saved with peft's save_pretrained; the job runs on a local Ray, and its
rows must equal our own greedy decoding with the adapter merged (and differ from the base model's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pyarrow.dataset as pads
import pytest
import torch

import model
from helpers.checkpoints import TEXT_A, build_reference
from helpers.pipeline_data import job_toml, mixed_rows, write_inputs
from pipeline import run as run_module
from pipeline.run import run_job
from pipeline.spec import JobError, load_job
from pipeline.tasks import TASK_KINDS
from pipeline.validate import validate

MAX_NEW = 5
TASKS = f'[[task]]\nkind = "summarize"\nmax_new_tokens = {MAX_NEW}\n'


def save_adapter(directory, seed: int, **lora) -> str:
    from peft import LoraConfig, get_peft_model

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    peft_model = get_peft_model(build_reference(TEXT_A, seed=0), LoraConfig(**{**config, **lora}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5))
    peft_model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("adapter"), seed=1)


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(address=None):
        raise AssertionError("validation should have failed before Ray was touched")

    monkeypatch.setattr(run_module, "_connect", refuse)


@pytest.fixture
def job(tiny_checkpoint, tmp_path):
    rows, _ = mixed_rows(good=5)
    rows = rows[:5]  # the good ones
    write_inputs(rows, str(tmp_path / "in"), files=1)
    return rows, job_toml(str(tiny_checkpoint), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=TASKS)


def test_the_adapter_is_part_of_the_run_config(job, adapter, tmp_path):
    _, text = job
    plain = load_job(text)
    with_adapter = load_job(text, [f"model.adapter={adapter}"])
    assert plain.model.adapter is None and with_adapter.model.adapter == adapter
    assert "adapter" not in plain.run_config()["model"]  # jobs without one keep the hash they had
    assert with_adapter.run_config_hash() != plain.run_config_hash()
    assert with_adapter.run_config_hash() != load_job(text, [f"model.adapter={tmp_path}/other"]).run_config_hash()
    # The files' identity, which validation fills in, changes the hash too.
    a = dataclasses.replace(with_adapter, model=dataclasses.replace(with_adapter.model, adapter_identity="x"))
    b = dataclasses.replace(with_adapter, model=dataclasses.replace(with_adapter.model, adapter_identity="y"))
    assert a.run_config_hash() != b.run_config_hash()


def test_validation_identifies_the_adapter_files(job, adapter, tmp_path):
    _, text = job
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    v = validate(load_job(text, [f"model.adapter={copy}"]))
    identity = v.spec.model.adapter_identity
    assert "adapter_config.json:size=" in identity and "adapter_model.safetensors:size=" in identity
    assert v.run_hash == v.spec.run_config_hash() and v.checkpoint.adapter.rank == 4
    assert validate(load_job(text, [f"model.adapter={copy}"])).run_hash == v.run_hash  # stable
    weights = copy / "adapter_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place, same size
    assert validate(load_job(text, [f"model.adapter={copy}"])).run_hash != v.run_hash


def edit_config(adapter, directory, **changes) -> str:
    shutil.copytree(adapter, directory)
    raw = json.loads((directory / "adapter_config.json").read_text())
    raw.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(raw))
    return str(directory)


@pytest.mark.parametrize("make, message", [
    (lambda a, d: str(d / "nowhere"), r"model.adapter '.*nowhere' is not a usable LoRA adapter.*not found"),
    (lambda a, d: (shutil.copytree(a, d / "x"), os.remove(d / "x" / "adapter_model.safetensors"), str(d / "x"))[-1],
     r"model.adapter .* has no adapter_model.safetensors"),
    (lambda a, d: (shutil.copytree(a, d / "x"), os.remove(d / "x" / "adapter_config.json"), str(d / "x"))[-1],
     r"model.adapter .* has no adapter_config.json"),
    (lambda a, d: edit_config(a, d / "x", use_dora=True), r"model.adapter .*use_dora is True.*DoRA"),
    (lambda a, d: edit_config(a, d / "x", peft_type="IA3"), r"model.adapter .*peft_type is 'IA3'"),
    (lambda a, d: save_adapter(d / "x", seed=2, target_modules=["lm_head.out_proj"]),
     r"model.adapter .*lm_head\.out_proj \(not a supported projection"),
])
def test_a_bad_adapter_fails_the_job_before_any_work(no_ray, job, adapter, tmp_path, make, message):
    _, text = job
    with pytest.raises(JobError, match=message):
        run_job(load_job(text, [f"model.adapter={make(adapter, tmp_path)}"]))
    assert not list((tmp_path / "out").glob("part-*"))


def greedy_texts(checkpoint, rows, adapter=None) -> list[str]:
    tok = model.Tokenizer.from_pretrained(checkpoint)
    generator = model.Generator(model.load_pretrained(checkpoint, adapter=adapter))
    template = TASK_KINDS["summarize"].template
    requests = [model.Request(input_ids=tok.encode_prompt(template.format(text=r["text"].decode())),
                              params=model.GenerationParams(max_new_tokens=MAX_NEW)) for r in rows]
    return [tok.decode_one(r.token_ids) for r in generator.generate(requests)]


def test_the_model_actors_merge_the_adapter(ray_cluster, tiny_checkpoint, job, adapter, tmp_path):
    rows, text = job
    spec = load_job(text, [f"model.adapter={adapter}"])
    assert run_job(spec)["rows_out"] == len(rows)
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    got = {r["id"]: r["summary"] for r in table}
    expected = greedy_texts(tiny_checkpoint, rows, adapter=adapter)
    assert [got[r["id"]] for r in rows] == expected
    assert expected != greedy_texts(tiny_checkpoint, rows)  # the adapter changes the output
    manifest = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert manifest["run_config"]["model"]["adapter"] == adapter
    assert manifest["run_config"]["model"]["adapter_identity"] == validate(spec).spec.model.adapter_identity
    # Resuming with the same adapter computes nothing; another adapter at the same path is another output.
    assert run_job(load_job(text, [f"model.adapter={adapter}"]))["rows_out"] == 0
    moved = tmp_path / "adapter-v2"
    save_adapter(moved, seed=3)
    with pytest.raises(JobError, match=r"different settings \(changed: model\)"):
        run_job(load_job(text, [f"model.adapter={moved}"]))


def test_a_limited_run_of_an_adapter_job_gets_a_directory_per_adapter_version(no_ray, job, adapter, tmp_path):
    """--limit names its directory by the run config validation resolves: a rewritten adapter at the same
    path is a new directory, never one whose manifest refuses it."""
    from pipeline.dryrun import dry_run

    _, text = job
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    spec = load_job(text, [f"model.adapter={copy}"])
    first = dry_run(spec, limit=3)
    assert first["output"] == f"{tmp_path}/out/_limit/{validate(spec).run_hash[:16]}"
    weights = copy / "adapter_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place
    second = dry_run(spec, limit=3)
    assert second["output"] != first["output"] and second["input"]["rows"] == 3
