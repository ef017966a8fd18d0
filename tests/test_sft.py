"""SFT: the assistant-token mask from the rendered template, the schedule, and train_sft.py end to end
(learns, resumes exactly, gives the padded path's update, micro-batches by tokens without changing the
loss, 2 ranks == 1 process, checks its input)."""

import json
import math
import os

import pytest
import torch

from rlmt import chat, data, losses, model as M, optim
from rlmt.logprobs import sequence_logprobs
from conftest import assert_close_to_scale, assert_metrics_close, assert_same_update, run_script


CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "name three colors"},
        {"role": "assistant", "content": "<think>\nthe user asks about color\n</think>\n\nred blue green"},
        {"role": "user", "content": "and a dog?"},
        {"role": "assistant", "content": "dog cat bird"}]


@pytest.fixture(params=["llama", "qwen"])
def family(request, llama_tokenizer, qwen_tokenizer, llama_dir, qwen_dir):
    return {"llama": (llama_tokenizer, llama_dir, "<|eot_id|>"),
            "qwen": (qwen_tokenizer, qwen_dir, "<|im_end|>")}[request.param]


# ----------------------------------------------------------------------------- the mask

def test_mask_is_exactly_the_assistant_turns(family):
    tok, _, eot = family
    ids, mask = data.encode_sft(tok, CONV)
    assert len(ids) == len(mask) and mask[0] == 0
    assert tok.decode(ids) == tok.apply_chat_template(CONV, tokenize=False)  # nothing lost or added
    picked = tok.decode([t for t, m in zip(ids, mask) if m])
    # both turns and their end-of-turn token; not Qwen's "\n" after <|im_end|>, no header, no user text
    assert picked == f"<think>\nthe user asks about color\n</think>\n\nred blue green{eot}dog cat bird{eot}"
    # the masked spans are contiguous runs ending on the end-of-turn id
    eot_id = tok.convert_tokens_to_ids(eot)
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert [ids[i] for i in ends] == [eot_id, eot_id]
    # right-truncation keeps the start
    cut_ids, cut_mask = data.encode_sft(tok, CONV, max_len=10)
    assert cut_ids == ids[:10] and cut_mask == mask[:10] and not any(cut_mask)


def test_mask_errors(llama_tokenizer, llama_base_tokenizer):
    with pytest.raises(ValueError, match="has none"):
        data.encode_sft(llama_base_tokenizer, CONV)
    with pytest.raises(ValueError, match="opens with an assistant turn"):
        data.encode_sft(llama_tokenizer, CONV[2:])
    with pytest.raises(ValueError, match="no assistant turn"):
        data.encode_sft(llama_tokenizer, CONV[:2])


def sft_loss(model, tok, conversations):
    """The script's loss: Σ −log π over assistant tokens / their count, through sequence_logprobs."""
    b = data.sft_batch([data.encode_sft(tok, c) for c in conversations], 0)
    logp, _ = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"])
    return losses.aggregate(-logp, b["loss_mask"], "token-mean")


def test_loss_ignores_system_user_and_template_tokens(family):
    """With attention switched off (o_proj = 0) the model is a bigram model: the log-prob of token t+1
    depends on token t alone. Changing system / user text then changes the loss only if one of their
    tokens (or the token right after them, the header) is in the mask. It must not."""
    tok, path, _ = family
    model = M.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    base = sft_loss(model, tok, [CONV])
    variants = [
        [{**m, "content": "a much longer and different question about the world?"} if m["role"] == "user" else m
         for m in CONV],
        CONV[1:],  # no system turn (Qwen's template then writes its default one)
        [{**CONV[0], "content": "You are a pirate. Answer in rhymes, always."}] + CONV[1:],
    ]
    for conv in variants:
        # other sequence lengths: the same values in another summation order (a loss of ~6: relative)
        assert sft_loss(model, tok, [conv]).item() == pytest.approx(base.item(), rel=1e-5)
    changed = CONV[:4] + [{"role": "assistant", "content": "a tree and a river"}]
    assert abs(sft_loss(model, tok, [changed]).item() - base.item()) > 1e-3  # the test can fail


def test_cosine_lr():
    # 10 steps, 20% warmup = 2 steps: 0.5, 1.0; then ½(1 + cos(π k / 8)), k = 0..7
    lrs = [optim.cosine_lr(s, 10, 1.0, 0.2) for s in range(10)]
    expect = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs == pytest.approx(expect)
    assert optim.cosine_lr(0, 10, 2.0) == 2.0 and optim.cosine_lr(10, 10, 2.0) == 0.0
    with pytest.raises(ValueError, match="warmup_frac"):
        optim.cosine_lr(0, 10, 1.0, 1.0)


# ----------------------------------------------------------------------------- train_sft.py

def run(*args, **kw):
    return run_script("train_sft.py", *args, **kw)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    import random
    from rlmt import demo
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": demo.sft_conversation(rng)}) + "\n" for _ in range(24)))
    return str(path)


def tiny_args(model, data_path, out, *extra):
    return ["--model", model, "--data", data_path, "--out", out, "--batch-size", 6, "--micro-batch-size", 3,
            "--lr", 3e-3, "--max-len", 128, "--save-every", 0, *extra]


def test_learns_resumes_micro_batches_and_shards(llama_dir, sft_file, tmp_path):
    full, part, small = str(tmp_path / "full"), str(tmp_path / "part"), str(tmp_path / "small")
    run(*tiny_args(llama_dir, sft_file, full, "--steps", 6))
    a = metrics(full)
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6]
    assert a[-1]["loss"] < a[0]["loss"] - 1.0, [m["loss"] for m in a]  # the loss falls on a tiny dataset
    assert a[0]["lr"] == pytest.approx(3e-3 / 1) and a[-1]["lr"] < a[1]["lr"]  # 10% of 6: one warmup step
    assert all(m["pad_frac"] == 0 for m in a) and a[0]["n_micro"] == 2  # 6 packed conversations, 3 a pass
    assert M.from_pretrained(os.path.join(full, "latest", "policy")).config.vocab_size > 0
    # resume: 3 steps, stop, 3 more == 6 straight (the cosine schedule spans the 6 steps in both)
    run(*tiny_args(llama_dir, sft_file, part, "--steps", 6, "--stop-after", 3))
    run(*tiny_args(llama_dir, sft_file, part, "--steps", 6, "--resume", os.path.join(part, "checkpoints", "step-000003")))
    b = metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert_metrics_close(a, b, ("loss", "grad_norm", "lr"), rel=1e-6)  # the same computations: bit for bit
    # micro-batches of at most 150 tokens, no row cap: more passes, the same loss per token (the same updates)
    budget = tiny_args(llama_dir, sft_file, small, "--steps", 6, "--micro-batch-tokens", 150)
    budget.remove("--micro-batch-size")
    budget.remove(3)
    run(*budget)
    c = metrics(small)
    assert all(y["n_micro"] > x["n_micro"] for x, y in zip(a, c))
    assert_metrics_close(a, c, ("loss",), rel=1e-5)  # other shapes, other summation order
    assert [x["assistant_tokens"] for x in a] == [y["assistant_tokens"] for y in c]
    # torchrun, 2 ranks: the conversations split by tokens, each rank's micro-batches by tokens; where one
    # rank needs fewer it runs empty passes to match the other's collectives (pad_frac > 0 counts their
    # stand-in tokens); the same curve and weights as one process
    two = str(tmp_path / "two")
    run(*[two if x == small else x for x in budget], nproc=2)
    d = metrics(two)
    assert any(m["pad_frac"] > 0 for m in d), [m["n_micro"] for m in d]
    assert_metrics_close(c, d, ("loss", "grad_norm"), rel=1e-5)
    from safetensors.torch import load_file
    wa = load_file(os.path.join(small, "latest", "policy", "model.safetensors"))
    wb = load_file(os.path.join(two, "latest", "policy", "model.safetensors"))
    assert_same_update(load_file(os.path.join(llama_dir, "model.safetensors")), wa, wb)


def test_one_step_equals_the_padded_path(llama_dir, sft_file, tmp_path):
    """One optimizer step of train_sft.py (packed micro-batches of at most 150 tokens) against the padded
    path written out here: the step's 6 conversations right-padded, 3 rows a forward (sequence_logprobs),
    the loss summed over assistant tokens / their count, AdamW. The loss and the gradient norm (Adam's
    first step only sees each gradient's sign, the norm sees its size) and the update agree."""
    import numpy as np
    from safetensors.torch import load_file
    out = str(tmp_path / "one")
    run(*tiny_args(llama_dir, sft_file, out, "--steps", 4, "--stop-after", 1, "--micro-batch-tokens", 150))
    got = metrics(out)[0]
    tok = chat.load_tokenizer(llama_dir)
    examples = [(ids[:128], mask[:128]) for ids, mask in (data.encode_sft(tok, r["messages"])
                                                           for r in data.load_sft(sft_file))]
    examples = [e for e in examples if any(e[1])]
    step = [examples[j] for j in np.random.RandomState(0).permutation(len(examples))[:6]]
    model = M.from_pretrained(llama_dir).train()
    b = data.sft_batch(step, chat.pad_id(tok))
    count, loss = b["loss_mask"].sum(), 0.0
    for s in (slice(0, 3), slice(3, 6)):
        logp, _ = sequence_logprobs(model, b["input_ids"][s], b["attention_mask"][s], b["position_ids"][s])
        part = losses.aggregate(-logp, b["loss_mask"][s], "token-mean", count=count)
        part.backward()
        loss += part.item()
    opt = torch.optim.AdamW(model.parameters(), lr=optim.cosine_lr(0, 4, 3e-3, 0.1), betas=(0.9, 0.95),
                            weight_decay=1e-4)
    norm, _ = optim.step(model, opt, 1.0)
    assert got["loss"] == pytest.approx(loss, rel=1e-5) and got["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert got["n_micro"] > 2  # the packed run cut the step otherwise than the reference
    init = load_file(os.path.join(llama_dir, "model.safetensors"))
    assert_same_update(init, load_file(os.path.join(out, "latest", "policy", "model.safetensors")),
                       {k: v.detach() for k, v in model.state_dict().items()})


def test_bad_input_gets_clear_messages(llama_dir, sft_file, tiny_dir, llama_base_tokenizer, tmp_path):
    out = str(tmp_path / "bad")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}]}\n')
    r = run(*tiny_args(llama_dir, str(bad), out), check=False)
    assert r.returncode != 0 and f"{bad}:2: the last message of \"messages\" must be a assistant turn" in r.stderr
    assert "Traceback" not in r.stderr
    r = run(*tiny_args(str(tiny_dir / "tok-llama-base"), sft_file, out), check=False)
    assert r.returncode != 0 and "has none (a base model?)" in r.stderr and "Traceback" not in r.stderr


def test_demo_learns_the_format(tmp_path):
    out = str(tmp_path / "demo")
    r = run("--demo", "--out", out, "--steps", 12)
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0, [m["loss"] for m in rows]
    assert "demo: 'name three color?' -> " in r.stdout
