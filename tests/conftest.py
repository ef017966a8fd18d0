"""Shared fixtures: tiny tokenizers and random checkpoints of both families, built once per test session
as real HF folders (no network), then loaded by the tests through rlmt's own loading code."""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rlmt import tiny  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, nproc=1, env=None, check=True):
    """`python SCRIPT ARGS` from the repo root, or under torchrun with `nproc` processes (gloo on the CPU),
    one thread each. check: an exit code other than 0 fails with the end of both streams."""
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    r = subprocess.run([*launch, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def assert_close_to_scale(actual, expected, rel=1e-5, msg=""):
    """max |actual - expected| <= rel * max |expected|: the same math in another summation order (another
    CPU's BLAS blocking, other shapes, other ranks). Each entry then moves by a few ulps of the tensor's
    scale, not of its own size (an entry near 0 is a sum of larger terms that cancel), so an elementwise
    rtol is the wrong measure. rel 1e-5 is ~84 fp32 ulps (eps 1.19e-7): room for a few layers of matmuls
    and sums of ~100 terms, while a wrong mask, shift or normalization is off by 1e-2 or more."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{msg}: max |diff| {err:.3g} > {rel:g} x max |expected| {scale:.3g}"


def assert_metrics_close(a, b, keys, rel, floor=None):
    """Two runs' metrics.jsonl rows, step by step: each key within `rel` of its size, or within `floor`
    (default `rel`, i.e. rel of 1) for values near 0: a KL or a margin of ~0 carries the rounding of the
    larger quantities it is computed from, not of its own size."""
    assert [x["step"] for x in a] == [y["step"] for y in b]
    floor = rel if floor is None else floor
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=floor), (x["step"], k, x[k], y[k])


def assert_same_update(init, a, b, rel=5e-3):
    """Two training runs from the state dict `init` ended at state dicts a and b: ||Δa - Δb|| <= rel ||Δa||
    over all weights, Δ = final - init (a weight not in init, a fresh head, counts whole). Not weight by
    weight: Adam moves a weight by ~lr a step whatever its gradient's size, so a gradient entry near 0
    turns its rounding into up to ±lr. Measured: another summation order 2e-5, single weights already off
    by 1% of lr; one weight's sign flipped would be 2-4e-3. An SFT rank that trained on its own half of the
    batch was 0.5 off; that run's update of one tensor alone, 8e-2 (2048 weights) to 7e-3 (a 64-weight norm)."""
    assert a.keys() == b.keys()
    da = torch.cat([(a[k] - init[k] if k in init else a[k]).flatten() for k in a])
    db = torch.cat([(b[k] - init[k] if k in init else b[k]).flatten() for k in a])
    err, size = (da - db).norm().item(), da.norm().item()
    assert err <= rel * size, f"||Δa - Δb|| {err:.3g} > {rel:g} x ||Δa|| {size:.3g}"


SHARED_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rlmt-wildchat-if",
                              "train.jsonl")


@pytest.fixture(scope="session")
def rl_prompts(tmp_path_factory):
    """Eight short user turns as a prompts JSONL file, for the RL trainers' end-to-end runs."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    qs = ["why is the sky blue", "name three colors", "write a poem", "a dog and a cat", "plan a day",
          "explain light", "the river", "one two three"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in qs))
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _tok(tiny_dir, name, **kw):
    path = tiny_dir / name
    if not path.exists():
        tiny.build_tokenizer(str(path), **kw)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_dir):
    """Llama-3.1-Instruct-like: BOS prepended, EOS <|eot_id|>, no pad token, a chat template."""
    return _tok(tiny_dir, "tok-llama", family="llama")


@pytest.fixture(scope="session")
def llama_base_tokenizer(tiny_dir):
    """Llama-3.1 base-like: no chat template, EOS <|end_of_text|>, no pad token."""
    return _tok(tiny_dir, "tok-llama-base", family="llama", chat_template=False)


@pytest.fixture(scope="session")
def qwen_tokenizer(tiny_dir):
    """Qwen2.5-Instruct-like: no BOS, EOS <|im_end|>, pad <|endoftext|>, a chat template."""
    return _tok(tiny_dir, "tok-qwen", family="qwen")


def _ckpt(tiny_dir, name, tokenizer, **kw):
    path = tiny_dir / name
    if not path.exists():
        tiny.build_checkpoint(str(path), tokenizer=tokenizer, **kw)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(tiny_dir, llama_tokenizer):
    """LlamaForCausalLM: GQA (4 heads, 2 KV heads), llama3 rope scaling, untied embeddings."""
    return _ckpt(tiny_dir, "llama", llama_tokenizer, family="llama")


@pytest.fixture(scope="session")
def qwen_dir(tiny_dir, qwen_tokenizer):
    """Qwen2ForCausalLM: q/k/v bias, tied embeddings, vocab larger than the tokenizer."""
    return _ckpt(tiny_dir, "qwen", qwen_tokenizer, family="qwen")


@pytest.fixture(scope="session")
def llama_rm_dir(tiny_dir, llama_tokenizer):
    """LlamaForSequenceClassification with one label: a tiny reward model."""
    return _ckpt(tiny_dir, "llama-rm", llama_tokenizer, family="llama", head="score", seed=1)


@pytest.fixture(scope="session")
def qwen_rm_dir(tiny_dir, qwen_tokenizer):
    return _ckpt(tiny_dir, "qwen-rm", qwen_tokenizer, family="qwen", head="score", seed=1)


@pytest.fixture(scope="session")
def qwen_base_tokenizer(tiny_dir):
    """Qwen2.5 base-like: no BOS, no chat template, EOS <|endoftext|> (also the pad token)."""
    return _tok(tiny_dir, "tok-qwen-base", family="qwen", chat_template=False)


@pytest.fixture(scope="session")
def gpt2_rm_dir(tiny_dir, llama_tokenizer):
    """GPT2ForSequenceClassification (an architecture rlmt does not run) with one label and the Llama
    tokenizer, no pad token in its config: the reward model takes the transformers fallback."""
    path = tiny_dir / "gpt2-rm"
    if not path.exists():
        import transformers
        cfg = transformers.GPT2Config(vocab_size=len(llama_tokenizer), n_positions=512, n_embd=32, n_layer=2,
                                      n_head=2, num_labels=1, bos_token_id=llama_tokenizer.bos_token_id,
                                      eos_token_id=llama_tokenizer.eos_token_id, pad_token_id=None)
        torch.manual_seed(2)
        model = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
        with torch.no_grad():  # larger than GPT-2's std 0.02, so scores differ visibly between inputs
            for name, p in model.named_parameters():
                p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.1)
        model.save_pretrained(str(path))
        llama_tokenizer.save_pretrained(str(path))
    return str(path)
