"""tileattn.overlap: parallel blocks' MLPs forked beside the attention, same tokens as eager."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import tileattn  # noqa: E402,F401  (registers "tileattn")
from tileattn import generation, overlap  # noqa: E402

from .helpers import DEVICE, fork_every_mlp, record_forks  # noqa: E402
from .tiny_models import twin_models  # noqa: E402


def _models(name):
    return twin_models(name, DEVICE)


def _probe(model):
    one = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    with torch.no_grad(), overlap.probing(model) as blocks:
        model(input_ids=one)
    return blocks


@pytest.mark.parametrize("name,parallel", [("phi", True), ("llama", False), ("gpt_oss", False)])
def test_probe_finds_the_layers_whose_attention_and_mlp_share_their_input(name, parallel):
    """Phi feeds one layer norm's output to both; Llama's MLP reads the post-attention norm."""
    model, _ = _models(name)
    blocks = _probe(model)
    layers = model.config.num_hidden_layers
    assert len(blocks) == (layers if parallel else 0)
    for block in blocks:
        assert block.features == model.config.hidden_size and block.dtype == model.dtype
        assert block.summed == (block.attention.dense, block.mlp.fc2)  # Phi adds them to the residual
    assert _probe(model) == blocks  # the same blocks again: not wrapped twice


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)

    def forward(self, hidden_states):
        return self.dense(hidden_states * 2), None


class _MLP(nn.Module):
    def __init__(self, shift: float):
        super().__init__()
        self.fc2, self.shift = nn.Linear(8, 8), shift

    def forward(self, x):
        out = self.fc2(torch.relu(x))
        return out + self.shift if self.shift else out


class _Layer(nn.Module):
    """A parallel layer: attention and MLP on one input; how it combines them is the variant."""

    def __init__(self, combine: str):
        super().__init__()
        self.self_attn, self.mlp, self.combine = _Attention(), _MLP(1.0 if combine == "shifted mlp" else 0.0), combine

    def forward(self, x):
        if self.combine == "mlp first":
            m = self.mlp(x)
            return self.self_attn(x)[0] + m + x
        a = self.self_attn(x)[0]
        m = self.mlp(x)
        if self.combine == "scaled mlp":
            return a + 0.5 * m + x
        if self.combine == "float32 sum":
            return (a.float() + m.float() + x.float()).to(x.dtype)
        return x + a + m


@pytest.mark.parametrize("combine,summed", [("sum", True), ("float32 sum", True), ("scaled mlp", False),
                                            ("shifted mlp", False), ("mlp first", False)])
def test_probe_tells_which_layers_add_their_output_and_down_projections(combine, summed):
    """Block.summed (tileattn.projections makes the two products one) only where the layer's output
    is its input plus the attention's and the MLP's, each straight from an nn.Linear, and the
    attention returns before the MLP starts."""
    layer = _Layer(combine).to(torch.bfloat16)
    with torch.no_grad(), overlap.probing(layer) as blocks:
        layer(torch.randn(1, 1, 8, dtype=torch.bfloat16))
    assert len(blocks) == 1
    assert blocks[0].summed == ((layer.self_attn.dense, layer.mlp.fc2) if summed else None)


def test_installed_blocks_are_inert_outside_the_scope_and_fall_back_for_other_inputs(monkeypatch):
    model, _ = _models("phi")
    ids = torch.randint(1, 96, (2, 7), device=DEVICE)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        blocks = _probe(model)
        forks = record_forks(monkeypatch)
        assert torch.equal(model(input_ids=ids).logits, want) and forks == []
        with overlap.overlapped(blocks):
            assert torch.equal(model(input_ids=ids).logits, want)
            assert forks == [b.key for b in blocks]
            # an MLP called on another tensor than its attention's input runs itself
            x = torch.randn(1, 3, model.config.hidden_size, device=DEVICE)
            mlp = blocks[0].mlp
            assert torch.equal(mlp(x), blocks[0].mlp_forward(x))


def test_compiled_generation_forks_only_mlps_that_outweigh_the_cache_they_overlap():
    """tiny phi: 2 K/V heads of dim 80 in float32 read 1280 bytes a cache slot per layer; its
    MLP holds 2 x 160 x 64 weights and 224 biases, 82816 bytes: up to 64 slots. Uncompiled steps
    fork every MLP."""
    model, _ = _models("phi")
    device = torch.device(DEVICE)
    blocks = generation._facts(model, device)[1]
    assert blocks[0].weight_bytes == 82816
    assert generation._overlap_blocks(model, device, 1, 64, True) == blocks
    assert generation._overlap_blocks(model, device, 1, 65, True) == []
    assert generation._overlap_blocks(model, device, 2, 64, True) == []
    assert generation._overlap_blocks(model, device, 2, 4096, False) == blocks


def test_uncompiled_generation_forks_mlps_lighter_than_the_cache(monkeypatch):
    """256 cache slots (the smallest capacity generate allocates) outweigh tiny phi's MLP; its
    uncompiled decode steps still fork every layer's, with eager generate's tokens."""
    monkeypatch.setattr(generation, "OVERLAP_DEVICES", ("cuda", "cpu"))
    forks = record_forks(monkeypatch)
    ours, eager = _models("phi")
    ids = torch.randint(1, 96, (1, 11), device=DEVICE)
    want = eager.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generation.generate(ours, ids, max_new_tokens=4), want)
    blocks = generation._facts(ours, ids.device)[1]
    assert len(blocks) == ours.config.num_hidden_layers
    assert forks == [b.key for b in blocks] * 3  # three decode steps after the prefill's token


def test_a_copied_model_forks_its_own_mlps(monkeypatch):
    """deepcopy (and pickle) give a model's blocks new keys: the fork must not run the MLP of
    the model the copy came from."""
    import copy

    fork_every_mlp(monkeypatch)
    ours, eager = _models("phi")
    ids = torch.randint(1, 96, (1, 11), device=DEVICE)
    generation.generate(ours, ids, max_new_tokens=2)  # probes: blocks installed
    twin, eager_twin = copy.deepcopy(ours), copy.deepcopy(eager)
    with torch.no_grad():
        for m in (twin, eager_twin):
            m.model.layers[0].mlp.fc2.weight.mul_(-3)
    blocks, twin_blocks = (generation._facts(m, ids.device)[1] for m in (ours, twin))
    assert {b.key for b in blocks}.isdisjoint(b.key for b in twin_blocks)
    assert all(b.mlp is layer.mlp for b, layer in zip(twin_blocks, twin.model.layers))
    for model, reference in ((twin, eager_twin), (ours, eager)):
        want = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(generation.generate(model, ids, max_new_tokens=6), want)


def test_a_saved_and_loaded_model_forks_again(monkeypatch):
    """torch.save pickles the wrapped forwards as the classes' own; the loaded model's blocks
    come back with keys of their own and the next probe wraps the modules again."""
    import io

    fork_every_mlp(monkeypatch)
    ours, eager = _models("phi")
    ids = torch.randint(1, 96, (1, 11), device=DEVICE)
    generation.generate(ours, ids, max_new_tokens=2)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    forks = record_forks(monkeypatch)
    want = eager.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generation.generate(loaded, ids, max_new_tokens=4), want)
    keys = [b.key for b in generation._facts(loaded, ids.device)[1]]
    assert forks == keys * 3 and set(keys).isdisjoint(b.key for b in generation._facts(ours, ids.device)[1])


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_generate_with_forked_mlps_gives_eager_tokens(compile, monkeypatch):
    """The GPU path, forced on whatever device runs the tests (on the CPU the fork runs the MLP
    in place): each decode step forks every layer's MLP and joins it, compiled without graph
    breaks (the decode graph holds a fork and a join per layer)."""
    fork_every_mlp(monkeypatch)
    graphs = []
    # traced, the counting list would be guarded on and recompile every step
    forks = [] if compile else record_forks(monkeypatch)

    def recording(gm, example_inputs):  # dynamo's graph, run as traced
        ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        graphs.append((ops.count(torch.ops.tileattn.mlp_fork.default), ops.count(torch.ops.tileattn.mlp_join.default)))
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setitem(generation._compiled_calls, True,
                        torch.compile(generation._step_call, backend=recording, dynamic=False, fullgraph=True))
    ours, eager = _models("phi")
    ids = torch.randint(1, 96, (3, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    want = eager.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = generation.generate(ours, ids, attention_mask=mask, max_new_tokens=8, compile=compile)
    assert torch.equal(got, want)
    layers = ours.config.num_hidden_layers
    if compile:
        assert graphs == [(layers, layers)]  # the decode step (a padded prompt's prefill is eager)
    else:
        assert len(forks) == 7 * layers


def test_compiled_decode_step_launches_each_fork_before_its_attention(monkeypatch):
    """In inductor's code for the decode step (not dynamo's graph, which keeps source order)
    each layer forks, then attends, then joins: a fork scheduled after the attention would
    leave the side stream nothing to overlap."""
    import re

    from torch._inductor.utils import run_and_get_code

    fork_every_mlp(monkeypatch)
    ours, _ = _models("phi")
    ids = torch.randint(1, 96, (1, 11), device=DEVICE)
    torch._dynamo.reset()
    _, codes = run_and_get_code(lambda: generation.generate(ours, ids, max_new_tokens=3, compile=True))
    steps = [code for code in codes if "mlp_fork" in code]
    assert len(steps) == 1
    calls = re.findall(r"tileattn\.(mlp_fork|fwd_kvcache|mlp_join)\.default\(", steps[0])
    assert calls == ["mlp_fork", "fwd_kvcache", "mlp_join"] * ours.config.num_hidden_layers
