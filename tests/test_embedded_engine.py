"""The embedded rollout engine against transformers: weights arrive only through the export
stream's buckets, and every reported log-prob is what a plain full forward of the same model
gives for log_softmax(logits / temperature) (the actor's quantity), with left padding, n > 1,
top-k and top-p active; seeds, stop tokens and lengths behave as documented."""

from __future__ import annotations

import copy

import pytest
import torch

from sfpo_megatron.rollout import NO_WEIGHTS, Sample, SamplingParams
from sfpo_megatron.rollout.embedded import EmbeddedEngine, sample_token

from conftest import save_random_hf_model

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES = {
    "qwen2": ("qwen2", {}),
    "qwen3_tied": ("qwen3", {}),
    "llama_gqa4_rope_scaled": ("llama", {"rope_scaling": LLAMA3_SCALING}),
}
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12], [42], [7, 7, 7, 7, 7]]


def export_buckets(model, size=7):
    """The model's tensors as the export stream carries them: HF names, several buckets, no
    ``lm_head.weight`` when it is tied to the embedding."""
    tied = model.config.tie_word_embeddings
    items = [(n, t.clone()) for n, t in model.state_dict().items() if not (tied and "lm_head" in n)]
    return [items[i : i + size] for i in range(0, len(items), size)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tmp_path_factory):
    family, overrides = FAMILIES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = save_random_hf_model(directory, family, std=0.2, **overrides).eval()
    engine = EmbeddedEngine(directory)
    engine.update_weights(export_buckets(model), version=5)
    return model, engine, directory


def reference_logprobs(model, sample: Sample, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each output token from one unpadded full forward."""
    ids = torch.tensor([sample.prompt_ids + sample.output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0] / temperature
    start = len(sample.prompt_ids) - 1
    logp = torch.log_softmax(logits[start:-1], dim=-1)
    return logp.gather(-1, torch.tensor(sample.output_ids)[:, None]).squeeze(-1)


def test_weights_come_from_the_stream(setup):
    model, engine, _ = setup
    assert engine.weight_version() == 5 and engine.health()
    tied = model.config.tie_word_embeddings
    expected = {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    assert engine.weights.views.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(engine.weights.views[name], tensor), name
    if tied:
        assert engine.weights.lm_head is engine.weights.fused("model.embed_tokens.weight")


def test_update_errors_name_the_tensor(tmp_path):
    model = save_random_hf_model(tmp_path, "qwen3", std=0.2).eval()
    engine = EmbeddedEngine(tmp_path)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate([[1]], params)
    assert engine.weight_version() == NO_WEIGHTS and not engine.health()

    buckets = export_buckets(model)
    with pytest.raises(ValueError, match=r"missing.*model\.norm\.weight"):
        engine.update_weights([[x for x in b if x[0] != "model.norm.weight"] for b in buckets], 1)
    with pytest.raises(ValueError, match=r"unknown.*lm_head\.weight.*tied"):
        engine.update_weights([*buckets, [("lm_head.weight", model.lm_head.weight)]], 1)
    with pytest.raises(ValueError, match=r"unknown.*model\.extra"):
        engine.update_weights([*buckets, [("model.extra", torch.zeros(1))]], 1)
    with pytest.raises(ValueError, match=r"more than once.*model\.norm\.weight"):
        engine.update_weights([*buckets, [("model.norm.weight", model.model.norm.weight)]], 1)
    bad = [[(n, t[:-1] if n == "model.embed_tokens.weight" else t) for n, t in b] for b in buckets]
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has shape \(299, 64\)"):
        engine.update_weights(bad, 1)
    assert not engine.health(), "a failed update must not leave the engine serving"

    engine.update_weights(buckets, 0)
    assert engine.health() and engine.weight_version() == 0
    engine.release_memory()  # CPU: no-ops that keep the engine serving
    engine.resume_memory()
    assert engine.health() and len(engine.generate([[1]], params)) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_full_forward(setup, temperature):
    model, engine, _ = setup
    params = SamplingParams(
        n=3, temperature=temperature, top_p=0.9, top_k=20, max_new_tokens=10, seed=11
    )
    samples = engine.generate(PROMPTS, params)
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for sample in samples:
        assert sample.prompt_ids == PROMPTS[sample.prompt_index]
        assert sample.weight_version == 5 and sample.finish_reason == "length"
        assert len(sample.output_ids) == len(sample.output_logprobs) == 10
        ref = reference_logprobs(model, sample, temperature)
        torch.testing.assert_close(torch.tensor(sample.output_logprobs), ref, rtol=0, atol=1e-5)
    for index in range(len(PROMPTS)):
        group = {tuple(s.output_ids) for s in samples if s.prompt_index == index}
        assert len(group) > 1, "the n samples of a prompt are independent rows"


def test_row_groups_give_the_same_greedy_samples(setup):
    """A KV budget of a few rows decodes the batch in several groups (the last one smaller,
    so the cache is rebuilt between groups): the same tokens and log-probs."""
    model, engine, directory = setup
    params = SamplingParams(n=3, top_k=1, max_new_tokens=7)
    whole = engine.generate(PROMPTS, params)
    width = max(map(len, PROMPTS)) + params.max_new_tokens
    row_gb = engine.decoder.kv_bytes(1, width) / 2**30
    small = EmbeddedEngine(directory, kv_cache_gb=5 * row_gb)
    small.update_weights(export_buckets(model), version=5)
    assert small._rows_per_group(width) == 5
    grouped = small.generate(PROMPTS, params)
    cache = small.decoder._cache
    assert cache.shape[0] == len(PROMPTS) * 3 % 5  # the last, smaller group
    held = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert held == small.decoder.kv_bytes(cache.shape[0], width)
    assert [s.output_ids for s in grouped] == [s.output_ids for s in whole]
    for got, expected in zip(grouped, whole, strict=True):
        got, expected = torch.tensor(got.output_logprobs), torch.tensor(expected.output_logprobs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_decode_across_spans_then_reuse_a_longer_cache(setup):
    """Prompts near and beyond the attention span (SPAN positions) decode exactly; a later,
    shorter batch reuses the longer cache, whose stale positions must stay masked."""
    model, engine, _ = setup
    generator = torch.Generator().manual_seed(5)
    long_prompts = [torch.randint(0, 250, (n,), generator=generator).tolist() for n in (120, 140)]
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=24, seed=9)
    for prompts in (long_prompts, PROMPTS[:2]):
        samples = engine.generate(prompts, params)
        for sample in samples:
            ref = reference_logprobs(model, sample, 0.8)
            got = torch.tensor(sample.output_logprobs)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_prompts_are_refused(setup):
    _, engine, _ = setup
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], params)
    vocab = engine.vocab_size
    with pytest.raises(
        ValueError, match=rf"prompt 0 has token ids outside \[0, {vocab}\): \[{vocab}\]"
    ):
        engine.generate([[1, vocab]], params)


def test_logprobs_exact_in_float64(setup):
    """In float64 the only difference left is the engine's fp32 log-softmax rounding: the
    padding, positions and cache are exact, not merely within fp32 noise."""
    model, _, directory = setup
    model = copy.deepcopy(model).double()
    engine = EmbeddedEngine(directory, dtype=torch.float64)
    engine.update_weights(export_buckets(model), version=0)
    params = SamplingParams(n=2, temperature=0.7, top_k=20, max_new_tokens=20, seed=1)
    for sample in engine.generate(PROMPTS, params):
        ref = reference_logprobs(model, sample, 0.7)
        got = torch.tensor(sample.output_logprobs, dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


def test_seed_determinism(setup):
    _, engine, _ = setup
    params = SamplingParams(n=2, max_new_tokens=8, seed=3)
    first = engine.generate(PROMPTS, params)
    assert engine.generate(PROMPTS, params) == first
    other = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, seed=4))
    assert [s.output_ids for s in other] != [s.output_ids for s in first]


def test_top_k_one_is_argmax(setup):
    model, engine, _ = setup
    samples = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=6, seed=0))
    for sample in samples:
        ids = torch.tensor([sample.prompt_ids + sample.output_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(sample.prompt_ids) - 1 : -1]
        assert sample.output_ids == logits.argmax(-1).tolist()


def test_stop_token_ends_the_sample(setup):
    model, engine, _ = setup
    greedy = SamplingParams(top_k=1, max_new_tokens=6)
    stop = engine.generate([PROMPTS[1]], greedy)[0].output_ids[3]
    params = SamplingParams(top_k=1, max_new_tokens=6, stop_token_ids=(stop,))
    sample = engine.generate([PROMPTS[1]], params)[0]
    first = sample.output_ids.index(stop)
    assert sample.finish_reason == "stop" and len(sample.output_ids) == first + 1 <= 4

    # Half the vocabulary stops: rows finish at different steps within one batch.
    stops = tuple(range(0, model.config.vocab_size, 2))
    params = SamplingParams(n=4, max_new_tokens=8, stop_token_ids=stops, seed=2)
    samples = engine.generate(PROMPTS, params)
    assert len({len(s.output_ids) for s in samples}) > 1
    for sample in samples:
        ended = sample.output_ids[-1] in stops
        assert sample.finish_reason == ("stop" if ended else "length")
        assert not set(sample.output_ids[:-1]) & set(stops)
        assert ended or len(sample.output_ids) == 8
        ref = reference_logprobs(model, sample, 1.0)
        torch.testing.assert_close(torch.tensor(sample.output_logprobs), ref, rtol=0, atol=1e-5)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    generator = torch.Generator().manual_seed(0)
    for top_p, support in [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.1, {0}), (1.0, {0, 1, 2, 3})]:
        params = SamplingParams(top_p=top_p, max_new_tokens=1)
        drawn = set()
        for _ in range(400):
            token, logprob = sample_token(probs.log(), params, generator)
            drawn.add(token.item())
            assert logprob.item() == pytest.approx(probs[0, token.item()].log().item())
        assert drawn == support, top_p


def test_released_weights_come_back_through_the_same_views(setup):
    """What release_memory does on CUDA, on the CPU: the storage is freed and given back under
    the same views (so captured graphs and the export stream's targets stay valid)."""
    from sfpo_megatron.rollout.decoder import EngineWeights

    model, engine, _ = setup
    weights = EngineWeights(engine.arch, torch.device("cpu"), torch.float32)
    for name, view in weights.views.items():
        view.copy_(engine.weights.views[name])
    norm = weights.views["model.norm.weight"]
    weights.release()
    assert weights.released and norm.untyped_storage().nbytes() == 0
    weights.resume()
    assert not weights.released and weights.views["model.norm.weight"] is norm
    for name, view in weights.views.items():
        assert torch.equal(view, engine.weights.views[name]), name
    weights.release()
    weights.resume(restore=False)
    assert norm.untyped_storage().nbytes() > 0 and norm.shape == model.model.norm.weight.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_the_eager_step(setup):
    model, _, directory = setup
    engines = [EmbeddedEngine(directory, device="cuda", cuda_graphs=g) for g in (True, False)]
    for engine in engines:
        engine.update_weights(export_buckets(model), version=1)
    params = SamplingParams(n=2, top_k=1, max_new_tokens=150)
    graphed, eager = (engine.generate(PROMPTS, params) for engine in engines)
    assert engines[0].decoder._cache.graphs, "no graph was captured"
    assert [s.output_ids for s in graphed] == [s.output_ids for s in eager]
    for got, expected in zip(graphed, eager, strict=True):
        torch.testing.assert_close(got.output_logprobs, expected.output_logprobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_release_and_resume_on_cuda(setup):
    model, _, directory = setup
    engine = EmbeddedEngine(directory, device="cuda")
    engine.update_weights(export_buckets(model), version=1)
    params = SamplingParams(n=2, max_new_tokens=8, seed=7)
    before = engine.generate(PROMPTS, params)
    allocated = torch.cuda.memory_allocated()
    engine.release_memory()
    assert torch.cuda.memory_allocated() < allocated and engine.health()
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate(PROMPTS, params)
    engine.resume_memory()
    assert engine.generate(PROMPTS, params) == before
    engine.release_memory()  # as a run does: the next weights arrive while released
    engine.update_weights(export_buckets(model), version=1)
    assert engine.generate(PROMPTS, params) == before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2, "n": 0}, "n"),
        ({"max_new_tokens": 2, "temperature": 0.0}, "temperature"),
        ({"max_new_tokens": 2, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 2, "top_k": 0}, "top_k"),
        ({"max_new_tokens": 2, "stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": 2, "seed": "x"}, "seed"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SamplingParams(**kwargs)
