"""The embedded rollout engine against transformers: weights arrive only through the export
stream's buckets, and every reported log-prob is what a plain full forward of the same model
gives for log_softmax(logits / temperature) (the actor's quantity), with prompts of several
lengths, n > 1, top-k and top-p active; seeds, stop tokens, budgets and continuous batching
behave as documented."""

from __future__ import annotations

import copy

import pytest
import torch

from sfpo_megatron.rollout import NO_WEIGHTS, Sample, SamplingParams
from sfpo_megatron.rollout.batching import Row
from sfpo_megatron.rollout.embedded import EmbeddedEngine
from sfpo_megatron.rollout.sampler import row_key, sample_token, uniforms

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
        torch.testing.assert_close(torch.tensor(sample.output_logprobs), ref, rtol=1e-5, atol=1e-5)
    for index in range(len(PROMPTS)):
        group = {tuple(s.output_ids) for s in samples if s.prompt_index == index}
        assert len(group) > 1, "the n samples of a prompt are independent rows"


def engine_with_slots(model, directory, slots: int, positions: int) -> EmbeddedEngine:
    """An engine whose KV budget holds exactly ``slots`` slots of ``positions`` positions."""
    probe = EmbeddedEngine(directory)
    gb = slots * probe.decoder.kv_bytes(1, positions) / 2**30
    engine = EmbeddedEngine(directory, kv_cache_gb=gb)
    engine.update_weights(export_buckets(model), version=5)
    assert engine.slots(positions) == slots
    return engine


def assert_same_samples(got: list[Sample], expected: list[Sample]) -> None:
    assert [s.output_ids for s in got] == [s.output_ids for s in expected]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in expected]
    for a, b in zip(got, expected, strict=True):
        a, b = torch.tensor(a.output_logprobs), torch.tensor(b.output_logprobs)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32, other batch shapes


def test_continuous_batching_gives_the_static_samples(setup):
    """Rows end at different steps (an eighth of the vocabulary stops): continuous batching
    refills freed slots, the static mode waits for the whole pool, the pool has 3 or all
    slots. Every way gives the same samples for the same seed, each matching the model."""
    model, engine, directory = setup
    stops = tuple(range(0, model.config.vocab_size, 8))
    params = SamplingParams(
        n=3, temperature=0.9, top_k=50, max_new_tokens=20, stop_token_ids=stops, seed=8
    )
    prompts = PROMPTS * 2
    whole = engine.generate(prompts, params)
    lengths = [len(s.output_ids) for s in whole]
    assert min(lengths) < 5 and max(lengths) == 20 and lengths.count(20) < 10, lengths
    small = engine_with_slots(model, directory, 3, max(map(len, prompts)) + 20)
    continuous = small.generate(prompts, params)
    assert_same_samples(continuous, whole)
    rows = [Row(p, row_key(8, i, j), 20) for i, p in enumerate(prompts) for j in range(3)]
    static = small.decode(rows, params, continuous=False)
    assert small.decoder.width == 3
    assert [d.tokens for d in static] == [s.output_ids for s in whole]
    for sample in continuous:
        ref = reference_logprobs(model, sample, 0.9)
        torch.testing.assert_close(torch.tensor(sample.output_logprobs), ref, rtol=1e-5, atol=1e-5)


def test_a_row_samples_the_same_wherever_it_is_decoded(setup):
    """A prompt's samples depend on (seed, prompt index, sample index) only: alone, in
    another batch, or as a slice of the batch starting at ``first_prompt``."""
    _, engine, _ = setup
    params = SamplingParams(n=2, max_new_tokens=6, seed=21)
    whole = engine.generate(PROMPTS, params)
    tail = engine.generate(PROMPTS[2:], params, first_prompt=2)
    assert_same_samples(tail, whole[4:])
    assert engine.generate(PROMPTS[2:], params) != tail, "the prompt index is part of the key"


def test_budgets_are_per_row_and_the_tail_narrows(setup):
    """Rows with their own budgets: once nothing waits and the rows left fit half the slots,
    they move there (the width halves); the samples stay those of the static mode."""
    _, engine, _ = setup
    params = SamplingParams(max_new_tokens=1, seed=0)
    budgets = [1, 9, 3, 17, 2, 2]
    rows = [Row(PROMPTS[i % 4], row_key(0, i, 0), b) for i, b in enumerate(budgets)]
    continuous = engine.decode(rows, params)
    assert [len(d.tokens) for d in continuous] == budgets
    assert not any(d.stopped for d in continuous)
    assert engine.decoder.width == 1
    static = engine.decode(rows, params, continuous=False)
    assert engine.decoder.width == len(rows)
    assert [d.tokens for d in static] == [d.tokens for d in continuous]


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
        torch.testing.assert_close(torch.tensor(sample.output_logprobs), ref, rtol=1e-5, atol=1e-5)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = uniforms(torch.full((400,), row_key(3, 0, 0)), torch.arange(400))
    assert 0 < draws.min() and draws.max() <= 1 and abs(draws.mean() - 0.5) < 0.05
    for top_p, support in [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.1, {0}), (1.0, {0, 1, 2, 3})]:
        params = SamplingParams(top_p=top_p, max_new_tokens=1)
        token, logprob = sample_token(probs.log().expand(400, -1), params, draws)
        assert set(token.tolist()) == support, top_p
        torch.testing.assert_close(logprob, probs[0].log()[token])


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
