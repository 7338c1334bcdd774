"""Checkpoint loading: sharded files, s3:// through a real S3 server, our own writer, and
every way a checkpoint can be wrong (each must fail with a message naming the problem)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from helpers.checkpoints import TEXT_A, TEXT_C, build_reference, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference():
    return build_reference(TEXT_A, seed=7)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return save_checkpoint(reference, tmp_path_factory.mktemp("ckpt"))


def logits_of(m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 512, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    dec = torch.randint(10, 512, (2, 5), generator=gen)
    with torch.no_grad():
        return m(ids, mask, dec)


def test_sharded_checkpoint_loads_same_weights(reference, checkpoint, tmp_path):
    sharded = save_checkpoint(reference, tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits_of(model.load_pretrained(sharded)), logits_of(model.load_pretrained(checkpoint)),
                               rtol=0, atol=0)


def test_load_from_s3(reference, checkpoint, s3, tmp_path):
    _, options, fs = s3
    fs.mkdir("models")
    sharded = save_checkpoint(reference, tmp_path / "sharded", max_shard_size="60KB")
    fs.put(str(sharded) + "/", "models/tiny/", recursive=True)
    assert fs.exists("models/tiny/model.safetensors.index.json")
    remote = model.load_pretrained("s3://models/tiny/", storage_options=options)
    torch.testing.assert_close(logits_of(remote), logits_of(model.load_pretrained(checkpoint)), rtol=0, atol=0)


def test_dtypes(checkpoint):
    for name, dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)]:
        m = model.load_pretrained(checkpoint, dtype=name)
        assert {p.dtype for p in m.parameters()} == {dtype}
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        model.load_pretrained(checkpoint, dtype="int8")


def test_our_writer_is_read_by_transformers(tmp_path):
    """save_pretrained (ours, no transformers) writes what the reference loads, exactly."""
    from transformers import T5Gemma2ForConditionalGeneration

    config = model.load_config(save_checkpoint(build_reference(TEXT_C, seed=3), tmp_path / "src"))
    ours = model.random_model(config, seed=11)
    model.save_pretrained(ours, tmp_path / "written")
    ref = T5Gemma2ForConditionalGeneration.from_pretrained(tmp_path / "written", attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 512, (2, 9), generator=gen)
    dec = torch.randint(10, 512, (2, 4), generator=gen)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
        got = ours(ids, torch.ones_like(ids), dec)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    reloaded = model.load_pretrained(tmp_path / "written")
    assert reloaded.config == config


# ---- negative cases: each names what is wrong ------------------------------------------------


def copy_checkpoint(src: Path, dst: Path, edit=None) -> Path:
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(checkpoint, tmp_path):
    key = "model.decoder.layers.1.mlp.up_proj.weight"
    bad = copy_checkpoint(checkpoint, tmp_path / "bad", lambda t: t.pop(key))
    with pytest.raises(model.CheckpointError, match=r"missing tensors.*decoder\.layers\.1\.mlp\.up_proj\.weight"):
        model.load_pretrained(bad)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    bad = copy_checkpoint(checkpoint, tmp_path / "bad",
                          lambda t: t.update({"model.encoder.extra.weight": torch.ones(3)}))
    with pytest.raises(model.CheckpointError, match=r"unexpected tensors: model\.encoder\.extra\.weight"):
        model.load_pretrained(bad)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    key = "model.encoder.layers.0.self_attn.q_proj.weight"
    bad = copy_checkpoint(checkpoint, tmp_path / "bad", lambda t: t.update({key: torch.zeros(3, 3)}))
    with pytest.raises(model.CheckpointError, match=r"wrong shape.*layers\.0\.self_attn\.q_proj\.weight \(3, 3\)"):
        model.load_pretrained(bad)


def test_pickle_only_checkpoint_is_refused_without_unpickling(checkpoint, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    sentinel = tmp_path / "pwned"

    class Payload:  # unpickling this would create the sentinel file
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    torch.save({"x": Payload()}, bad / "pytorch_model.bin")
    with pytest.raises(model.CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*refused"):
        model.load_pretrained(bad)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}', "is not T5Gemma 2"),
        ('{"model_type": "t5gemma2"}', "field 'encoder' is missing"),
    ],
)
def test_malformed_config_json(checkpoint, tmp_path, text, message):
    bad = copy_checkpoint(checkpoint, tmp_path / "bad")
    (bad / "config.json").write_text(text)
    with pytest.raises(model.ConfigError, match=message):
        model.load_pretrained(bad)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["decoder"].update(hidden_activation="relu"),
         r"decoder\.hidden_activation 'relu' is not supported"),
        (lambda c: c["decoder"].update(num_key_value_heads=3), r"must be a multiple of num_key_value_heads"),
        (lambda c: c["encoder"]["text_config"].update(layer_types=["sliding_attention"]), r"layer_types has 1 entries"),
        (lambda c: c["decoder"]["rope_parameters"]["full_attention"].update(rope_type="yarn"), r"rope_type 'yarn'"),
        (lambda c: c["encoder"]["vision_config"].update(vision_use_head="yes"), r"vision_use_head must be true or"),
        (lambda c: c["decoder"].update(attn_logit_softcapping="50"), r"decoder\.attn_logit_softcapping must be a num"),
        (lambda c: c["decoder"].update(hidden_size="64"), r"decoder\.hidden_size must be an integer"),
    ],
)
def test_unsupported_options_name_the_field(checkpoint, tmp_path, edit, message):
    cfg = json.loads((checkpoint / "config.json").read_text())
    edit(cfg)
    with pytest.raises(model.ConfigError, match=message):
        model.T5Gemma2Config.from_dict(cfg)


def test_older_config_layout_parses(checkpoint):
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern, as older files have them."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    for side in (cfg["encoder"]["text_config"], cfg["decoder"]):
        side.pop("rope_parameters")
        side.pop("layer_types")
        side.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                    sliding_window_pattern=3)
    parsed = model.T5Gemma2Config.from_dict(cfg)
    assert parsed.decoder.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert parsed.decoder.rope["full_attention"].factor == 8.0
    assert parsed.decoder.rope["sliding_attention"].scaling == "default"


def test_missing_directory_and_hub_id_offline(tmp_path):
    with pytest.raises(model.CheckpointError, match="not found"):
        model.load_pretrained(tmp_path / "nope")
    # This machine cannot reach the hub: the id must fail fast, saying what to do instead.
    with pytest.raises(model.CheckpointError,
                       match=r"(?s)cannot fetch hub checkpoint 'google/t5gemma-2-270m-270m'.*offline"):
        model.load_pretrained("google/t5gemma-2-270m-270m")


def test_model_package_imports_no_transformers_ray_or_pyarrow():
    forbidden = {"transformers", "ray", "pyarrow"}
    for path in (ROOT / "model").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
