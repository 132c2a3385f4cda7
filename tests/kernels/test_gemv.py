"""The Triton GEMV launcher directly: one row times a weight matrix plus bias, poisoned output."""

import pytest
import torch

from tileattn.kernels import gemv as gemv_module
from tileattn.kernels.gemv import ACTIVATIONS, gemv, gemv_config
from tileattn.projections import ACTIVATIONS as TORCH_ACTIVATIONS

from ..helpers import DEVICE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (N, K): one element; N odd; K past one chunk and not a multiple of it
SHAPES = [(1, 1), (37, 300), (300, 37), (8, 1024), (9, 4100)]
WIDE_N = (4099, 300)  # the config for N > 4096: N not a multiple of its rows, a ragged last chunk


@pytest.fixture(autouse=True)
def _gpu_configs(monkeypatch):
    """These shapes are chosen for the GPU's configs (ragged against their rows and chunks):
    launch those under the interpreter too, not its wide one."""
    monkeypatch.setattr(gemv_module, "launch_config", gemv_config)


def _inputs(n, k, dtype, bias):
    x = torch.randn(1, 1, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k ** 0.5
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    return x, w, b


def _check(x, w, b, dtype, activation="", activation_from=0):
    out = torch.full(x.shape[:-1] + (w.shape[0],), float("nan"), device=DEVICE, dtype=dtype)
    got = gemv(x, w, b, out=out, activation=activation, activation_from=activation_from)
    assert got is out and got.shape == x.shape[:-1] + (w.shape[0],)
    some = TORCH_ACTIVATIONS.get(activation, lambda t: t)

    def act(t):  # the activation on outputs activation_from.. only
        return torch.cat([t[..., :activation_from], some(t[..., activation_from:])], -1)

    ref = act(torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()))
    # torch's own product (and activation) in the same precision is the yardstick, plus one unit
    # in the last place of the largest output: the error is mostly the output's rounding, and
    # Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
    torch_err = (act(torch.nn.functional.linear(x, w, b)).double() - ref).abs().max().item()
    err = (got.double() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= 2 * torch_err + ulp, (err, torch_err, ulp)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"N{n}-K{k}" for n, k in SHAPES])
def test_matches_fp64_linear(n, k, dtype, bias):
    _check(*_inputs(n, k, dtype, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a])
def test_activation_on_the_float32_sums(activation, dtype):
    x, w, b = _inputs(300, 1100, dtype, True)
    x *= 3  # outputs over [-6, 6]: every activation's curved part and both tails
    _check(x, w, b, dtype, activation)


@pytest.mark.parametrize("n,start", [(300, 120), (4099, 3000), (300, 0), (300, 300)],
                         ids=["mid", "wide-config", "all", "none"])
def test_activation_from_a_row_on(n, start):
    """One product for q/k/v and a parallel MLP's up projection: only the MLP's rows activated
    (a start inside a program's rows at N = 300; on a chunk boundary past 4096)."""
    x, w, b = _inputs(n, 700, torch.bfloat16, True)
    x *= 3
    _check(x, w, b, torch.bfloat16, "gelu_tanh", start)


# (N, K, K2, dtype, which biases): a K2 past one chunk, the config for N > 4096, each bias alone
SECOND = [(300, 700, 37, "bf16", "both"), (2, 1024, 1100, "fp16", "first"), (4099, 300, 64, "bf16", "second"),
          (37, 64, 300, "fp16", "none")]


@pytest.mark.parametrize("n,k,k2,dtype,bias", SECOND, ids=[f"N{n}-K{k}-K2{k2}-{d}-bias_{b}" for n, k, k2, d, b in
                                                             SECOND])
def test_second_operand_sums_into_the_same_rows(n, k, k2, dtype, bias):
    """y = W x + W2 x2 + b + b2 (a parallel layer's output projection and MLP down projection):
    against the fp64 product of the operands concatenated along K, which is the same sum."""
    dtype = DTYPES[dtype]
    x, w, b = _inputs(n, k, dtype, bias in ("both", "first"))
    x2, _, b2 = _inputs(n, k2, dtype, bias in ("both", "second"))
    w2 = torch.randn(n, k2 + 8, device=DEVICE, dtype=dtype)[:, 8:] / k2 ** 0.5  # a row stride of its own
    out = torch.full(x.shape[:-1] + (n,), float("nan"), device=DEVICE, dtype=dtype)
    got = gemv(x, w, b, out=out, x2=x2, weight2=w2, bias2=b2)
    assert got is out
    whole_x, whole_w = torch.cat([x, x2], -1), torch.cat([w, w2], 1)
    biases = [t for t in (b, b2) if t is not None]
    whole_b = sum(biases) if biases else None
    ref = torch.nn.functional.linear(whole_x.double(), whole_w.double(),
                                     sum(t.double() for t in biases) if biases else None)
    torch_err = (torch.nn.functional.linear(whole_x, whole_w, whole_b).double() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 2 * torch_err + ulp


def test_activations_match_the_torch_formulas():
    assert set(ACTIVATIONS) == set(TORCH_ACTIVATIONS) | {""}


def test_config_for_many_rows():
    _check(*_inputs(*WIDE_N, torch.bfloat16, True), torch.bfloat16)


def test_strided_views():
    # a weight slice of a fused buffer (row stride of the whole), a non-contiguous one-row input
    big = torch.randn(50, 96, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(64, 3, device=DEVICE, dtype=torch.bfloat16)[:, 1]
    w = big[10:30, 16:80]  # strides (96, 1)
    _check(x, w, torch.randn(20, device=DEVICE, dtype=torch.bfloat16), torch.bfloat16)


def test_both_configs_are_covered():
    assert {gemv_config(n) for n, _ in SHAPES + [WIDE_N]} == {gemv_config(2560), gemv_config(10240)}
    assert gemv_config(2560) != gemv_config(10240)


def test_bad_inputs_name_the_argument():
    x, w, b = _inputs(8, 32, torch.bfloat16, True)
    with pytest.raises(ValueError, match="x must hold one row"):
        gemv(torch.randn(2, 32, device=DEVICE, dtype=torch.bfloat16), w, b)
    with pytest.raises(ValueError, match="x must hold one row"):
        gemv(x[..., :16], w, b)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        gemv(x, torch.randn(32, 8, device=DEVICE, dtype=torch.bfloat16).t(), b)
    with pytest.raises(ValueError, match="bias must be"):
        gemv(x, w, b[:4])
    with pytest.raises(TypeError, match=r"weight must have x's dtype \(torch.bfloat16\), got torch.float16"):
        gemv(x, w.half(), b)
    x2, w2, b2 = _inputs(8, 16, torch.bfloat16, True)
    with pytest.raises(ValueError, match="x2 and weight2 come together"):
        gemv(x, w, b, x2=x2)
    with pytest.raises(ValueError, match="bias2 needs x2 and weight2"):
        gemv(x, w, b, bias2=b2)
    with pytest.raises(ValueError, match=r"weight2 must be 2-D \(8, K\)"):
        gemv(x, w, b, x2=x2, weight2=w2[:4])
    with pytest.raises(ValueError, match="x2 must hold one row of 16 elements"):
        gemv(x, w, b, x2=x, weight2=w2)
    with pytest.raises(TypeError, match="bias2 must have x's dtype"):
        gemv(x, w, b, x2=x2, weight2=w2, bias2=b2.half())
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32, got torch.int64"):
        gemv(x.long(), w.long(), None)
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, w, b, out=torch.empty(1, 1, 7, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"activation must be one of \['', 'gelu', 'gelu_tanh', 'relu', 'silu'\], "
                                         r"got 'tanh'"):
        gemv(x, w, b, activation="tanh")
    with pytest.raises(ValueError, match=r"activation_from must be in \[0, 8\] \(weight's rows\), got 9"):
        gemv(x, w, b, activation="relu", activation_from=9)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        gemv([1.0] * 32, w, b)


def test_x_ready_only_inside_the_latest_joined_product(launch_flags):
    """x_ready lets the kernel read x before its PDL wait. It is honoured only for an x inside the
    latest product activated from a row > 0 (a parallel layer's q/k/v + up GEMV), never for a
    copy or another tensor; the sums are the same either way."""
    launches = launch_flags("tileattn.kernels.gemv", "_gemv_kernel")
    h, w_joined, _ = _inputs(40, 64, torch.bfloat16, False)
    joined = gemv(h, w_joined, activation="gelu_tanh", activation_from=8)
    x = joined[..., 8:]  # the up projection's 32 activated rows
    a, w, b = _inputs(16, 32, torch.bfloat16, True)
    a2, w2, _ = _inputs(16, 24, torch.bfloat16, False)
    early = gemv(x, w, b, x2=a2, weight2=w2, x_ready=True)
    late = gemv(x, w, b, x2=a2, weight2=w2)
    copied = gemv(x.clone(), w, b, x2=a2, weight2=w2, x_ready=True)
    other = gemv(a, w, b, x2=a2, weight2=w2, x_ready=True)  # a: no product wrote it
    gemv(h, w_joined, activation="gelu_tanh")  # activated from row 0: not a joined product
    after_plain = gemv(x, w, b, x2=a2, weight2=w2, x_ready=True)
    gemv(h, w_joined, activation="gelu_tanh", activation_from=8)  # the next layer's: x is no longer the latest
    stale = gemv(x, w, b, x2=a2, weight2=w2, x_ready=True)
    assert [flags["X_READY"] for flags in launches] == [False, True, False, False, False, False, True, False, False]
    for got in (copied, after_plain, stale):
        assert torch.equal(got, early) and torch.equal(late, early)
    assert not torch.equal(other, late)
