"""Security of a job against hostile checkpoints, hostile names and leaking secrets (issue #5, point 8).

  * Checkpoints load from safetensors only: a checkpoint whose weights are a pickle that would run
    code (it creates a sentinel file when unpickled) is refused by job validation before any work,
    with a message naming the file and the fix, and the pickle is never unpickled, also when a
    safetensors index points at it or a safetensors file sits beside it.
  * Output names cannot escape the output prefix: ids and input file names with "../", absolute
    paths, NUL bytes, "%2e%2e" and backslashes go through a whole run; every file or object created
    is under output.path, every output name is a hash, and the ids come back verbatim.
  * No secret in logs, the run report, the job manifest, Parquet metadata or error messages: a run
    on S3 in its own process and its own Ray, with distinctive AWS credentials in its environment
    (the only credential source it has), and two jobs that fail; none of what they leave holds the
    key id or the secret. Job files that hold credentials are refused without echoing them.

Not here: run mechanics (test_run.py), faults during the commit (test_commit_faults.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import model
from helpers.pipeline_data import job_toml, rows_table
from operators import columns as C
from pipeline import run as run_module
from pipeline.run import run_job
from pipeline.spec import JobError, load_job

REPO = Path(__file__).resolve().parents[2]
TEXT_ONLY = """
[[task]]
kind = "summarize"
max_new_tokens = 2
"""
OUTPUT_NAME = re.compile(r"part-[0-9a-f]{32}\.parquet|_done/[0-9a-f]{32}\.json|_job\.json|_report\.json|_changes\.json")


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the run gets as far as starting or joining Ray."""

    def refuse(address=None):
        raise AssertionError("validation should have failed before Ray was touched")

    monkeypatch.setattr(run_module, "_connect", refuse)


def text_rows(ids: list[str]) -> list[dict]:
    return [{"id": i, "text": f"Document number {n} is short.".encode(), "image": None} for n, i in enumerate(ids)]


def write_parquet(rows: list[dict], path: str, fs=None) -> None:
    if fs is None:
        pq.write_table(rows_table(rows), path)
    else:
        with fs.open(path, "wb") as handle:  # test input, written whole before any run
            pq.write_table(rows_table(rows), handle)


# ---- pickle checkpoints ------------------------------------------------------------------------


class WritesSentinel:
    """Unpickling this runs code: it creates the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').write('code ran while unpickling')",))


def _pickled_checkpoint(tiny_checkpoint: Path, directory: Path, sentinel: Path, how: str) -> Path:
    """A copy of the tiny checkpoint (tokenizer and configs included) whose weights are a code-running pickle."""
    shutil.copytree(tiny_checkpoint, directory)
    payload = {"model.encoder.embed_tokens.weight": WritesSentinel(sentinel)}
    torch.save(payload, directory / "pytorch_model.bin")
    if how == "pickle-only":
        os.remove(directory / "model.safetensors")
    elif how == "index-names-the-pickle":
        os.remove(directory / "model.safetensors")
        weight_map = {name: "pytorch_model.bin" for name in ("model.encoder.embed_tokens.weight", "lm_head.weight")}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_the_sentinel_payload_runs_code_when_unpickled(tmp_path):
    """The payload is live: a loader that unpickled it would create the sentinel."""
    sentinel = tmp_path / "sentinel"
    torch.save({"x": WritesSentinel(sentinel)}, tmp_path / "pytorch_model.bin")
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert sentinel.exists()
    sentinel.unlink()
    pickle.loads(pickle.dumps(WritesSentinel(sentinel)))
    assert sentinel.exists()


def test_a_pickle_checkpoint_is_refused_by_job_validation(no_ray, tiny_checkpoint, tmp_path):
    sentinel = tmp_path / "sentinel"
    bad = _pickled_checkpoint(Path(tiny_checkpoint), tmp_path / "ckpt", sentinel, "pickle-only")
    (tmp_path / "in").mkdir()
    write_parquet(text_rows(["a", "b"]), str(tmp_path / "in" / "x.parquet"))
    text = job_toml(str(bad), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=TEXT_ONLY)
    with pytest.raises(JobError, match=r"model.source .*pytorch_model\.bin.*refused.*Convert them to safetensors"):
        run_job(load_job(text))
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("part-*"))


def test_a_pickle_beside_safetensors_is_never_opened(tiny_checkpoint, tmp_path):
    sentinel = tmp_path / "sentinel"
    ckpt = _pickled_checkpoint(Path(tiny_checkpoint), tmp_path / "ckpt", sentinel, "beside-safetensors")
    loaded = model.load_pretrained(ckpt)
    reference = model.load_pretrained(tiny_checkpoint)
    for (name, got), (_, want) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(got, want), name  # the weights are the safetensors ones
    assert not sentinel.exists()


def test_a_safetensors_index_naming_a_pickle_is_refused(no_ray, tiny_checkpoint, tmp_path):
    sentinel = tmp_path / "sentinel"
    bad = _pickled_checkpoint(Path(tiny_checkpoint), tmp_path / "ckpt", sentinel, "index-names-the-pickle")
    with pytest.raises(model.CheckpointError, match=r"pytorch_model\.bin"):
        model.load_pretrained(bad)  # refused by name, before any file is opened
    assert not sentinel.exists()
    (tmp_path / "in").mkdir()
    write_parquet(text_rows(["a", "b"]), str(tmp_path / "in" / "x.parquet"))
    text = job_toml(str(bad), f"{tmp_path}/in/*.parquet", str(tmp_path / "out"), tasks=TEXT_ONLY)
    try:
        with pytest.raises(JobError, match=r"pytorch_model\.bin.*safetensors"):
            run_job(load_job(text))
    finally:
        assert not sentinel.exists()


# ---- hostile names -----------------------------------------------------------------------------


def hostile_ids(tmp_path: Path) -> list[str]:
    return [
        "../../../../escape-id",
        str(tmp_path / "absolute-escape-id"),
        "/etc/t5g2-absolute-id",
        "nul\x00in-id",
        "%2e%2e%2f%2e%2e%2fpercent-id",
        "..\\..\\backslash-id",
        "part-" + "0" * 32,  # looks like an output name
        "_done/" + "1" * 32,
        "",
        "über ¿ 日本 \n newline",
    ]


ESCAPE_MARKERS = ("escape-id", "percent-id", "backslash-id", "absolute-id")


def _no_file_named_after_an_id(tmp_path: Path) -> None:
    """Nothing named after a hostile id anywhere a "../" or absolute id could have sent it."""
    found = [p for p in tmp_path.parent.rglob("*") if any(m in p.name for m in ESCAPE_MARKERS)]
    for root in (REPO, Path("/tmp"), Path("/etc"), Path("/")):
        found += [p for p in root.iterdir() if any(m in p.name for m in ESCAPE_MARKERS)]
    assert found == []


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _check_output_names(names: list[str]) -> None:
    for name in names:
        assert OUTPUT_NAME.fullmatch(name), name  # hashes and fixed names only: no id, no input name


def test_hostile_ids_and_file_names_stay_under_the_local_output(ray_cluster, tiny_checkpoint, tmp_path):
    ids = hostile_ids(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = ["x..%2e%2e%2f..pct.parquet", "back\\..\\..\\slash.parquet", "pct%00nul.parquet", "sp ace #h.parquet"]
    per_file = -(-len(ids) // len(names))
    for n, name in enumerate(names):
        write_parquet(text_rows(ids[n * per_file:(n + 1) * per_file]), str(inputs / name))
    out = tmp_path / "deep" / "er" / "out"  # "../" up to three levels would still land in tmp_path
    before = _files_under(tmp_path)
    paths = json.dumps([str(inputs / name) for name in names])
    report = run_job(load_job(job_toml(str(tiny_checkpoint), "PATHS", str(out), tasks=TEXT_ONLY,
                                       rows_per_file=2).replace('"PATHS"', paths)))
    assert report["rows_in"] == report["rows_out"] == len(ids) and report["complete"]

    created = _files_under(tmp_path) - before
    assert created and all(c.startswith("deep/er/out/") for c in created), sorted(created)
    _no_file_named_after_an_id(tmp_path)
    _check_output_names([c[len("deep/er/out/"):] for c in created])
    got = pq.read_table(out).column(C.ID).to_pylist()
    assert sorted(got) == sorted(ids)  # verbatim, each once


def test_hostile_ids_and_object_names_stay_under_the_s3_output(ray_cluster, tiny_checkpoint, tmp_path, s3):
    endpoint, _, fs = s3
    ids = hostile_ids(tmp_path)
    for bucket in ("corpus", "models", "results"):
        fs.mkdir(bucket)
    fs.put(str(tiny_checkpoint) + "/", "models/tiny/", recursive=True)
    keys = ["docs/../../dots.parquet", "docs//abs/olute.parquet", "docs/%2e%2e/%2e%2e/pct.parquet",
            "docs/nul\x00byte.parquet", "docs/..\\..\\back.parquet"]
    per_file = -(-len(ids) // len(keys))
    for n, key in enumerate(keys):
        write_parquet(text_rows(ids[n * per_file:(n + 1) * per_file]), f"corpus/{key}", fs=fs)

    def every_object() -> set[str]:
        fs.invalidate_cache()
        return {p for bucket in fs.ls("") for p in fs.find(bucket)}

    before = every_object()
    storage = f'[storage.s3]\nendpoint_url = "{endpoint}"\n'
    paths = json.dumps([f"s3://corpus/{key}" for key in keys])
    text = job_toml("s3://models/tiny/", "PATHS", "s3://results/run/", tasks=TEXT_ONLY, rows_per_file=2,
                    storage=storage).replace('"PATHS"', paths)
    report = run_job(load_job(text))
    assert report["rows_in"] == report["rows_out"] == len(ids) and report["complete"]

    created = every_object() - before
    assert created and all(c.startswith("results/run/") for c in created), sorted(created)
    _check_output_names([c[len("results/run/"):] for c in created])
    got = [i for c in sorted(created) if c.endswith(".parquet")
           for i in pq.read_table(fs.open(c, "rb")).column(C.ID).to_pylist()]
    assert sorted(got) == sorted(ids)
    _no_file_named_after_an_id(tmp_path)


# ---- secrets -----------------------------------------------------------------------------------

KEY_ID = "AKIAT5G2CANARY7Q3XZ9"
SECRET = "t5g2+Canary/Secret=Kq8vN3mP0wL5rT2yU7iO9aS4dF6gH1jZ"
SECRET_FORMS = {KEY_ID, SECRET, urllib.parse.quote(SECRET, safe=""), SECRET[:20], SECRET[-20:]}

# Runs the CLI on each job file, in one process that starts its own local Ray (which inherits the
# environment), as `t5g2 run` would be started by a person or a scheduler.
_RUN_JOBS = """
import json, sys
from jobs.cli import main
codes = [main(["run", path]) for path in sys.argv[1:]]
print("EXIT CODES " + json.dumps(codes), flush=True)
"""


def _secret_env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_", "T5G2_FAULT"))}
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
               # the environment is the only credential source the run has
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials", AWS_CONFIG_FILE="/nonexistent/config",
               AWS_EC2_METADATA_DISABLED="true", RAY_TMPDIR=ray_tmp)
    return env


def _leaks(where: str, data: bytes | str) -> list[str]:
    data = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return [f"{where}: {form[:8]}..." for form in SECRET_FORMS if form.encode() in data]


@pytest.mark.slow  # starts its own Ray in a fresh process (~20-40 s)
def test_no_secret_in_logs_report_metadata_or_errors(tiny_checkpoint, tmp_path, s3):
    endpoint, _, fs = s3
    for bucket in ("corpus", "models", "results"):
        fs.mkdir(bucket)
    fs.put(str(tiny_checkpoint) + "/", "models/tiny/", recursive=True)
    fs.put(str(Path(tiny_checkpoint) / "config.json"), "models/weightless/config.json")
    write_parquet(text_rows([f"doc-{n}" for n in range(6)]), "corpus/docs/a.parquet", fs=fs)
    storage = f'[storage.s3]\nendpoint_url = "{endpoint}"\n'
    jobs = {
        "ok": job_toml("s3://models/tiny/", "s3://corpus/docs/*.parquet", "s3://results/run/", tasks=TEXT_ONLY,
                       rows_per_file=3, storage=storage),
        "unwritable": job_toml("s3://models/tiny/", "s3://corpus/docs/*.parquet", "s3://no-such-bucket/out/",
                               tasks=TEXT_ONLY, storage=storage),
        "unreadable-model": job_toml("s3://models/weightless/", "s3://corpus/docs/*.parquet", "s3://results/other/",
                                     tasks=TEXT_ONLY, storage=storage),
    }
    for name, text in jobs.items():
        (tmp_path / f"{name}.toml").write_text(text)
    ray_tmp = tempfile.mkdtemp(prefix="t5g2ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        proc = subprocess.run([sys.executable, "-c", _RUN_JOBS, *(str(tmp_path / f"{n}.toml") for n in jobs)],
                              cwd=REPO, env=_secret_env(ray_tmp), capture_output=True, text=True, timeout=420)
        assert "EXIT CODES [0, 2, 2]" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
        # The failing jobs said why (so there were error messages to check).
        assert "no-such-bucket" in proc.stderr and "is not writable" in proc.stderr
        assert "s3://models/weightless/" in proc.stderr and "not a usable checkpoint" in proc.stderr

        found = _leaks("stdout", proc.stdout) + _leaks("stderr", proc.stderr)
        fs.invalidate_cache()
        outputs = fs.find("results/run")
        assert any(p.endswith("_report.json") for p in outputs) and any(p.endswith("_job.json") for p in outputs)
        for path in outputs:
            found += _leaks(path, fs.cat_file(path))
            if path.endswith(".parquet"):
                with fs.open(path, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    for key, value in (parquet.metadata.metadata or {}).items():
                        found += _leaks(f"{path} key-value metadata", key + b"=" + value)
                    for key, value in (parquet.schema_arrow.metadata or {}).items():
                        found += _leaks(f"{path} schema metadata", key + b"=" + value)
                    found += _leaks(f"{path} rows", json.dumps(parquet.read().to_pylist(), default=str))
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
        # These are the logs of this run (its model actor ran there), so a leak into them would be seen.
        assert any(b"InferActor" in p.read_bytes() for p in logs), "the run's Ray logs are not where expected"
        for path in logs:
            found += _leaks(str(path), path.read_bytes())
        assert found == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("override", [
    "storage.s3.token=VALUE",
    "storage.s3.password=VALUE",
    "storage.s3.client_kwargs.aws_access_key_id=VALUE",
    "storage.s3.client_kwargs.aws_session_token=VALUE",
    "storage.gcs.token=VALUE",
    "storage.az.account_key=VALUE",
    "storage.az.sas_token=VALUE",
    "storage.s3.config_kwargs.credentials=VALUE",
])
def test_credentials_in_a_job_file_are_refused_without_echoing_them(override):
    text = job_toml("/ckpt", "/in/*.parquet", "/out", tasks=TEXT_ONLY)
    with pytest.raises(JobError, match=r"looks like a credential; job files must not hold credentials") as info:
        load_job(text, [override.replace("VALUE", SECRET)])
    assert SECRET not in str(info.value) and SECRET[:10] not in str(info.value)


@pytest.mark.parametrize("path_key", ["output.path", "model.source", "input.path"])
def test_credentials_in_a_uri_are_refused_without_echoing_them(path_key):
    text = job_toml("/ckpt", "/in/*.parquet", "/out", tasks=TEXT_ONLY)
    uri = f"s3://{KEY_ID}:{urllib.parse.quote(SECRET, safe='')}@bucket/x/"
    with pytest.raises(JobError, match=r"embeds credentials") as info:
        load_job(text, [f"{path_key}={uri}"])
    assert not _leaks("message", str(info.value))
