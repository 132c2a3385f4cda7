"""tileattn.generation against transformers' generate with eager attention on tiny models."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tileattn  # noqa: E402,F401  (registers "tileattn")
from tileattn import generation, projections  # noqa: E402
from tileattn.generation import generate, sample  # noqa: E402
from tileattn.integrations import transformers as integration  # noqa: E402

from .helpers import DEVICE  # noqa: E402
from .tiny_models import CONFIGS as TINY  # noqa: E402
from .tiny_models import twin_models  # noqa: E402

CONFIGS = {name: TINY[name] for name in ("llama", "phi", "mistral", "gemma2", "gpt_oss")}


def _models(name):
    return twin_models(name, DEVICE)


def _prompts():
    ids = torch.randint(1, 96, (3, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_eager_generate_left_padded(backend, name, monkeypatch):
    calls = []
    kvcache = integration.ops.fwd_kvcache
    monkeypatch.setattr(integration.ops, "fwd_kvcache", lambda *a: calls.append(a[5]) or kvcache(*a))
    ours, eager = _models(name)
    ids, mask = _prompts()
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    want = eager.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    # every decode step went through the KV-cache kernel with the left padding
    assert len(calls) == 11 * ours.config.num_hidden_layers and all(c is not None for c in calls)


def test_decode_steps_write_at_the_step_slot_not_the_layer_counter(backend, monkeypatch):
    """transformers' StaticLayer bumps a device counter per layer and step, which compiled steps
    paid for with a kernel per layer; the steps write at the decode context's slot instead, and
    the counters stay at the prompt length."""
    caches = []
    static_cache = generation._static_cache
    monkeypatch.setattr(generation, "_static_cache", lambda *a: caches.append(static_cache(*a)) or caches[-1])
    ours, eager = _models("phi")
    ids, mask = _prompts()
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got, eager.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0))
    counters = [getattr(layer, "cumulative_length", None) for layer in caches[0].layers]
    if counters[0] is None:
        pytest.skip("this transformers' StaticLayer keeps no fill counter")
    assert [int(c) for c in counters] == [ids.shape[1]] * ours.config.num_hidden_layers


@pytest.mark.parametrize("rows", ["batch", "one_row"])
@pytest.mark.parametrize("watched", [False, True], ids=["no_callback", "callback"])
def test_eos_stops_and_pads_like_generate(backend, rows, watched):
    """With a token callback the loop checks for eos after every token; without one only every
    EOS_CHECK_EVERY tokens, and trims what it generated after the last sequence stopped."""
    ours, eager = _models("llama")
    ids, mask = _prompts()
    if rows == "one_row":  # every sequence stops: the output ends at that token
        ids, mask = ids[1:2], mask[1:2]
    free = eager.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[-1 if rows == "one_row" else 1, 11 + 3])  # a token sequence 1 produces at its 4th step
    kwargs = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    seen = []
    got = generate(ours, ids, on_token=seen.append if watched else None, **kwargs)
    want = eager.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(got, want)
    if rows == "one_row":
        assert want.shape[1] < 11 + 10
    if watched:  # one callback per returned token, with that token
        assert torch.equal(torch.stack(seen, 1), got[:, 11:])


def test_eos_and_pad_default_to_the_generation_config_as_generate(backend):
    """Without eos_token_id and pad_token_id both read the model's generation_config, as
    transformers' generate does (a randomized comparison on the tiny models found 15 of 529
    batches stopping at the config's eos in generate and not here); eos_token_id=[] never stops
    early."""
    ours, eager = _models("llama")
    ids, mask = _prompts()
    free = eager.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=[],
                          pad_token_id=0)
    stop = int(free[1, 11 + 3])  # a token sequence 1 produces at its 4th step
    for model in (ours, eager):
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = stop, 0
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got, eager.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))
    assert (got[1, 11 + 4:] == 0).all() and not torch.equal(got, free)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]), free)


def test_greedy_steps_choose_their_tokens_on_the_device(backend, monkeypatch):
    """A greedy step picks and records its next token itself (inside the CUDA graph on a GPU):
    the host samples once, from the prefill's logits."""
    calls = []
    monkeypatch.setattr(generation, "sample", lambda *a, **kw: calls.append(1) or sample(*a, **kw))
    ours, eager = _models("phi")
    ids, mask = _prompts()
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=7)
    assert torch.equal(got, eager.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0))
    assert len(calls) == 1
    generate(ours, ids, attention_mask=mask, max_new_tokens=7, do_sample=True, seed=0)
    assert len(calls) == 1 + 7


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_sampling_is_seeded_and_top_k_1_is_greedy(backend):
    """Sampling sits above attention, so one backend suffices (the greedy tests run both; the
    interpreter made this one take a minute)."""
    ours, _ = _models("llama")
    ids, mask = _prompts()
    draw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.9)
    a = generate(ours, ids, seed=1, **draw)
    b = generate(ours, ids, seed=1, **draw)
    c = generate(ours, ids, seed=2, **draw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(ours, ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(generate(ours, ids, seed=3, **(draw | dict(top_k=1))), greedy)


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_decode_steps_run_fused_projections_and_the_eager_prefill_does_not(backend, monkeypatch):
    """On the GPU generate fuses q/k/v and gate/up for the decode steps (tileattn.projections);
    forced here on the CPU, counting the matmuls."""
    entered = []
    monkeypatch.setattr(generation, "_fusing", lambda model, device: entered.append(1) or projections.fused(model))
    ours, eager = _models("llama")
    ids, mask = _prompts()
    ids, mask = ids[1:2], mask[1:2]  # unpadded: the dense prefill
    want = eager.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    generation._facts(ours, ids.device)  # the GPU's decode steps probe the model once first: not counted
    linear = torch.nn.functional.linear
    calls = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(got, want) and entered == [1]
    layers = ours.config.num_hidden_layers
    # prefill: q, k, v, o, gate, up, down per layer + lm_head; each of 5 steps: qkv, o, gate/up, down + lm_head
    assert len(calls) == (7 * layers + 1) + 5 * (4 * layers + 1)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, True, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}


def test_refusals():
    ours, eager = _models("llama")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="attn_implementation='tileattn'"):
        generate(eager, ids)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left padding"):
        generate(ours, ids, attention_mask=right)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="cuda_graph=True needs"):
            generate(ours, ids, cuda_graph=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_cuda_graph_decode_gives_the_same_tokens(name):
    ours, eager = _models(name)
    ids, mask = _prompts()
    plain = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    graphed = generate(ours, ids, attention_mask=mask, max_new_tokens=12, cuda_graph=True)
    want = eager.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(graphed, plain) and torch.equal(graphed, want)


@pytest.mark.parametrize("name", ["phi", "gemma2"])
def test_compiled_prefill_and_decode_give_the_same_tokens_without_recompiling(name):
    from torch._dynamo.utils import counters

    ours, eager = _models(name)
    ids, mask = _prompts()
    want = eager.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    counters.clear()
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12, compile=True)
    assert torch.equal(got, want)
    # one graph for the unpadded prefill and one for the whole decode step (no breaks in the
    # attention path), reused for another prompt length (prompt and cache lengths are dynamic)
    # and for another call with new cache and context objects
    for length in (17, 23):  # unpadded: the compiled prefill
        longer = torch.randint(1, 96, (3, length), device=DEVICE)
        got_longer = generate(ours, longer, max_new_tokens=5, compile=True)
        want_longer = eager.generate(longer, attention_mask=torch.ones_like(longer), max_new_tokens=5,
                                     do_sample=False, pad_token_id=0)
        assert torch.equal(got_longer, want_longer)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    if DEVICE == "cuda":
        graphed = generate(ours, ids, attention_mask=mask, max_new_tokens=12, compile=True, cuda_graph=True)
        assert torch.equal(graphed, want)
    if name == "phi":  # eos tracked inside the compiled step (its own graph: the step guards on having eos)
        eos = int(want[1, 11 + 3])
        kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(generate(ours, ids, compile=True, **kwargs), eager.generate(ids, do_sample=False, **kwargs))


@pytest.mark.parametrize("vocab", [1, 1024, 1025, 51200, 3000])
def test_greedy_choice_is_argmax_first_maximum_included(vocab):
    logits = torch.randn(4, vocab).round()  # many ties
    logits[1] = 2.0  # all equal: index 0
    if vocab > 2000:
        logits[2, 1500] = logits[2, 2999] = 99.0  # ties across chunks: the first
        logits[3, 2100] = float("nan")  # a NaN wins, as in torch.argmax
    assert torch.equal(generation.greedy_choice(logits), logits.argmax(-1))
    if vocab > 2000:
        assert generation.greedy_choice(logits)[2:].tolist() == [1500, 2100]


BAD_SAMPLING = {
    "temperature-0": dict(temperature=0.0),
    "temperature-negative": dict(temperature=-1.0),
    "temperature-nan": dict(temperature=float("nan")),
    "top-k-negative": dict(top_k=-1),
    "top-k-float": dict(top_k=2.5),
    "top-p-0": dict(top_p=0.0),
    "top-p-above-1": dict(top_p=1.5),
}


@pytest.mark.parametrize("name", BAD_SAMPLING, ids=list(BAD_SAMPLING))
def test_bad_sampling_arguments_are_rejected_before_any_work(name, monkeypatch):
    ours, _ = _models("llama")
    ids, mask = _prompts()
    monkeypatch.setattr(generation, "_facts", lambda *a: pytest.fail("generate started work"))
    (argument,) = BAD_SAMPLING[name]
    with pytest.raises(ValueError, match=argument):
        generate(ours, ids, attention_mask=mask, max_new_tokens=2, do_sample=True, **BAD_SAMPLING[name])


def test_greedy_ignores_sampling_arguments():
    """temperature=0 often stands for greedy; greedy decoding never reads the sampling knobs."""
    ours, _ = _models("llama")
    ids, mask = _prompts()
    want = generate(ours, ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=3, temperature=0.0, top_p=0.0), want)


def test_an_empty_prompt_is_rejected():
    ours, _ = _models("llama")
    ids, _ = _prompts()
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, ids[:, :0], max_new_tokens=2)
