"""HF checkpoints in and out: tiny transformers models of each family imported under TP1, TP2,
PP2 and TP2xPP2 give transformers' logits, log-probs and entropy; import -> export -> save
gives the original tensors byte for byte; bad checkpoints fail by name and write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sfpo_megatron.common.errors import CheckpointError
from sfpo_megatron.hf.export import source_dtype
from sfpo_megatron.hf.load import HFCheckpoint
from sfpo_megatron.models.arch import read_hf_config

from conftest import REPO, TESTS, save_random_hf_model, torchrun

MODELS = {  # name -> (family, overrides); vocab 300 / 260: not multiples of TP x 128
    "qwen2": ("qwen2", {}),
    "qwen2_sharded": ("qwen2", {"save_max_shard_size": "60KB"}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3_tied": ("qwen3", {}),
    "llama": ("llama", {}),
}
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}
BUCKET_MB = 0.02


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, 260, (4, 12), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, root / "tokens.pt")
    expected = {}
    for name, (family, overrides) in MODELS.items():
        model = save_random_hf_model(root / name, family, **overrides)
        with torch.no_grad():
            logits = model(tokens).logits.float()
        expected[name] = {"dir": root / name, "logits": logits}
    base = [
        "model.dtype=fp32",
        "train.prompts_per_step=2",
        "train.samples_per_prompt=2",
        "train.mini_batch_prompts=2",
        "train.micro_batch_size=1",
        f"checkpoint.export_shard_mb={BUCKET_MB}",
    ]
    for world in (1, 2, 4):
        cases = {
            f"{m}-{lay}": base + [f"model.hf_config={root / m}"] + overrides
            for m in MODELS
            for lay, (w, overrides) in LAYOUTS.items()
            if w == world
        }
        spec = {
            "out": str(root / "out"),
            "cases": cases,
            "tokens": str(root / "tokens.pt"),
            "bucket_mb": BUCKET_MB,
        }
        (root / "out").mkdir(exist_ok=True)
        (root / f"spec{world}.json").write_text(json.dumps(spec))
        torchrun(world, TESTS / "dist" / "hf_worker.py", str(root / f"spec{world}.json"))
    return root, expected, tokens


CASES = [(m, lay) for m in MODELS for lay in LAYOUTS]


@pytest.mark.parametrize("model, layout", CASES)
def test_logits_match_transformers(hf_runs, model, layout):
    root, expected, _ = hf_runs
    got = torch.load(root / "out" / f"{model}-{layout}.pt")
    ref = expected[model]["logits"]
    assert ((got["logits"] - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("model, layout", CASES)
def test_logprobs_entropy_over_real_vocab(hf_runs, model, layout):
    """Padding columns exist (vocab 300 -> 384 or 512) and must carry no probability."""
    root, expected, tokens = hf_runs
    got = torch.load(root / "out" / f"{model}-{layout}.pt")
    logp = torch.log_softmax(expected[model]["logits"], dim=-1)
    ref_lp = logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)[:, :-1]
    torch.testing.assert_close(got["logprobs"][:, 1:], ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["entropy"][:, 1:], ref_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, layout", CASES)
def test_export_is_byte_identical(hf_runs, model, layout):
    root, expected, _ = hf_runs
    source, exported = expected[model]["dir"], root / "out" / f"{model}-{layout}"
    original = {k: v for f in source.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    files = sorted(exported.glob("*.safetensors"))
    assert len(files) > 1  # saved with small shards: the index path
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"].values()) == sorted(
        f.name for f in files for _ in safe_open(str(f), "pt").keys()
    )
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in original.values()
    )
    saved = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert set(saved) == set(original)
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype, name
        assert saved[name].numpy().tobytes() == tensor.numpy().tobytes(), name
    assert (exported / "tokenizer_config.json").is_file()
    assert json.loads((exported / "config.json").read_text())["model_type"] == MODELS[model][0]


def test_export_buckets_are_bounded(hf_runs):
    root, _, _ = hf_runs
    got = torch.load(root / "out" / "qwen2-tp1.pt")
    limit = BUCKET_MB * 2**20
    assert len(got["buckets"]) > 3
    for size, count in zip(got["buckets"], got["bucket_tensors"], strict=True):
        assert size <= limit or count == 1


# ---------------------------------------------------------------- errors write nothing


def export_cli(config_dir, out, *overrides, path_before=()):
    """``export-hf`` of a config naming only the model (model.dtype: the default bf16);
    ``path_before``: directories searched for modules before the checkout."""
    cfg = config_dir / "run.yaml"
    cfg.write_text(f"model:\n  hf_config: {config_dir}\n")
    path = os.pathsep.join([*map(str, path_before), str(REPO)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "sfpo_megatron.cli", "export-hf", str(cfg), str(out), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def good_model(tmp_path):
    directory = tmp_path / "model"
    save_random_hf_model(directory, "qwen2")
    return directory


def test_export_cli_round_trip_keeps_the_source_dtype(good_model, tmp_path):
    """An fp32 checkpoint comes back fp32 and bit for bit, whatever model.dtype says;
    ``--dtype`` chooses another."""
    source = load_file(str(good_model / "model.safetensors"))
    assert {t.dtype for t in source.values()} == {torch.float32}
    proc = export_cli(good_model, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {tmp_path / 'out'} (fp32)" in proc.stdout
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[name], source[name]) for name in source)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {config.get("torch_dtype"), config.get("dtype")} - {None} == {"float32"}
    proc = export_cli(good_model, tmp_path / "bf16", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {tmp_path / 'bf16'} (bf16)" in proc.stdout
    exported = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(torch.equal(exported[name], source[name].bfloat16()) for name in source)


def test_export_refuses_model_dtype_for_its_dtype_flag(good_model, tmp_path):
    proc = export_cli(good_model, tmp_path / "out", "model.dtype=fp32")
    assert proc.returncode == 2 and "--dtype, not model.dtype" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_source_dtype_from_weights_else_config(good_model, tmp_path):
    from safetensors.torch import save_file

    checkpoint = HFCheckpoint(good_model)
    assert source_dtype(good_model, checkpoint) == "fp32"
    tensors = load_file(str(good_model / "model.safetensors"))
    save_file({k: v.half() for k, v in tensors.items()}, str(good_model / "model.safetensors"))
    assert source_dtype(good_model, HFCheckpoint(good_model)) == "fp16"
    mixed = {k: v.bfloat16() if "norm" in k else v.half() for k, v in tensors.items()}
    save_file(mixed, str(good_model / "model.safetensors"))
    assert source_dtype(good_model, HFCheckpoint(good_model)) == "fp32"  # holds both exactly
    config = json.loads((good_model / "config.json").read_text())
    for key, value, expected in (("torch_dtype", "bfloat16", "bf16"), ("dtype", "float16", "fp16")):
        config.pop("torch_dtype", None)
        config.pop("dtype", None)
        (good_model / "config.json").write_text(json.dumps({**config, key: value}))
        assert source_dtype(good_model, None) == expected  # no weights loaded: the config's
    (good_model / "config.json").write_text(json.dumps(config))
    assert source_dtype(good_model, None) is None


def test_truncated_file(good_model, tmp_path):
    path = good_model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        HFCheckpoint(good_model)
    proc = export_cli(good_model, tmp_path / "out")
    assert proc.returncode == 2 and "not a readable safetensors" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_config_weights_mismatch(good_model, tmp_path):
    config = json.loads((good_model / "config.json").read_text())
    config["intermediate_size"] = 128
    (good_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"layers.0.mlp.gate_proj.weight has shape \[96, 64\]"
        r", its config.json implies \[128, 64\]",
    ):
        HFCheckpoint(good_model).validate(read_hf_config(good_model))
    proc = export_cli(good_model, tmp_path / "out")
    assert proc.returncode == 2 and "implies" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_and_extra_tensors(good_model):
    from safetensors.torch import save_file

    tensors = load_file(str(good_model / "model.safetensors"))
    arch = read_hf_config(good_model)
    dropped = dict(tensors)
    del dropped["model.layers.1.self_attn.k_proj.bias"]
    save_file(dropped, str(good_model / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.self_attn.k_"):
        HFCheckpoint(good_model).validate(arch)
    save_file(
        {**tensors, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)},
        str(good_model / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="does not describe.*layers.9.mlp.up_proj"):
        HFCheckpoint(good_model).validate(arch)


def test_unsupported_model_type(good_model, tmp_path):
    config = json.loads((good_model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (good_model / "config.json").write_text(json.dumps(config))
    proc = export_cli(good_model, tmp_path / "out")
    assert proc.returncode == 2 and "model_type 'gpt2' is not supported" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_tied_model_with_a_different_lm_head(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "tied"
    save_random_hf_model(directory, "qwen3")
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but lm_head.weight"):
        HFCheckpoint(directory).validate(read_hf_config(directory))


def test_import_peak_memory_is_below_one_model_copy(tmp_path):
    """TP2 import of a 120 MiB checkpoint: each rank's resident memory grows by less than the
    model's size while it imports; in fact by less than 3/4 of it (it owns half, maps each
    file only while it reads one slice, and holds at most a slice and its padded copy)."""
    directory = tmp_path / "big"
    save_random_hf_model(
        directory,
        "qwen2",
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=1152,
        num_attention_heads=6,
        num_key_value_heads=2,
    )
    model_bytes = (directory / "model.safetensors").stat().st_size
    torchrun(
        2,
        TESTS / "dist" / "import_rss_worker.py",
        str(tmp_path / "rss.json"),
        f"model.hf_config={directory}",
        "model.dtype=fp32",
        "parallel.tensor=2",
        "train.prompts_per_step=2",
        "train.samples_per_prompt=2",
        "train.mini_batch_prompts=2",
    )
    for rank in json.loads((tmp_path / "rss.json").read_text()):
        growth = (rank["peak_kib"] - rank["rss_before_kib"]) * 1024
        print(
            f"rank {rank['rank']}: import peak growth {growth / 2**20:.1f} MiB for a "
            f"{model_bytes / 2**20:.1f} MiB checkpoint"
        )
        assert growth < 0.75 * model_bytes
