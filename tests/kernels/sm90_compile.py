"""Compile the kernels for an H100 (sm_90a) on a machine without a GPU.

Triton's wheel carries ptxas, so lowering and assembly run anywhere; what fails here (a pass
crash, a ptxas error, a shape the layouts reject) would fail on the GPU too, where device time
is scarce. Run as a script, without TRITON_INTERPRET (the interpreter replaces the jit
functions); test_sm90_compile.py does that. Prints one line per case and the registers,
stack (spill) bytes and shared memory ptxas reports; exits 1 if any case failed.

Arguments are specialized as a launch on contiguous, 16-byte aligned tensors specializes them
(pointers and strides divisible by 16, the head dim's stride the constant 1): unspecialized,
the pointer tiles compile to scalar loads the pipeliner leaves synchronous, with other register
counts and spills than the GPU runs.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tileattn.kernels.config import _GPU_CONFIGS, TALL_ROWS, head_blocks
from tileattn.kernels.forward import DESC_ROWS, HOST_TMA_DEFAULT, SPLIT_DEFAULT
from tileattn.kernels.gemv import ACTIVATIONS, gemv_config

TARGET = GPUTarget("cuda", 90, 32)
_FLOATS = {"qk_scale", "softmax_scale", "softcap", "dropout_p", "rescale"}
_INT_POINTERS = {"CuSeqQ", "CuSeqK", "SeqlensK", "BatchIdx", "LeftPad", "BlockTable"}
_FP32_POINTERS = {"Lse", "Delta", "Alibi", "Sinks"}
_DIVISIBLE_INTS = {"seqlen_q", "seqlen_k", "head_dim", "page_size", "n", "k", "k2"}  # at the shapes benchmarked


def _kernel(name: str):
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"tileattn.kernels.{module}"), attr)


def _signature(fn, constexprs: dict, specialized: dict) -> dict:
    """Argument types from the kernels' naming: CamelCase pointers, snake_case scalars."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr or name in specialized:
            sig[name] = "constexpr"
        elif name.endswith("Desc"):  # host-made TMA descriptors (TMA == 2): [1, rows, 1, dim] blocks
            sig[name] = f"tensordesc<bf16[1, {constexprs[DESC_ROWS[name]]}, 1, {constexprs['BLOCK_D']}]>"
        elif name[0].isupper() and name != "SEQ_BUCKET":
            sig[name] = "*i32" if name in _INT_POINTERS else "*fp32" if name in _FP32_POINTERS else "*bf16"
        else:
            sig[name] = "fp32" if name in _FLOATS else "i32"
    return sig


def _launch_specialization(fn, specialized: dict) -> tuple[dict, dict]:
    """(constants, attrs) a launch on contiguous aligned tensors gets: unit strides become the
    constant 1, pointers, other strides and lengths are known divisible by 16."""
    constants, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in specialized or param.do_not_specialize or name.endswith("Desc"):
            continue
        if name.startswith("stride_") and name.endswith("d"):
            constants[name] = 1
        elif name.startswith("stride_") or name in _DIVISIBLE_INTS or (name[0].isupper() and name != "SEQ_BUCKET"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return constants, attrs


def compile_case(kernel: str, config: tuple, flags: dict, specialized: dict | None = None) -> str:
    """Compile one kernel with one tile config; returns ptxas' resource line."""
    fn = _kernel(kernel)
    block_m, block_n, warps, stages = config
    constexprs = dict(flags, BLOCK_N=block_n, **({} if block_m is None else {"BLOCK_M": block_m}))
    specialized = dict(specialized or {})  # integers Triton specializes (e.g. a length of 1)
    host_descs = flags.get("TMA") == 2 or (kernel.startswith("decode.") and flags.get("TMA"))
    if not host_descs:  # descriptors are passed as None
        specialized.update({p.name: None for p in fn.params if p.name.endswith("Desc")})
    unit_strides, attrs = _launch_specialization(fn, specialized)
    specialized.update(unit_strides)
    constexprs.update(specialized)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:  # Triton would compile them as None, i.e. off, without a word
        raise ValueError(f"{kernel}: no value for constexpr {missing}")
    src = ASTSource(fn, _signature(fn, constexprs, specialized), constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    fields = dict(f.split(":") for line in report.splitlines() if "REG:" in line for f in line.split() if ":" in f)
    return f"REG {fields.get('REG')} STACK {fields.get('STACK')} smem {compiled.metadata.shared}"


def _variants(**kw) -> dict:
    base = dict(CAUSAL=True, WINDOW=False, SOFTCAP=0, BOUNDED=False, ALIBI=False, DROPOUT=False, VARLEN=False,
                WIDE=False, DOT_PRECISION="tf32")
    return base | kw


def _bwd(**kw) -> dict:
    """A backward kernel's switches, launched as the sm_90 launcher launches it (a PDL chain);
    it recomputes probabilities from the LSE, so no BOUNDED."""
    flags = _variants(PDL=True, **kw)
    flags.pop("BOUNDED")
    return flags


def cases():
    """(label, kernel, config, constexprs, specialized ints): each kernel's default tile config
    at head dims 128 (TMA forward) and 80 (split), plus the variant and length-1 corners."""
    d128, d80 = head_blocks(128), head_blocks(80)
    fwd, dq, dkdv, dec = (_GPU_CONFIGS[k][128][0] for k in ("fwd", "bwd_dq", "bwd_dkdv", "decode"))
    yield "fwd d128 causal TMA", "forward._fwd_kernel", HOST_TMA_DEFAULT, _variants(SINK=False, TMA=2, **d128), None
    yield "fwd d128 full TMA, seqlen 1", "forward._fwd_kernel", HOST_TMA_DEFAULT, _variants(
        CAUSAL=False, SINK=False, TMA=2, **d128), dict(seqlen_q=1, seqlen_k=1)
    yield "fwd d128 causal softcap TMA", "forward._fwd_kernel", HOST_TMA_DEFAULT, _variants(
        SOFTCAP=2, SINK=False, TMA=2, **d128), None
    yield "fwd d128 causal softcap bounded (bf16: half the exp2 on FMA units) TMA", "forward._fwd_kernel", \
        HOST_TMA_DEFAULT, _variants(SOFTCAP=2, BOUNDED=2, SINK=False, TMA=2, **d128), None
    yield "fwd d128 varlen window softcap alibi sink dropout TMA", "forward._fwd_kernel", fwd, _variants(
        VARLEN=True, WINDOW=True, SOFTCAP=2, ALIBI=True, DROPOUT=True, SINK=True, TMA=1, **d128), None
    yield "fwd d128 causal alibi (per-key form) TMA", "forward._fwd_kernel", HOST_TMA_DEFAULT, _variants(
        ALIBI=2, SINK=False, TMA=2, **d128), None
    yield "fwd d80 split causal", "forward._fwd_kernel", SPLIT_DEFAULT, _variants(SINK=False, TMA=0, **d80), None
    for label, blocks in (("d128", d128), ("d80 split", d80)):
        yield f"dq {label}", "backward._bwd_dq_kernel", dq, _bwd(**blocks), None
        yield f"dk/dv {label}", "backward._bwd_dkdv_kernel", dkdv, _bwd(**blocks), None
    yield "fwd d128 pointers, 64-bit tile starts", "forward._fwd_kernel", fwd, _variants(
        SINK=False, TMA=0, WIDE=True, **d128), None
    yield "dk/dv d128, 64-bit tile starts", "backward._bwd_dkdv_kernel", dkdv, _bwd(WIDE=True, **d128), None
    yield "dq d128, 64-bit tile starts", "backward._bwd_dq_kernel", dq, _bwd(WIDE=True, **d128), None
    yield "dk/dv d128 dropout", "backward._bwd_dkdv_kernel", dkdv, _bwd(DROPOUT=True, **d128), None
    yield "dq d128 dropout", "backward._bwd_dq_kernel", dq, _bwd(DROPOUT=True, **d128), None
    yield "dk/dv d128 full, seqlen 1", "backward._bwd_dkdv_kernel", dkdv, _bwd(
        CAUSAL=False, **d128), dict(seqlen_q=1, seqlen_k=1)
    decode_flags = dict(SINK=False, HAS_BATCH_IDX=False, HAS_LEFTPAD=True, BLOCK_M=16, TMA=False)
    one_warp = next(c for c in _GPU_CONFIGS["decode"][128] if c[2] == 1)  # several programs to an SM
    decode_cases = (("paged d128", d128, True, False, False, dec), ("paged d80 split", d80, True, False, False, dec),
                    ("dense d128", d128, False, False, False, dec), ("dense d128, PDL", d128, False, True, False, dec),
                    ("paged d128 packed queries, PDL", d128, True, True, True, dec),
                    ("dense d80 split, PDL, one warp", d80, False, True, False, one_warp))
    for label, blocks, paged, pdl, varlen, config in decode_cases:
        flags = _variants(**decode_flags, **blocks, PAGED=paged, PDL=pdl, VARLEN=varlen)
        flags.pop("DROPOUT")
        yield f"decode {label}", "decode._decode_kernel", config, flags, None
    for tma in (False, True):  # prefill chunks over pages: pages of 16 (pointers) and of 256 (TMA)
        tall = _variants(**decode_flags | dict(BLOCK_M=TALL_ROWS, HAS_LEFTPAD=False, TMA=tma), **d128, PAGED=True,
                         PDL=True, VARLEN=True)
        tall.pop("DROPOUT")
        yield f"decode paged d128 tall tiles, {'TMA' if tma else 'pointers'}, PDL", "decode._decode_kernel", \
            _GPU_CONFIGS["decode_tall"][128][0], tall, None

    def gemv_flags(block_k, activation=0, pdl=True, second=False, ready=False):  # every constexpr the kernel takes
        return dict(BLOCK_K=block_k, HAS_BIAS=True, SECOND=second, HAS_BIAS2=second, ACTIVATION=activation,
                    X_READY=ready, PDL=pdl)

    for n in (2560, 10240):  # both of gemv_config's choices
        block_n, block_k, warps = gemv_config(n)
        for pdl in (False, True):
            yield f"gemv {block_n} rows x {block_k}{', PDL' if pdl else ''}", "gemv._gemv_kernel", (
                None, block_n, warps, 3), gemv_flags(block_k, pdl=pdl), None
        # a parallel layer's output and down projections summed (N = 2560 in Phi-2), both configs,
        # with the first operand read before the PDL wait (x_ready) or not
        for ready in (False, True):
            yield f"gemv {block_n} rows x {block_k}, PDL, second operand{', x ready' if ready else ''}", \
                "gemv._gemv_kernel", (None, block_n, warps, 3), gemv_flags(block_k, second=True, ready=ready), None
    block_n, block_k, warps = gemv_config(10240)  # an MLP's up product, every activation
    for name, code in ACTIVATIONS.items():
        if code:
            yield f"gemv {block_n} rows x {block_k}, PDL, {name}", "gemv._gemv_kernel", (None, block_n, warps, 3), \
                gemv_flags(block_k, activation=code), None


def main() -> int:
    failed = 0
    for label, kernel, config, flags, specialized in cases():
        try:
            print(f"ok   {label}: {compile_case(kernel, config, flags, specialized)}", flush=True)
        except Exception as e:  # report every case, then fail
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
