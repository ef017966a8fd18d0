"""SFT: the assistant-token mask from the rendered template, packing, the schedule, and train_sft.py end to end
(learns, resumes exactly, packs without changing the loss, checks its input)."""

import json
import math
import os

import pytest
import torch

from rlmt import data, losses, model as M, optim
from rlmt.logprobs import packed_logprobs, sequence_logprobs
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


# ----------------------------------------------------------------------------- packing

def test_pack_rows():
    assert data.pack([3, 4, 2, 5, 1], 6) == [[0], [1, 2], [3, 4]]
    assert data.pack([6, 6], 6) == [[0], [1]]
    with pytest.raises(ValueError, match="more than the row length"):
        data.pack([7], 6)


def test_packing_gives_the_same_logprobs(llama_tokenizer, llama_dir):
    model = M.from_pretrained(llama_dir)
    convs = [CONV, CONV[1:3], CONV[:3], [CONV[1], {"role": "assistant", "content": "yes"}]]
    ex = [data.encode_sft(llama_tokenizer, c) for c in convs]
    padded = data.sft_batch(ex, 0)
    packed = data.sft_batch(ex, 0, pack_len=max(len(e[0]) for e in ex) + 20)
    assert packed["input_ids"].shape[0] < len(ex)  # something was packed
    with torch.no_grad():
        lp_pad, _ = sequence_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["position_ids"])
        lp_pack = packed_logprobs(model, packed["input_ids"], packed["position_ids"], packed["segment_ids"])
    a = lp_pad[padded["loss_mask"].bool()]  # row-major: example by example, in order, both ways
    b = lp_pack[packed["loss_mask"].bool()]
    assert_close_to_scale(a, b, 1e-5, "packed vs padded log-probs")
    assert int(packed["loss_mask"].sum()) == sum(sum(m) for _, m in ex)
    assert packed["position_ids"][0, len(ex[0][0])] == 0  # positions restart with the next example


def test_block_causal_mask():
    seg = torch.tensor([[0, 0, 1, 1, -1]])
    m = data.block_causal_mask(seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


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


def test_learns_resumes_packs_and_shards(llama_dir, sft_file, tmp_path):
    full, part, pack = str(tmp_path / "full"), str(tmp_path / "part"), str(tmp_path / "pack")
    run(*tiny_args(llama_dir, sft_file, full, "--steps", 6))
    a = metrics(full)
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6]
    assert a[-1]["loss"] < a[0]["loss"] - 1.0, [m["loss"] for m in a]  # the loss falls on a tiny dataset
    assert a[0]["lr"] == pytest.approx(3e-3 / 1) and a[-1]["lr"] < a[1]["lr"]  # 10% of 6: one warmup step
    assert M.from_pretrained(os.path.join(full, "latest", "policy")).config.vocab_size > 0
    # resume: 3 steps, stop, 3 more == 6 straight (the cosine schedule spans the 6 steps in both)
    run(*tiny_args(llama_dir, sft_file, part, "--steps", 6, "--stop-after", 3))
    run(*tiny_args(llama_dir, sft_file, part, "--steps", 6, "--resume", os.path.join(part, "checkpoints", "step-000003")))
    b = metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert_metrics_close(a, b, ("loss", "grad_norm", "lr"), rel=1e-6)  # the same computations: bit for bit
    # packing: fewer rows, the same loss per token (the same updates, so the same curve)
    packed = tiny_args(llama_dir, sft_file, pack, "--steps", 6, "--pack", "--max-len", 160, "--micro-batch-size", 1)
    run(*packed)
    c = metrics(pack)
    assert c[0]["rows"] < a[0]["rows"]
    assert_metrics_close(a, c, ("loss",), rel=1e-5)  # other shapes, other summation order
    assert [x["assistant_tokens"] for x in a] == [y["assistant_tokens"] for y in c]
    # torchrun, 2 ranks: packed rows differ in number between ranks (the lighter rank runs empty passes
    # to match the other's collectives); the same curve and weights as one process
    two = str(tmp_path / "two")
    run(*[two if x == pack else x for x in packed], nproc=2)
    d = metrics(two)
    assert any(m["rows"] != int(m["rows"]) for m in d)  # some step had unequal rows (a mean like 2.5)
    assert_metrics_close(c, d, ("loss", "grad_norm"), rel=1e-5)
    from safetensors.torch import load_file
    wa = load_file(os.path.join(pack, "latest", "policy", "model.safetensors"))
    wb = load_file(os.path.join(two, "latest", "policy", "model.safetensors"))
    assert_same_update(load_file(os.path.join(llama_dir, "model.safetensors")), wa, wb)


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
