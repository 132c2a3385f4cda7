"""tileattn.projections: q/k/v and gate/up as one matmul, same model otherwise."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import tileattn  # noqa: E402,F401  (registers "tileattn")
from tileattn import projections  # noqa: E402

from .helpers import DEVICE  # noqa: E402
from .tiny_models import CONFIGS  # noqa: E402


def _model(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="tileattn").eval()


def _linear_nodes(model, ids, fused: bool) -> int:
    """F.linear calls in the graph torch.compile traces (no graph breaks allowed)."""
    counted = []

    def backend(gm, example_inputs):
        counted.append(sum(node.target is torch._C._nn.linear for node in gm.graph.nodes))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda i: model(input_ids=i).logits, backend=backend, fullgraph=True)
    with torch.no_grad(), projections.fused(model) if fused else torch.no_grad():
        out = compiled(ids)
    assert len(counted) == 1
    return counted[0], out


@pytest.mark.parametrize("name,groups_per_layer,saved_per_layer", [("llama", 2, 3), ("phi", 1, 2)])
def test_fused_model_computes_the_same_with_fewer_matmuls(name, groups_per_layer, saved_per_layer):
    model = _model(name)
    ids = torch.randint(1, 96, (2, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        want = model(input_ids=ids).logits
    layers = model.config.num_hidden_layers
    assert projections.fuse(model) == groups_per_layer * layers
    assert projections.fuse(model) == groups_per_layer * layers  # again: nothing changes
    # same Parameter objects, names and values; q/k/v now views of one buffer
    assert dict(model.named_parameters()) == params
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4

    with torch.no_grad(), projections.fused(model):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain, _ = _linear_nodes(model, ids, fused=False)
    fewer, compiled = _linear_nodes(model, ids, fused=True)
    # per layer: q, k, v -> one (and gate, up -> one)
    assert plain - fewer == layers * saved_per_layer
    torch.testing.assert_close(compiled, want, rtol=1e-5, atol=1e-5)


def test_refuses_nothing_it_cannot_fuse_and_serves_other_inputs():
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 4), nn.Linear(8, 2), nn.Linear(8, 2, bias=False)
    assert projections.fuse(parent) == 0  # mixed bias: left alone
    parent.v_proj = nn.Linear(8, 2)
    assert projections.fuse(parent) == 1
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad(), projections.fused(parent):
        # different inputs, repeated members, any order: each call gets its own product
        outs = [parent.k_proj(x), parent.q_proj(y), parent.q_proj(y), parent.v_proj(x), parent.k_proj(x)]
    want = [parent.k_proj(x), parent.q_proj(y), parent.q_proj(y), parent.v_proj(x), parent.k_proj(x)]
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref)


def test_fuses_again_after_the_model_moves():
    model = _model("llama")
    projections.fuse(model)
    model.to(torch.float64)  # parameters replaced: the fused buffer is stale
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(2)
        want = model.model.layers[0].self_attn.v_proj(torch.ones(1, 64, dtype=torch.float64))
    with torch.no_grad(), projections.fused(model):
        attn = model.model.layers[0].self_attn
        x = torch.ones(1, 64, dtype=torch.float64)
        got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)][2]
    torch.testing.assert_close(got, want)
    assert attn.v_proj.weight.dtype == torch.float64


@pytest.mark.parametrize("name,products_per_layer", [("llama", 4), ("phi", 4)])
def test_one_row_products_run_as_the_gemv(name, products_per_layer, monkeypatch):
    """Batch-1 decode shape on the Triton backend (the interpreter without a GPU): every linear product of
    one row inside ``fused`` goes through tileattn::gemv, eagerly and compiled (no graph break)."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    model = _model(name).to(DEVICE, torch.bfloat16)
    ids = torch.randint(1, 96, (1, 1), device=DEVICE)
    with torch.no_grad():
        want = model(input_ids=ids).logits.double()
    calls = []
    real = projections.gemv
    monkeypatch.setattr(projections, "gemv", lambda *a: calls.append(a[1].shape) or real(*a))
    with torch.no_grad(), projections.fused(model):
        got = model(input_ids=ids).logits.double()
    assert len(calls) == products_per_layer * model.config.num_hidden_layers + 1  # + lm_head
    assert calls[-1] == model.lm_head.weight.shape
    # bf16 rounding of the hidden states, layer after layer: compare with the model's own scale
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    calls.clear()
    with torch.no_grad(), projections.fused(model):  # two rows: cuBLAS as before
        model(input_ids=torch.cat([ids, ids], 1))
    assert calls == []

    counted, activations = [], []

    def backend(gm, example_inputs):
        gemvs = [node for node in gm.graph.nodes if node.target is torch.ops.tileattn.gemv.default]
        counted.append(len(gemvs))
        activations.extend(node.args[3] for node in gemvs if len(node.args) > 3 and node.args[3])
        return gm

    monkeypatch.setattr(projections, "gemv", real)
    torch._dynamo.reset()
    compiled = torch.compile(lambda i: model(input_ids=i).logits, backend=backend, fullgraph=True)
    with torch.no_grad(), projections.fused(model):
        torch.testing.assert_close(compiled(ids).double(), got, rtol=0, atol=0)
    assert counted == [products_per_layer * model.config.num_hidden_layers + 1]
    # Phi's gelu_new runs inside fc1's GEMV; Llama's SiLU gates a product (not fused)
    assert activations == {"phi": ["gelu_tanh"], "llama": []}[name] * model.config.num_hidden_layers


def test_a_fused_model_saves_and_loads_whole_and_fuses_again():
    """torch.save of the whole model pickles the modules' wrapped forwards; they load as the
    classes' own (loading failed before) and fuse() wraps them again."""
    import io

    model = _model("llama")
    projections.fuse(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
        assert projections.fuse(loaded) == 2 * loaded.config.num_hidden_layers
        fused_linears, _ = _linear_nodes(loaded, ids, fused=True)
        plain_linears, _ = _linear_nodes(model, ids, fused=False)
    assert plain_linears - fused_linears == 3 * loaded.config.num_hidden_layers


class _MLP(nn.Module):
    """fc1 -> activation_fn -> fc2, as Phi's MLP; ``scale`` makes the forward something else."""

    def __init__(self, act: nn.Module, scale: float = 1.0, width: int = 48, hidden: int = 80):
        super().__init__()
        self.fc1, self.activation_fn, self.fc2 = nn.Linear(width, hidden), act, nn.Linear(hidden, width)
        self.scale = scale

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)) * self.scale)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def _assert_mlp_matches_fp64(mlp, x, act):
    """The MLP in x's precision against fp64, with torch's own error in that precision as the
    yardstick: an activation applied twice (or not at all) is far outside it."""
    p = {n: t.double() for n, t in mlp.state_dict().items()}
    ref = F.linear(act(F.linear(x.double(), p["fc1.weight"], p["fc1.bias"])), p["fc2.weight"], p["fc2.bias"])
    with torch.no_grad():
        torch_err = (mlp(x).double() - ref).abs().max().item()
        with projections.fused(mlp):
            err = (mlp(x).double() - ref).abs().max().item()
    assert err <= 2 * torch_err + torch.finfo(x.dtype).eps * ref.abs().max().item(), (err, torch_err)


def test_mlp_activation_moves_into_the_up_gemv_only_where_proven(monkeypatch):
    """fuse tags an MLP only when its forward is down(act(up(x))) bit for bit and the module is one
    of the GEMV's activations; one-row products then apply it inside the up GEMV, once."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    torch.manual_seed(0)
    shared = nn.SiLU()
    parent = nn.Module()
    parent.tanh = _MLP(transformers.activations.NewGELUActivation())
    parent.erf = _MLP(nn.GELU())
    parent.relu = _MLP(nn.ReLU())
    parent.a, parent.b = _MLP(shared), _MLP(shared)  # one activation module, two MLPs
    parent.scaled = _MLP(nn.GELU(), scale=2.0)  # forward is not down(act(up(x)))
    parent.quick = _MLP(_QuickGELU())  # not a formula the GEMV has
    parent.to(DEVICE, torch.bfloat16)
    projections.fuse(parent)
    kinds = {name: getattr(getattr(parent, name).fc1, "_tileattn_activation", None)
             for name in ("tanh", "erf", "relu", "a", "b", "scaled", "quick")}
    assert {n: h.kind if h else None for n, h in kinds.items()} == {
        "tanh": "gelu_tanh", "erf": "gelu", "relu": "relu", "a": "silu", "b": "silu", "scaled": None, "quick": None}
    assert kinds["a"] is kinds["b"]

    calls = []
    real = projections.gemv
    monkeypatch.setattr(projections, "gemv", lambda *a: calls.append(a[3] if len(a) > 3 else "") or real(*a))
    x = 3 * torch.randn(1, 1, 48, device=DEVICE, dtype=torch.bfloat16)
    torch_act = {"tanh": lambda t: F.gelu(t, approximate="tanh"), "erf": F.gelu, "relu": F.relu, "a": F.silu,
                 "b": F.silu, "quick": lambda t: t * torch.sigmoid(1.702 * t)}
    for name, act in torch_act.items():
        calls.clear()
        _assert_mlp_matches_fp64(getattr(parent, name), x, act)
        assert calls == [kinds[name].kind if kinds[name] else "", ""], name
    with torch.no_grad(), projections.fused(parent):
        # the shared module still computes for anyone else, and after an MLP two rows stay unfused
        y = parent.a.fc1(x)
        torch.testing.assert_close(shared(x), F.silu(x))
        assert torch.equal(shared(y), y)  # the activated row itself passes through
        two = torch.cat([x, x], 1)
        m = parent.tanh
        torch.testing.assert_close(m(two), m.fc2(m.activation_fn(m.fc1(two))), rtol=0, atol=0)


def test_mlp_activation_judging_never_raises():
    """Weights that are not on a device (meta, as offloading leaves them) cannot be probed: the
    MLP stays as it is, and fuse() does not fail."""
    mlp = _MLP(nn.GELU()).to("meta")
    projections.fuse(mlp)
    assert not hasattr(mlp.fc1, "_tileattn_activation")


def test_mlp_activation_survives_a_whole_model_pickle(monkeypatch):
    """Unpickled, the wrapped forwards load as the classes' own; fuse wraps the activation again,
    so the up GEMV's activation is not applied a second time."""
    import io

    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    torch.manual_seed(0)
    mlp = _MLP(transformers.activations.NewGELUActivation()).to(DEVICE, torch.bfloat16)
    projections.fuse(mlp)
    buffer = io.BytesIO()
    torch.save(mlp, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.fc1._tileattn_activation is loaded.activation_fn._tileattn_activation
    _assert_mlp_matches_fp64(loaded, 3 * torch.randn(1, 1, 48, device=DEVICE, dtype=torch.bfloat16),
                             lambda t: F.gelu(t, approximate="tanh"))
    loaded.activation_fn = nn.ReLU()  # replaced after fusing: judged again
    _assert_mlp_matches_fp64(loaded, torch.randn(1, 1, 48, device=DEVICE, dtype=torch.bfloat16), F.relu)
    assert loaded.fc1._tileattn_activation.kind == "relu"


def _probed_phi():
    from tileattn import overlap

    model = _model("phi").to(DEVICE, torch.bfloat16)
    ids = torch.randint(1, 96, (1, 1), device=DEVICE)
    with torch.no_grad():
        want = model(input_ids=ids).logits.double()
        with overlap.probing(model) as blocks:
            model(input_ids=ids)
    assert len(blocks) == model.config.num_hidden_layers
    return model, ids, want, blocks


def _recording_gemv(monkeypatch) -> list:
    """Record each GEMV as (rows,), plus (activation, from) where one is applied, plus ("+",
    second operand's shape) where a second product is summed in, plus "ready" where x is said to
    be written before the kernel ahead of the GEMV."""
    calls = []
    real = projections.gemv

    def recording(x, weight, bias, activation="", activation_from=0, x2=None, weight2=None, bias2=None,
                  x_ready=False):
        calls.append((weight.shape[0],) + ((activation, activation_from) if activation else ()) +
                     (("+", tuple(weight2.shape)) if weight2 is not None else ()) + (("ready",) if x_ready else ()))
        return real(x, weight, bias, activation, activation_from, x2, weight2, bias2, x_ready)

    monkeypatch.setattr(projections, "gemv", recording)
    return calls


def test_parallel_layers_read_qkv_and_the_mlp_up_projection_in_one_gemv(monkeypatch):
    """A layer whose attention and MLP read one input (Phi; found by tileattn.overlap's probe) gets
    its fc1 joined to the q/k/v group: one GEMV, GELU on fc1's rows only; and, as the layer adds
    them, its dense (the attention's output projection) and fc2 are one two-operand GEMV. With
    the MLP forked to the side stream (tileattn.overlap), fc1, dense and fc2 are products of
    their own and q/k/v one without fc1. Only fc2's input from the joined GEMV is passed as
    ready (written before the attention's kernels)."""
    from tileattn import overlap

    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    model, ids, want, blocks = _probed_phi()
    layers, hidden, inner = model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size
    calls = _recording_gemv(monkeypatch)
    with torch.no_grad(), projections.fused(model):
        got = model(input_ids=ids).logits
    layer = model.model.layers[0]
    group = layer.self_attn.q_proj._tileattn_group[0]
    assert group.modules == [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.fc1]
    assert layer.mlp.fc1.weight.data_ptr() == group.weight[3 * hidden:].data_ptr()
    assert blocks[0].summed == (layer.self_attn.dense, layer.mlp.fc2)
    assert calls == [(3 * hidden + inner, "gelu_tanh", 3 * hidden), (hidden, "+", (hidden, hidden), "ready")] * \
        layers + [(96,)]
    assert all(block.attention.q_proj._tileattn_group[0].handed is None for block in blocks)  # taken
    assert (got.double() - want).abs().max() <= 0.05 * want.abs().max()

    calls.clear()
    with torch.no_grad(), projections.fused(model), overlap.overlapped(blocks):
        forked = model(input_ids=ids).logits
    # the fork runs the whole MLP first (in place off CUDA), then the attention's products
    assert calls == [(inner, "gelu_tanh", 0), (hidden,), (3 * hidden,), (hidden,)] * layers + [(96,)]
    assert (forked.double() - want).abs().max() <= 0.05 * want.abs().max()
    calls.clear()
    with torch.no_grad(), projections.fused(model):  # two rows: cuBLAS, each product its own
        two = model(input_ids=torch.cat([ids, ids], 1)).logits
    assert calls == []
    with torch.no_grad():
        unfused = model(input_ids=torch.cat([ids, ids], 1)).logits
    torch.testing.assert_close(two, unfused, rtol=0, atol=0)

    for block in blocks:
        block.summed = None  # as a later probe that saw the layers not add them leaves them
    with torch.no_grad(), projections.fused(model):
        unsummed = model(input_ids=ids).logits
    assert calls == [(3 * hidden + inner, "gelu_tanh", 3 * hidden), (hidden,), (hidden,)] * layers + [(96,)]
    assert torch.equal(forked, unsummed)  # every product under one GEMV config: the same sums per row


def test_summed_projections_trace_into_one_graph_with_the_eager_result(monkeypatch):
    """Compiled (fullgraph: the deferred input is Python state dynamo follows), the step has one
    two-operand GEMV a layer and gives the eager fused result bit for bit; a deferred output
    projection whose down projection sees an input the GEMV cannot take is still added in."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    model, ids, want, _ = _probed_phi()
    with torch.no_grad(), projections.fused(model):
        eager = model(input_ids=ids).logits
    seconds, readies = [], []

    def backend(gm, example_inputs):
        nodes = [node for node in gm.graph.nodes if node.target is torch.ops.tileattn.gemv.default]
        seconds.extend(len(node.args) > 6 and node.args[6] is not None for node in nodes)
        readies.extend(len(node.args) > 8 and node.args[8] is True for node in nodes)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda i: model(input_ids=i).logits, backend=backend, fullgraph=True)
    with torch.no_grad(), projections.fused(model):
        torch.testing.assert_close(compiled(ids), eager, rtol=0, atol=0)
    assert seconds.count(True) == model.config.num_hidden_layers
    assert readies == seconds  # the identity check that marks fc2's input ready holds under dynamo too

    summed = model.model.layers[0].mlp.fc2._tileattn_sum
    a = torch.randn(1, 1, model.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    h = torch.randn(1, 2, model.config.intermediate_size, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad(), projections.fused(model):
        assert not summed.out_proj(a).any()  # deferred
        got = summed.down(h)  # two rows: no GEMV, both products all the same
    ref = F.linear(a.double(), summed.out_proj.weight.double(), summed.out_proj.bias.double()) + \
        F.linear(h.double(), summed.down.weight.double(), summed.down.bias.double())
    assert (got.double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_fuse_again_is_cheap_until_the_modules_change(monkeypatch):
    """fused() calls fuse() on every entry (twice per generate call): it walks the model only when
    a module or an instance forward changed since."""
    model = _model("phi")
    walks = []
    tag = projections._tag_activations
    monkeypatch.setattr(projections, "_tag_activations", lambda m: walks.append(1) or tag(m))
    groups = projections.fuse(model)
    assert projections.fuse(model) == groups and len(walks) == 1
    mlp = model.model.layers[0].mlp
    mlp.activation_fn = transformers.activations.NewGELUActivation()  # a new module: judged again
    projections.fuse(model)
    assert len(walks) == 2 and mlp.activation_fn._tileattn_activation.kind == "gelu_tanh"
    del mlp.activation_fn.forward  # an instance forward gone: wrapped again
    projections.fuse(model)
    assert len(walks) == 3 and "forward" in mlp.activation_fn.__dict__
    # what fuse remembers keeps no model alive
    gone = weakref.ref(model)
    del model, mlp
    gc.collect()
    assert gone() is None
