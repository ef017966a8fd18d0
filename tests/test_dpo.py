"""DPO: pair selection and its drop rules, resumable pair building, the reference computed once by the
policy's own code path, and train_dpo.py end to end (learns, resumes exactly, 2 ranks == 1, checks input)."""

import json
import math
import os
import shutil

import pytest
import torch

from rlmt import chat, data, losses, model as M, pairs, reward
from conftest import assert_close_to_scale, assert_metrics_close, assert_same_update, run_script

REWARDS = '''
def length(prompts, answers):
    return [float(len(a)) for a in answers]

def constant(prompts, answers):
    return [1.0 for _ in answers]
'''


def run(*args, **kw):
    return run_script("train_dpo.py", *args, **kw)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- pure pieces

def test_select_pair_rules():
    r = torch.tensor([0.5, 3.0, -1.0, 2.0, 9.0, 0.0])
    ok = torch.tensor([True, True, True, True, False, True])
    assert pairs.select_pair(r, ok) == (1, 2, None)  # 9.0 did not parse: not a candidate
    assert pairs.select_pair(r, torch.tensor([True, True, True, False, False, False])) == \
        (None, None, "too_few_parseable")  # 3 < 4
    assert pairs.select_pair(r, torch.tensor([True, True, True, False, False, False]), min_valid=3) == (1, 2, None)
    assert pairs.select_pair(torch.ones(8), torch.ones(8, dtype=torch.bool)) == (None, None, "tie")
    assert pairs.select_pair(torch.tensor([1.0, 2.0, 2.0, 1.0]), torch.ones(4, dtype=torch.bool)) == (1, 0, None)


def test_truncate_pair():
    p, c, r = [0, 1, 2, 3, 4, 5], [10, 11, 12], [20]
    assert data.truncate_pair(p, c, r, 9) == (p, c, r, False)
    # 6 + 3 > 8: the prompt is cut from the left first, BOS (0) kept: [0, 2, 3, 4, 5]
    assert data.truncate_pair(p, c, r, 8, bos_id=0) == ([0, 2, 3, 4, 5], c, r, True)
    # a long completion: the prompt keeps max_len // 2 = 3 tokens, the completions get the other 3
    assert data.truncate_pair(p, list(range(10, 20)), r, 6, bos_id=0) == ([0, 4, 5], [10, 11, 12], r, True)
    assert data.truncate_pair(p, list(range(10, 20)), r, 6) == ([3, 4, 5], [10, 11, 12], r, True)


def test_load_pairs_and_encode(tmp_path, llama_tokenizer):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "hi", "chosen": "hello there", "rejected": "go away"},
            {"prompt": "hi", "chosen": "a", "rejected": "b", "prompt_ids": [1, 2], "chosen_ids": [3],
             "rejected_ids": [4]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = data.load_pairs(str(path))
    assert got[0]["ids"] is None and got[1]["ids"] == ([1, 2], [3], [4])
    assert data.encode_pair(llama_tokenizer, got[1], "chat") == ([1, 2], [3], [4])  # the sampled ids, as they are
    prompt, chosen, rejected = data.encode_pair(llama_tokenizer, got[0], "chat")
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert prompt == chat.encode_prompt(llama_tokenizer, [{"role": "user", "content": "hi"}], "chat")
    assert chosen[-1] == eot and llama_tokenizer.decode(chosen[:-1]) == "hello there"
    for bad, message in [({"prompt": "hi", "chosen": "a"}, 'missing field "rejected"'),
                         ({"prompt": "hi", "chosen": "a", "rejected": ""}, '"rejected" must be a non-empty string'),
                         ({**rows[1], "chosen_ids": []}, '"chosen_ids" must be a non-empty list of token ids'),
                         ({**rows[0], "prompt_ids": [1]}, "give all three token-id fields or none"),
                         ({"messages": [{"role": "user", "content": "hi"}]}, "a prompt row")]:
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(data.DataError, match=f"pairs.jsonl:2: .*{message}"):
            data.load_pairs(str(path))


# ----------------------------------------------------------------------------- pair building

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    qs = ["why is the sky blue", "name three colors", "write a poem", "a dog and a cat", "plan a day",
          "explain light", "the river", "one two three"]
    (d / "prompts.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": q}]})
                                             + "\n" for i, q in enumerate(qs)))
    (d / "rewards.py").write_text(REWARDS)
    return d


BUILD = ["--template", "chat", "--max-new-tokens", 12, "--max-prompt-len", 64, "--chunk-prompts", 3]


@pytest.fixture(scope="module")
def built(files, llama_dir):
    """Pairs built by the CLI from the 8 prompts, scored by the answer's length (a scripted reward)."""
    out = files / "pairs.jsonl"
    r = run("--build-pairs", "--model", llama_dir, "--data", files / "prompts.jsonl", "--out", out,
            "--reward-fn", f"{files / 'rewards.py'}:length", *BUILD)
    return str(out), r.stdout


def test_build_pairs_writes_valid_pairs_and_skips_on_rerun(built, files, llama_dir, llama_tokenizer):
    path, stdout = built
    rows = read_jsonl(path)
    dropped = read_jsonl(pairs.dropped_path(path))
    assert len(rows) >= 4 and len(rows) + len(dropped) == 8
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # prompt order across chunks
    stops = set(chat.stop_ids(llama_tokenizer))
    for r in rows:
        valid = [s for s in r["scores"] if s is not None]
        assert len(r["scores"]) == 8 and r["n_parseable"] == len(valid) >= 4
        assert r["chosen_score"] == pytest.approx(max(valid)) and r["rejected_score"] == pytest.approx(min(valid))
        assert r["chosen_score"] > r["rejected_score"]
        assert r["prompt_ids"] == chat.encode_prompt(llama_tokenizer, r["prompt"], "chat")
        for k in ("chosen", "rejected"):  # the text is the decoded sampled ids (without the stop token)
            ids = r[f"{k}_ids"][:-1] if r[f"{k}_ids"][-1] in stops else r[f"{k}_ids"]
            assert llama_tokenizer.decode(ids) == r[k]
        assert len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 8192
    for d in dropped:
        assert d["reason"] in pairs.DROP_REASONS
    assert f"pairs: {len(rows)} new, 0 prompts already done" in stdout
    before = open(path).read()
    r = run("--build-pairs", "--model", llama_dir, "--data", files / "prompts.jsonl", "--out", path,
            "--reward-fn", f"{files / 'rewards.py'}:length", *BUILD)
    assert "pairs: 0 new, 8 prompts already done" in r.stdout and open(path).read() == before


def test_build_pairs_drop_rules_and_crash_repair(built, files, llama_dir, llama_tokenizer, tmp_path):
    """In process, on the same tiny model: each drop rule on its own, then a file cut mid-line is repaired
    and the cut prompt sampled again to the very same pair (samples are keyed by seed and prompt)."""
    policy = M.from_pretrained(llama_dir)
    rows = data.load_prompts(str(files / "prompts.jsonl"))
    length = reward.load_reward_fn(f"{files / 'rewards.py'}:length")
    kw = dict(template="chat", max_new_tokens=12, max_prompt_len=64, progress=False)

    def build(name, **extra):
        return pairs.build_pairs(policy, llama_tokenizer, rows, str(tmp_path / name), **{**kw, **extra})

    # strict chat-think: the answer needs its </think>, which the random model never writes (plain chat has
    # no delimiter, so strict does nothing there: the authors' no-think configs)
    assert build("strict.jsonl", reward_fn=length, strict=True, template="chat-think") == \
        {"pairs": 0, "skipped": 0, "too_few_parseable": 8, "tie": 0, "too_long": 0}
    assert not os.path.exists(tmp_path / "strict.jsonl") or not read_jsonl(tmp_path / "strict.jsonl")
    n = len(read_jsonl(built[0]))  # the prompts that the CLI run kept
    ties = build("tie.jsonl", reward_fn=reward.load_reward_fn(f"{files / 'rewards.py'}:constant"))
    assert ties["tie"] >= n and ties["pairs"] == 0
    long = build("long.jsonl", reward_fn=length, max_pair_len=20)
    assert long["too_long"] == n and all(d["length"] > 20 for d in read_jsonl(tmp_path / "long.dropped.jsonl")
                                         if d["reason"] == "too_long")
    # a crash in the middle of the last line
    path = tmp_path / "pairs.jsonl"
    shutil.copy(built[0], path)
    shutil.copy(pairs.dropped_path(built[0]), pairs.dropped_path(str(path)))
    whole = path.read_text()
    last = whole.rstrip("\n").split("\n")[-1]
    path.write_text(whole[:len(whole) - 1 - len(last) // 2])  # half of the last row, no newline
    counts = build("pairs.jsonl", reward_fn=length, chunk_prompts=3)
    assert counts["pairs"] == 1 and counts["skipped"] == 7 and path.read_text() == whole


# ----------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_precomputed_and_live_reference_agree(built, llama_dir, kind):
    """The script's precomputed reference (one pass before training, its own grouping of pairs) and a live
    frozen reference model on the training micro-batch give the same loss and the same gradients."""
    enc = [tuple(r[f"{k}_ids"] for k in ("prompt", "chosen", "rejected")) for r in read_jsonl(built[0])[:3]]
    ref = M.from_pretrained(llama_dir)
    policy = M.from_pretrained(llama_dir).train()
    with torch.no_grad():  # a policy that has moved away from the reference, so the loss is not ln 2
        g = torch.Generator().manual_seed(0)
        for p_ in policy.parameters():
            p_.add_(torch.randn(p_.shape, generator=g) * 0.02)
    with torch.no_grad():  # precomputed: one pair at a time
        pre = [pairs.pair_logps(ref, pairs.pair_batch([e], 0)) for e in enc]
    pre_lp = torch.stack([torch.stack(lp.chunk(2), 1)[0] for lp, _ in pre])  # [pairs, 2]
    pre_n = torch.stack([torch.stack(n.chunk(2), 1)[0] for _, n in pre])

    def loss_and_grads(ref_lp, ref_n):
        policy.zero_grad()
        lp, n = pairs.pair_logps(policy, pairs.pair_batch(enc, 0))
        if kind == "ipo":
            lp, ref_lp = lp / n, ref_lp / ref_n
        c, r = lp.chunk(2)
        loss, _ = losses.dpo_loss(c, r, ref_lp[:, 0], ref_lp[:, 1], 0.1, kind)
        loss.sum().backward()
        return loss.detach(), [p_.grad.clone() for p_ in policy.parameters()]

    with torch.no_grad():  # live: the frozen reference on the training batch itself
        live_lp, live_n = pairs.pair_logps(ref, pairs.pair_batch(enc, 0))
    live_lp, live_n = torch.stack(live_lp.chunk(2), 1), torch.stack(live_n.chunk(2), 1)
    live = loss_and_grads(live_lp, live_n)
    assert abs(live[0].mean().item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    # the same code path: precomputed on the training batch's grouping, bit for bit the live values
    again = loss_and_grads(live_lp.clone(), live_n.clone())
    assert torch.equal(again[0], live[0]) and all(torch.equal(a, b) for a, b in zip(again[1], live[1]))
    # grouped differently (one pair a forward): float rounding only, of reference sums of ~50 log-probs
    # (~65). The loss and its gradient move by β·δh: 1e-5 of 65 in h is ~1e-4 of them (measured 1.4e-6);
    # one reference sum off by 0.1 nat already moves them by ~5e-3
    precomputed = loss_and_grads(pre_lp, pre_n)
    assert_close_to_scale(precomputed[0], live[0], 1e-4, "loss")
    for a, b in zip(precomputed[1], live[1]):
        assert_close_to_scale(a, b, 1e-4, "gradient")


# ----------------------------------------------------------------------------- train_dpo.py

def train_args(model, pairs_path, out, *extra):
    return ["--model", model, "--data", pairs_path, "--out", out, "--batch-size", 4, "--micro-batch-size", 2,
            "--lr", 2e-3, "--steps", 6, "--save-every", 0, *extra]


@pytest.fixture(scope="module")
def trained(built, llama_dir, files):
    out = str(files / "train")
    run(*train_args(llama_dir, built[0], out))
    return out


def test_margin_and_accuracy_rise(trained):
    rows = read_jsonl(os.path.join(trained, "metrics.jsonl"))
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    for k in ("loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "grad_norm", "lr"):
        assert k in rows[0], k
    # step 1: the policy is the reference, so the precomputed reference matches it: h = 0, loss = ln 2, up to
    # rounding of h = (π_c - ref_c) - (π_r - ref_r), sums of ~50 log-probs (~65) in two groupings: 1e-5 of β·65·2
    zero = 1e-5 * 0.1 * 2 * abs(rows[0]["chosen_logp"])  # ≈ 1.3e-4; a reference that differs: β·h ~ 0.1 or more
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=zero) and abs(rows[0]["reward_margin"]) < zero
    last = rows[-2:]
    assert min(m["reward_margin"] for m in last) > 0.1, [m["reward_margin"] for m in rows]
    assert min(m["reward_accuracy"] for m in last) >= 0.75, [m["reward_accuracy"] for m in rows]
    assert os.path.exists(os.path.join(trained, "latest", "policy", "model.safetensors"))


def test_resume_equals_uninterrupted(trained, built, llama_dir, tmp_path):
    """The reference is recomputed from --model before the state loads, so a resumed run sees it unchanged."""
    part = str(tmp_path / "part")
    run(*train_args(llama_dir, built[0], part, "--stop-after", 3))
    run(*train_args(llama_dir, built[0], part, "--resume", os.path.join(part, "latest", "state")))
    a, b = read_jsonl(os.path.join(trained, "metrics.jsonl")), read_jsonl(os.path.join(part, "metrics.jsonl"))
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    # resume replays the same computations (same shapes, same order): bit for bit on any one CPU
    assert_metrics_close(a, b, ("loss", "reward_margin", "grad_norm", "lr"), rel=1e-6)


def test_fsdp_two_ranks_equal_one_process(trained, built, llama_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) == one process, same global batch, over six steps."""
    two = str(tmp_path / "two")
    r = run(*train_args(llama_dir, built[0], two), nproc=2, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_jsonl(os.path.join(trained, "metrics.jsonl")), read_jsonl(os.path.join(two, "metrics.jsonl"))
    assert len(a) == len(b) == 6
    # 2 ranks: another fp32 reduction order. chosen_logp is a sum of ~50 log-probs (~65): relative, not
    # absolute; the margin β h (and the loss, a function of it) carries the rounding of those sums, whatever
    # its own size: 1e-5 of β·65·2 ≈ 1.3e-4
    assert_metrics_close(a, b, ("chosen_logp", "grad_norm"), rel=1e-5)
    assert_metrics_close(a, b, ("loss", "reward_margin"), rel=1e-5, floor=1.3e-4)
    # h is float noise around 0 at step 1, so is the fraction with h > 0
    assert_metrics_close(a[1:], b[1:], ("reward_accuracy",), rel=1e-5)
    from safetensors.torch import load_file
    wa = load_file(os.path.join(trained, "latest", "policy", "model.safetensors"))
    wb = load_file(os.path.join(two, "latest", "policy", "model.safetensors"))
    assert_same_update(load_file(os.path.join(llama_dir, "model.safetensors")), wa, wb)


def test_bad_input_gets_clear_messages(files, llama_dir, tmp_path):
    out = str(tmp_path / "bad")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a"}\n')
    r = run(*train_args(llama_dir, str(bad), out), check=False)
    assert r.returncode != 0 and f'{bad}:2: missing field "rejected"' in r.stderr and "Traceback" not in r.stderr
    r = run(*train_args(llama_dir, str(files / "prompts.jsonl"), out), check=False)
    assert r.returncode != 0 and "prompts, not pairs" in r.stderr and "--reward-model" in r.stderr
    assert "Traceback" not in r.stderr


def test_one_step_equals_the_padded_path(built, llama_dir, tmp_path):
    """One step of train_dpo.py (the step's 4 pairs, chosen and rejected, packed into one micro-batch)
    against the padded path as the loop ran before packing, written out here: the reference's summed
    log-probs one pair a forward, the policy's 2 pairs a micro-batch on [chosen; rejected] left/right-padded
    batches, the sigmoid loss summed over pairs / 4, AdamW. The loss, the gradient norm (Adam's first step
    only sees each gradient's sign, the norm sees its size) and the update agree."""
    import numpy as np
    from safetensors.torch import load_file

    from rlmt import optim
    out = str(tmp_path / "one")
    run(*train_args(llama_dir, built[0], out, "--stop-after", 1, "--micro-batch-tokens", 10000,
                    "--micro-batch-size", 4))
    got = read_jsonl(os.path.join(out, "metrics.jsonl"))[0]
    assert got["n_micro"] == 1
    tok = chat.load_tokenizer(llama_dir)
    encoded = [data.encode_pair(tok, r, "think") for r in data.load_pairs(built[0])]
    step = [encoded[j] for j in np.random.RandomState(0).permutation(len(encoded))[:4]]
    ref, policy = M.from_pretrained(llama_dir).eval(), M.from_pretrained(llama_dir).train()
    with torch.no_grad():
        ref_lp = torch.stack([pairs.pair_logps(ref, pairs.pair_batch([e], 0))[0] for e in step])  # [4, 2]
    total = 0.0
    for s in (slice(0, 2), slice(2, 4)):
        lp, _ = pairs.pair_logps(policy, pairs.pair_batch(step[s], chat.pad_id(tok)))
        chosen, rejected = lp.chunk(2)
        loss, _ = losses.dpo_loss(chosen, rejected, ref_lp[s, 0], ref_lp[s, 1], 0.1, "sigmoid")
        (loss.sum() / 4).backward()
        total += loss.sum().item() / 4
    opt = torch.optim.AdamW(policy.parameters(), lr=optim.cosine_lr(0, 6, 2e-3, 0.05), betas=(0.9, 0.95),
                            weight_decay=1e-4)
    norm, _ = optim.step(policy, opt, 1.0)
    assert got["loss"] == pytest.approx(total, rel=1e-5) and got["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    init = load_file(os.path.join(llama_dir, "model.safetensors"))
    assert_same_update(init, load_file(os.path.join(out, "latest", "policy", "model.safetensors")),
                       {k: v.detach() for k, v in policy.state_dict().items()})
