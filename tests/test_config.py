"""Config loading and validation: every rule fails with a message naming its key."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from sfpo_megatron import cli
from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.config import load_config, stop_signal, validate_layout, validate_lengths
from sfpo_megatron.models.arch import read_hf_config
from sfpo_megatron.training.sampling import EVAL_SLOT, sampling_seed

from conftest import write_hf_config


@pytest.fixture
def model_dir(tmp_path):
    return write_hf_config(tmp_path / "m", "qwen2")


def load(model_dir, *overrides):
    return load_config(None, [f"model.hf_config={model_dir}", *overrides])


def test_yaml_and_overrides(tmp_path, model_dir):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  hf_config: m\n  dtype: fp32\n"
        "optimizer:\n  lr: 1e-6\n"  # YAML 1.1 reads 1e-6 as a string: accepted for floats
        "parallel:\n  tensor: 2\n"
    )
    cfg = load_config(path, ["parallel.tensor=1", "train.micro_batch_size=4"])
    assert cfg.model.hf_config == str(model_dir)  # relative to the YAML file
    assert cfg.model.dtype == "fp32"
    assert cfg.optimizer.lr == 1e-6
    assert cfg.parallel.tensor == 1
    assert cfg.train.micro_batch_size == 4
    assert cfg.sequences_per_step == 256 * 8


@pytest.mark.parametrize(
    "override, key",
    [
        ("parallel.tensr=2", "parallel.tensr"),
        ("paralel.tensor=2", "paralel"),
        ("parallel.tensor=two", "parallel.tensor"),
        ("parallel.tensor=1.5", "parallel.tensor"),
        ("parallel.sequence_parallel=yes please", "parallel.sequence_parallel"),
        ("model.dtype=fp8", "model.dtype"),
        ("optimizer.lr=fast", "optimizer.lr"),
    ],
)
def test_unknown_keys_and_bad_types(model_dir, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(model_dir, override)


def test_unknown_key_suggests_the_close_one(model_dir):
    with pytest.raises(ConfigError, match="did you mean 'parallel.tensor'"):
        load(model_dir, "parallel.tensr=2")


@pytest.mark.parametrize(
    "overrides, key",
    [
        ([], "model.hf_config"),
        (["parallel.tensor=0"], "parallel.tensor"),
        (["train.prompts_per_step=10", "train.mini_batch_prompts=4"], "train.prompts_per_step"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
        (["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline"),
        (
            ["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"],
            "parallel.overlap_param_gather",
        ),
        (["algorithm.clip_eps_high=0.1"], "algorithm.clip_eps_high"),
        (["rollout.temperature=0"], "rollout.temperature"),
        (["reward.max_error_fraction=1.5"], "reward.max_error_fraction=1.5 must be in"),
        (["reward.max_error_fraction=-0.1"], "reward.max_error_fraction=-0.1"),
        (["checkpoint.interval=5"], "checkpoint.interval"),
        (["optimizer.min_lr=1.0"], "optimizer.min_lr"),
        (["checkpoint.stop_signals=[USR1, FOO]"], "checkpoint.stop_signals: 'FOO' is not a signal"),
        (["checkpoint.stop_signals=KILL"], "checkpoint.stop_signals: 'KILL'"),
        (["checkpoint.stop_file=''"], "checkpoint.stop_file"),
        (["train.max_sampling_rounds=64"], "train.max_sampling_rounds=64 must be <= 63"),
        (["train.max_sampling_rounds=0"], "train.max_sampling_rounds=0 must be >= 1"),
        (["model.seed=-1"], "model.seed=-1 must be >= 0"),
        (["model.vocab_pad_multiple=0"], "model.vocab_pad_multiple=0 must be >= 1"),
        (["parallel.timeout_s=0"], "parallel.timeout_s=0 must be >= 1"),
        (["parallel.data=0"], "parallel.data=0 must be >= 1"),
        (["train.iterations=0"], "train.iterations=0 must be >= 1"),
        (["train.micro_batch_size=0"], "train.micro_batch_size=0 must be >= 1"),
        (
            ["train.max_tokens_per_micro_batch=4095"],
            "train.max_tokens_per_micro_batch=4095 is below the longest sequence: "
            "data.max_prompt_length=1536 + rollout.max_response_length=2560 = 4096",
        ),
        (["model.attention=local"], "train.packing=true needs model.attention=auto or sdpa"),
        (["train.samples_per_prompt=1"], "train.samples_per_prompt=1 must be >= 2"),
        (["optimizer.lr=-1e-6"], "optimizer.lr=-1e-06 must be >= 0"),
        (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps=-1 must be >= 0"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must be >= 0"),
        (["optimizer.adam_beta1=1"], "optimizer.adam_beta1=1.0 must be in [0, 1)"),
        (["optimizer.adam_beta2=-0.1"], "optimizer.adam_beta2=-0.1 must be in [0, 1)"),
        (["optimizer.adam_eps=0"], "optimizer.adam_eps=0.0 must be > 0"),
        (["optimizer.clip_grad=0"], "optimizer.clip_grad=0.0 must be > 0"),
        (["algorithm.clip_eps_low=1"], "algorithm.clip_eps_low=1.0 must be in [0, 1)"),
        (["algorithm.entropy_coef=-0.1"], "algorithm.entropy_coef=-0.1 must be >= 0"),
        (["algorithm.kl_coef=-0.1"], "algorithm.kl_coef=-0.1 must be >= 0"),
        (["algorithm.sfpo.inner_steps=0"], "algorithm.sfpo.inner_steps=0 must be >= 1"),
        (["algorithm.sfpo.alpha=1.5"], "algorithm.sfpo.alpha=1.5 must be in [0, 1]"),
        (["algorithm.sfpo.window=1"], "algorithm.sfpo.window=1 must be >= 2"),
        (["algorithm.sfpo.tau=0"], "algorithm.sfpo.tau=0.0 must be > 0"),
        (["rollout.top_p=0"], "rollout.top_p=0.0 must be in (0, 1]"),
        (["rollout.top_k=0"], "rollout.top_k=0 must be -1 (off) or >= 1"),
        (["rollout.max_response_length=0"], "rollout.max_response_length=0 must be >= 1"),
        (["rollout.server_tp=0"], "rollout.server_tp=0 must be >= 1"),
        (["rollout.sync_port=0"], "rollout.sync_port=0 must be in [1, 65535]"),
        (["rollout.sync_port=65536"], "rollout.sync_port=65536 must be in [1, 65535]"),
        (["rollout.request_timeout_s=0"], "rollout.request_timeout_s=0.0 must be > 0"),
        (["rollout.kv_cache_gb=0"], "rollout.kv_cache_gb=0.0 must be > 0"),
        (["data.max_prompt_length=0"], "data.max_prompt_length=0 must be >= 1"),
        (["data.seed=-1"], "data.seed=-1 must be >= 0"),
        (["reward.workers=-1"], "reward.workers=-1 must be >= 0"),
        (["reward.timeout_s=0"], "reward.timeout_s=0.0 must be > 0"),
        (["eval.interval=-1"], "eval.interval=-1 must be >= 0"),
        (["eval.k=0"], "eval.k=0 must be >= 1"),
        (["eval.temperature=0"], "eval.temperature=0.0 must be > 0"),
        (["eval.top_p=1.5"], "eval.top_p=1.5 must be in (0, 1]"),
        (["logging.log_interval=0"], "logging.log_interval=0 must be >= 1"),
        (["checkpoint.interval=-1"], "checkpoint.interval=-1 must be >= 0"),
        (["checkpoint.export_shard_mb=0"], "checkpoint.export_shard_mb=0.0 must be > 0"),
    ],
)
def test_static_rules(model_dir, overrides, key):
    args = overrides if key == "model.hf_config" else [f"model.hf_config={model_dir}", *overrides]
    with pytest.raises(ConfigError) as error:
        load_config(None, args)
    assert key in str(error.value)


def test_a_renamed_key_names_its_new_name(model_dir, tmp_path):
    renamed = "algorithm.sfpo.adaptive was renamed to algorithm.sfpo.switch_to_grpo"
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  hf_config: {model_dir}\nalgorithm:\n  sfpo:\n    adaptive: false\n")
    with pytest.raises(ConfigError, match=f"{path}: {renamed}"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"override: {renamed}"):
        load(model_dir, "algorithm.sfpo.adaptive=false")
    assert (
        load(model_dir, "algorithm.sfpo.switch_to_grpo=false").algorithm.sfpo.switch_to_grpo
        is False
    )
    assert load(model_dir).algorithm.sfpo.switch_to_grpo is True


def test_derived_virtual_pipeline_facts(model_dir):
    plain = load(model_dir).parallel
    assert (plain.model_chunks, plain.virtual_pipeline_size, plain.interleaved) == (1, None, False)
    assert plain.pipeline_stages == 1
    one = load(model_dir, "parallel.virtual_pipeline=1").parallel
    assert (one.model_chunks, one.virtual_pipeline_size, one.interleaved) == (1, None, False)
    vpp = load(model_dir, "parallel.pipeline=2", "parallel.virtual_pipeline=3").parallel
    assert (vpp.model_chunks, vpp.virtual_pipeline_size, vpp.interleaved) == (3, 3, True)
    assert vpp.pipeline_stages == 6


def test_stop_request_keys(model_dir, tmp_path):
    """The stop file lives in checkpoint.dir unless absolute; no dir or null: off."""
    assert load(model_dir).checkpoint.stop_path is None
    ckpt = f"checkpoint.dir={tmp_path}"
    assert load(model_dir, ckpt).checkpoint.stop_path == tmp_path / "STOP"
    stop_file = "checkpoint.stop_file=/shared/stop-7"
    assert load(model_dir, ckpt, stop_file).checkpoint.stop_path == Path("/shared/stop-7")
    assert load(model_dir, ckpt, "checkpoint.stop_file=null").checkpoint.stop_path is None
    assert load(model_dir).checkpoint.stop_signals == ["USR1"]
    assert [stop_signal(name) for name in ("USR2", "SIGINT")] == [signal.SIGUSR2, signal.SIGINT]


# The tiny qwen2 model has 4 layers, 4 attention heads, 2 query groups.
@pytest.mark.parametrize(
    "overrides, world, key",
    [
        (["parallel.tensor=3"], 3, "num_attention_heads"),
        (["parallel.tensor=4"], 4, "num_key_value_heads"),
        (["parallel.pipeline=3"], 3, "num_hidden_layers"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], 2, "parallel.virtual_pipeline"),
        (["parallel.tensor=2"], 3, "parallel.tensor x parallel.pipeline"),
        (["parallel.data=2"], 4, "parallel.data"),
        (
            [
                "train.prompts_per_step=4",
                "train.mini_batch_prompts=1",
                "train.samples_per_prompt=3",
                "train.micro_batch_size=2",
                "train.packing=false",
            ],
            1,
            "train.micro_batch_size",
        ),
        (
            [
                "train.prompts_per_step=2",
                "train.mini_batch_prompts=1",
                "train.samples_per_prompt=2",
                "train.micro_batch_size=1",
                "train.packing=false",
            ],
            4,
            "data-parallel size 4",
        ),
        (
            [
                "parallel.pipeline=2",
                "parallel.virtual_pipeline=2",
                "train.prompts_per_step=1",
                "train.mini_batch_prompts=1",
                "train.samples_per_prompt=3",
                "train.packing=false",
            ],
            2,
            "parallel.pipeline=2",
        ),
    ],
)
def test_layout_rules(model_dir, overrides, world, key):
    cfg = load(model_dir, *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_layout(cfg, read_hf_config(model_dir), world)


def test_valid_layout_returns_dp(model_dir):
    cfg = load(model_dir, "parallel.tensor=2", "train.micro_batch_size=2")
    assert validate_layout(cfg, read_hf_config(model_dir), 8) == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.warm_start_lr=1e-3"],
            "train.warm_start_lr=0.001 is set but train.warm_start_steps=0",
        ),
        (
            ["train.warm_start_steps=2", "train.warm_start_lr=0"],
            "train.warm_start_lr=0.0 must be > 0",
        ),
        (["train.warm_start_steps=2", "train.warm_start_lr=-1e-3"], "train.warm_start_lr=-0.001"),
        (
            ["train.warm_start_steps=2", "optimizer.lr=0"],
            "train.warm_start_steps=2 would run at LR 0 (train.warm_start_lr=null means "
            "optimizer.lr=0.0)",
        ),
        (["train.warm_start_steps=-1"], "train.warm_start_steps=-1 must be >= 0"),
        (
            ["train.warm_start_steps=2", "data.require_answer=false"],
            "train.warm_start_steps=2 trains on the reference answers: it needs "
            "data.require_answer=true",
        ),
    ],
)
def test_warm_start_that_cannot_train_is_refused(model_dir, overrides, message):
    with pytest.raises(ConfigError) as error:
        load(model_dir, *overrides)
    assert message in str(error.value)


def test_warm_start_lr_defaults_to_the_optimizer_lr_and_is_its_own_key(model_dir):
    assert load(model_dir, "train.warm_start_steps=2").train.warm_start_lr is None
    cfg = load(model_dir, "train.warm_start_steps=2", "train.warm_start_lr=1e-3", "optimizer.lr=0")
    assert cfg.train.warm_start_lr == 1e-3  # RL at LR 0 after a real warm start is allowed
    assert load(model_dir).optimizer.decay_norms_and_biases is False


def test_sequence_lengths_must_fit_the_models_positions(model_dir):
    arch = read_hf_config(model_dir)  # max_position_embeddings 256
    validate_lengths(
        load(model_dir, "data.max_prompt_length=200", "rollout.max_response_length=56"), arch
    )
    cfg = load(model_dir, "data.max_prompt_length=200", "rollout.max_response_length=57")
    with pytest.raises(ConfigError) as error:
        validate_lengths(cfg, arch)
    assert (
        "data.max_prompt_length=200 + rollout.max_response_length=57 = 257 tokens exceed the "
        f"model's max_position_embeddings=256 of model.hf_config={model_dir}"
    ) in str(error.value)


def test_cli_refuses_bad_lengths_and_warm_start_before_anything_runs(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  hf_config: {model_dir}\nlogging:\n  output_dir: {out}\n")
    assert cli.main(["train", str(config), "train.warm_start_lr=1e-3"]) == 2
    assert "train.warm_start_steps=0" in capsys.readouterr().err
    # the defaults, 1536 + 2560 tokens, do not fit the tiny model's 256 positions
    assert cli.main(["train", str(config), "model.load_weights=false"]) == 2
    assert "max_position_embeddings=256" in capsys.readouterr().err
    assert not out.exists()


def test_sampling_seeds_are_distinct_for_every_iteration_round_and_evaluation(model_dir):
    load(model_dir, f"train.max_sampling_rounds={EVAL_SLOT}")  # the most rounds allowed
    slots = [*range(EVAL_SLOT), EVAL_SLOT]
    seeds = [sampling_seed(7, it, slot) for it in range(1, 200) for slot in slots]
    assert len(set(seeds)) == len(seeds)
    assert sampling_seed(7, 3, 0) == sampling_seed(7, 3, 0) != sampling_seed(8, 3, 0)
