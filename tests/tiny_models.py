"""Tiny random-weight transformers configs shared by the integration and generation tests.
Import after ``pytest.importorskip("transformers")``."""

import torch
import transformers

CONFIGS = {
    # Phi-2's attention shape: head dim 80, partial rotary applied before attention
    "phi": lambda: transformers.PhiConfig(
        vocab_size=96, hidden_size=160, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        partial_rotary_factor=0.4, max_position_embeddings=128,
    ),
    # GQA: K/V reach the attention function un-repeated
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ),
    # sliding window larger than these sequences: must pass through unchanged
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=64, max_window_layers=0,
        max_position_embeddings=128,
    ),
    # sliding window shorter than the sequences: the kernels' window does the masking
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=128,
    ),
    # logit softcapping (small, so that it bites) on alternating sliding/full layers
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attn_logit_softcapping=1.0, sliding_window=8, query_pre_attn_scalar=16,
        max_position_embeddings=128,
    ),
    # attention sinks (s_aux, learned per head) with alternating sliding/full layers, MoE MLP
    "gpt_oss": lambda: transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
    ),
}


def twin_models(name: str, device):
    """(tileattn model, eager model) of one config with the same random weights, in eval mode."""
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="tileattn")
    eager = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    eager.load_state_dict(ours.state_dict())
    return ours.to(device).eval(), eager.to(device).eval()
