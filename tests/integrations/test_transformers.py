"""attn_implementation="tileattn" against transformers' own eager attention on tiny random models."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tileattn  # noqa: E402,F401  (registers "tileattn")
from tileattn.integrations.transformers import tileattn_mask  # noqa: E402

from ..helpers import DEVICE  # noqa: E402
from ..tiny_models import CONFIGS  # noqa: E402


def _model(name, attn_implementation, **overrides):
    # a fresh config each time: from_config writes the implementation into the config it is given
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    return model.to(DEVICE).eval()


def _models(name, **overrides):
    """The same random weights under tileattn and eager attention, float32, eval mode."""
    torch.manual_seed(0)
    ours = _model(name, "tileattn", **overrides)
    eager = _model(name, "eager", **overrides)
    eager.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "tileattn"
    return ours, eager


def _batch(padding_side):
    ids = torch.randint(1, 96, (3, 14), device=DEVICE)
    mask = torch.ones_like(ids)
    if padding_side == "left":
        mask[0, :5] = 0
        mask[2, :1] = 0
    else:
        mask[0, 9:] = 0
        mask[1, 13:] = 0
    return ids, mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", CONFIGS)
def test_padded_logits_match_eager(backend, name, padding_side):
    ours, eager = _models(name)
    ids, mask = _batch(padding_side)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = eager(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"], ids=["no-window", "window-past-the-sequence", "window"])
def test_a_mask_with_gaps_matches_eager_or_is_refused(backend, name):
    """Masked tokens between kept ones: the kept tokens are packed, which keeps causal order
    (no window, or one wider than the sequence: same logits as eager) but not distances, so a
    sliding window that bites is refused."""
    ours, eager = _models(name)
    ids, mask = _batch("left")
    mask[1, 3] = 0
    if name == "mistral":
        with pytest.raises(ValueError, match="sliding window"):
            ours(input_ids=ids, attention_mask=mask)
        return
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=2e-5)


def _bart(attn_implementation):
    config = transformers.BartConfig(vocab_size=96, d_model=64, encoder_layers=1, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)


@pytest.mark.parametrize("decoder_length", [4, 12], ids=["decoder-shorter", "decoder-longer"])
def test_cross_attention_over_a_padded_encoder_matches_eager(backend, decoder_length):
    """An encoder-decoder's cross-attention gets the encoder's padding mask while its queries are
    the decoder's tokens: the mask must not drop decoder rows (it dropped those past the encoder
    row's last valid position)."""
    torch.manual_seed(0)
    ours, eager = _bart("tileattn").to(DEVICE).eval(), _bart("eager").to(DEVICE).eval()
    eager.load_state_dict(ours.state_dict())
    ids = torch.randint(3, 96, (2, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    dec = torch.randint(3, 96, (2, decoder_length), device=DEVICE)
    dec_mask = torch.ones_like(dec)
    dec_mask[1, :2] = 0
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        want = eager(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    torch.testing.assert_close(got[dec_mask.bool()], want[dec_mask.bool()], atol=2e-5, rtol=2e-5)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_padded_encoder_matches_eager(backend):
    """Bidirectional self-attention over a right-padded batch (BERT): every query row runs, the
    mask hides the padded keys."""
    def bert(attn_implementation):
        config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64)
        return transformers.BertModel._from_config(config, attn_implementation=attn_implementation).to(DEVICE).eval()

    torch.manual_seed(0)
    ours, eager = bert("tileattn"), bert("eager")
    eager.load_state_dict(ours.state_dict())
    ids, mask = _batch("right")
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=2e-5)


def test_fast_generation_refuses_an_encoder_decoder():
    """It would feed the prompt to the encoder and the decoder alike, with a decoder-only cache."""
    from tileattn.generation import generate

    with pytest.raises(ValueError, match="encoder-decoder"):
        generate(_bart("tileattn").eval(), torch.randint(3, 96, (1, 5)), max_new_tokens=2)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_matches_eager(name):
    ours, eager = _models(name)
    ids, mask = _batch("left")  # padded prefill, then padded decode steps through the cache
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, **kwargs)
    want = eager.generate(ids, **kwargs)
    assert got.shape[1] == ids.shape[1] + 20
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["phi", "llama", "mistral", "gemma2", "gpt_oss"])
def test_unpadded_decode_uses_kvcache_kernel_and_matches_eager(backend, name, monkeypatch):
    from tileattn.integrations import transformers as integration

    calls = []
    kvcache = integration.ops.fwd_kvcache
    monkeypatch.setattr(integration.ops, "fwd_kvcache", lambda *a: calls.append(a[0].shape) or kvcache(*a))
    ours, eager = _models(name)
    ids = torch.randint(1, 96, (2, 9), device=DEVICE)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    assert calls and all(shape[1] == 1 for shape in calls)  # every decode step, one query each


@pytest.mark.parametrize("name", ["phi", "llama", "gemma2", "gpt_oss"])
def test_training_step_gradients_match_eager(backend, name):
    ours, eager = _models(name)
    ids, mask = _batch("right")
    grads = []
    for model in (ours, eager):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_packed_sequences_match_separate_runs(backend):
    ours, _ = _models("llama")
    a, b = torch.randint(1, 96, (1, 9), device=DEVICE), torch.randint(1, 96, (1, 6), device=DEVICE)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None].to(DEVICE)
    cu = torch.tensor([0, 9, 15], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        separate = torch.cat([ours(input_ids=a).logits, ours(input_ids=b).logits], dim=1)
        by_positions = ours(input_ids=packed, position_ids=position_ids).logits
        by_cu_seqlens = ours(input_ids=packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                             max_length_q=9, max_length_k=9).logits
    torch.testing.assert_close(by_positions, separate, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(by_cu_seqlens, separate, atol=2e-5, rtol=2e-5)


def test_packing_is_read_from_the_host_once_per_position_ids_tensor(monkeypatch):
    from tileattn.integrations import transformers as integration

    reads = []
    nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: reads.append(1) or nonzero(self, *a, **k))
    pos = torch.cat([torch.arange(4), torch.arange(3)])[None]
    for _ in range(3):  # three layers of one forward
        cu, longest = integration._packed_cu_seqlens(pos, 1, 7, 7)
    assert len(reads) == 1 and cu.tolist() == [0, 4, 7] and longest == 4
    pos[0, 4:] = torch.arange(4, 7)  # edited in place: one sequence now
    assert integration._packed_cu_seqlens(pos, 1, 7, 7) == (None, None) and len(reads) == 2
    assert integration._packed_cu_seqlens(torch.arange(7)[None], 1, 7, 7) == (None, None)
    with torch.inference_mode():  # no version counter there
        pos = torch.cat([torch.arange(2), torch.arange(5)])[None]
        assert integration._packed_cu_seqlens(pos, 1, 7, 7)[1] == 5 and len(reads) == 4
        assert integration._packed_cu_seqlens(pos, 1, 7, 7)[1] == 5 and len(reads) == 4


def test_chunked_attention_runs_inside_the_first_chunk_and_is_refused_past_it(backend):
    """Llama 4's chunked layers: causal attention while every key lies in the first chunk."""
    def llama4(attn_implementation):
        config = transformers.Llama4TextConfig(
            vocab_size=96, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=16,
            max_position_embeddings=128, num_local_experts=2, num_experts_per_tok=1, no_rope_layers=[1, 0])
        return transformers.Llama4ForCausalLM._from_config(config, attn_implementation=attn_implementation).to(DEVICE)

    torch.manual_seed(0)
    ours, eager = llama4("tileattn").eval(), llama4("eager").eval()
    eager.load_state_dict(ours.state_dict())
    assert ours.config.layer_types[0] == "chunked_attention"
    ids = torch.randint(1, 96, (1, 24), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids[:, :12]).logits, eager(input_ids=ids[:, :12]).logits,
                                   atol=2e-5, rtol=2e-5)
        with pytest.raises(NotImplementedError, match="chunked attention"):
            ours(input_ids=ids)


def test_output_attentions_warns_that_there_are_none():
    ours, _ = _models("llama")
    with pytest.warns(UserWarning, match="output_attentions=True gets none"):
        out = ours(input_ids=torch.randint(1, 96, (1, 6), device=DEVICE), output_attentions=True)
    assert not out.attentions


def test_mask_function_returns_none_without_padding():
    assert tileattn_mask(2, attention_mask=torch.ones(2, 5, dtype=torch.bool), kv_length=5) is None
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(tileattn_mask(2, attention_mask=mask, kv_length=3), mask)


def test_a_mask_the_model_widens_is_refused():
    """Gemma 3's bidirectional attention ORs a mask into the causal one, which would reach the
    kernels as plain causal attention; windows (and_masks) and padding stay ours to apply."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    ours, _ = _models("mistral")
    embeds = torch.zeros(1, 6, 64, device=DEVICE)
    cache = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"  # < 5.2x
    args = {"config": ours.config, "inputs_embeds": embeds, "attention_mask": torch.ones(1, 6, device=DEVICE),
            cache: None, "position_ids": torch.arange(6, device=DEVICE)[None]}
    assert create_causal_mask(**args) is None
    assert create_sliding_window_causal_mask(**args) is None
    with pytest.raises(NotImplementedError, match="widens the causal mask"):
        create_causal_mask(**args, or_mask_function=lambda *a: torch.tensor(True))


def test_attention_dropout_while_training_is_reproducible():
    ours, _ = _models("llama", attention_dropout=0.3)
    ours.train()
    ids = torch.randint(1, 96, (2, 12), device=DEVICE)
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        losses.append(ours(input_ids=ids, labels=ids).loss.item())
    ours.eval()  # transformers passes dropout 0 in eval: plain attention again
    plain = ours(input_ids=ids, labels=ids).loss.item()
    assert losses[0] == losses[1] and losses[0] != losses[2] and losses[0] != plain
