"""train_grpo.py end to end on tiny checkpoints: runs, exports, resumes exactly, learns, checks its input."""

import json
import os

import pytest
import torch

from conftest import assert_close_to_scale, assert_metrics_close, assert_same_update, run_script
from rlmt import losses


def run(*args, **kw):
    return run_script("train_grpo.py", *args, **kw)


def tiny_args(model, rm, data, out, *extra):
    return ["--model", model, "--reward-model", rm, "--data", data, "--out", out, "--prompts-per-step", 2,
            "--group-size", 4, "--micro-batch-size", 2, "--max-new-tokens", 12, "--max-prompt-len", 64,
            "--lr", 1e-3, "--save-every", 0, "--eval-every", 0, "--template", "chat", *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_runs_exports_and_logs(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    out = str(tmp_path / "run")
    # 8 rows a rank and at most 3 a micro-batch (3 + 3 + 2): no size has to divide anything any more
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--steps", 3, "--micro-batch-size", 3))
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "format_rate", "response_len", "thought_len", "kl", "entropy",
                "grad_norm", "zero_std_frac", "tokens_per_s", "t_sample", "t_reward", "t_train",
                "pad_frac", "n_micro", "train_tokens_per_s"):
        assert key in rows[0], key
    assert all(m["n_micro"] == 3 and m["pad_frac"] == 0 for m in rows)
    assert rows[0]["kl"] == 0.0  # step 1: policy == reference
    # one step per rollout: the ratio is 1 by construction, so its statistics (and the constant lr) are not logged
    assert not {*losses.RATIO_METRICS, "lr"} & set(rows[0]), rows[0]
    assert rows[0]["mismatch_logp_diff_mean"] < 1e-4  # sampler and trainer agree on the log-probs
    assert "policy:" in r.stdout and os.path.exists(os.path.join(out, "samples.jsonl"))
    # the export loads in transformers and matches rlmt's logits; training moved the weights
    import transformers
    from rlmt import model as M
    ours = M.from_pretrained(os.path.join(out, "latest", "policy"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "latest", "policy")).eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert_close_to_scale(ours(ids), ref(input_ids=ids).logits, 1e-5, "logits vs transformers")
    start = M.from_pretrained(llama_dir)
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, ours.model.layers[0].mlp.up_proj.weight)


def test_resume_equals_uninterrupted(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, full, "--steps", 4))
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, part, "--steps", 2))
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, part, "--steps", 4, "--resume", "auto"))
    a, b = metrics(full), metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    # resume replays the same computations (same shapes, same order): bit for bit on any one CPU
    assert_metrics_close(a, b, ("reward_mean", "kl", "entropy", "grad_norm", "response_len"), rel=1e-6)
    from safetensors.torch import load_file
    wa = load_file(os.path.join(full, "latest", "policy", "model.safetensors"))
    wb = load_file(os.path.join(part, "latest", "policy", "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_bad_input_gets_clear_messages(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    out = str(tmp_path / "bad")
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--prompts-per-step", 3), check=False,
            env={"WORLD_SIZE": "2"})
    assert r.returncode != 0 and "--prompts-per-step 3 must be divisible by the number of ranks 2" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": oops}\n')
    r = run(*tiny_args(llama_dir, llama_rm_dir, str(bad), out), check=False)
    assert r.returncode != 0 and f"{bad}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr
    r = run("--model", llama_dir, "--data", rl_prompts, check=False)
    assert r.returncode != 0 and "give --reward-model, --reward-fn, or both" in r.stderr
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--resume", str(tmp_path)), check=False)
    assert r.returncode != 0 and "no trainer_state.json" in r.stderr and "Traceback" not in r.stderr
    r = run(*tiny_args(str(tmp_path / "no-model"), llama_rm_dir, rl_prompts, out), check=False)
    assert r.returncode != 0 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--template", "zero", "--temperature", 0), check=False)
    assert r.returncode != 0 and "--temperature must be > 0" in r.stderr


def test_demo_learns_the_format(tmp_path):
    """The README's demo, shortened: the reward (1 for a parsed answer, 0 for strict mode's [NULL]) must rise
    clearly."""
    out = str(tmp_path / "demo")
    run("--demo", "--out", out, "--steps", 8, "--eval-every", 0)
    rows = metrics(out)
    first, last = rows[0]["reward_mean"], sum(m["reward_mean"] for m in rows[-3:]) / 3
    assert last > first + 0.2, (first, last)


def test_fsdp_two_ranks_equal_one_process(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) == one process, same global batch, after two steps.
    Sampling is keyed by (seed, step, global sample index), so both runs draw the same rollouts. Each rank
    packs its own samples into micro-batches of at most 70 tokens; their lengths differ between the ranks
    (34 and 36 tokens here: two a micro-batch on one rank, one on the other), and the rank that needs fewer
    micro-batches runs empty passes (pad_frac > 0: their stand-in
    tokens) so that both run the same FSDP collectives."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = tiny_args(llama_dir, llama_rm_dir, rl_prompts, "X", "--steps", 2, "--micro-batch-tokens", 70)
    run(*[one if a == "X" else a for a in common])  # "X": the output folder
    run(*[two if a == "X" else a for a in common], nproc=2)
    a, b = metrics(one), metrics(two)
    assert all(m["pad_frac"] == 0 for m in a) and any(m["pad_frac"] > 0 for m in b), [m["n_micro"] for m in b]
    # 2 ranks: another fp32 reduction order
    assert_metrics_close(a, b, ("reward_mean", "response_len", "kl", "grad_norm"), rel=1e-5)
    from safetensors.torch import load_file
    wa = load_file(os.path.join(one, "latest", "policy", "model.safetensors"))
    wb = load_file(os.path.join(two, "latest", "policy", "model.safetensors"))
    assert_same_update(load_file(os.path.join(llama_dir, "model.safetensors")), wa, wb)


def test_mini_batches_take_several_steps_and_clip(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    """--mini-batches 2 (the authors' 128-prompt GRPO configs): two optimizer steps per rollout against the
    trainer's old log-probs, so the second step sees ratios != 1 and, at a large lr, clips; one step per
    rollout keeps the ratio at exactly 1. 2 gloo ranks give the one-process update (mini-batches are
    strided groups, the same prompts whatever the number of ranks)."""
    from safetensors.torch import load_file
    one, two, single = (str(tmp_path / x) for x in ("one", "two", "single"))
    common = tiny_args(llama_dir, llama_rm_dir, rl_prompts, "X", "--steps", 1, "--prompts-per-step", 4, "--lr", 3e-2)
    run(*[one if a == "X" else a for a in common], "--mini-batches", 2)
    run(*[two if a == "X" else a for a in common], "--mini-batches", 2, nproc=2)
    run(*[single if a == "X" else a for a in common])
    m, s = metrics(one)[0], metrics(single)[0]
    assert not set(losses.RATIO_METRICS) & set(s)  # ρ ≡ 1 by construction: not logged
    assert m["ratio_max"] > 1.0 and m["clip_frac"] > 0.0, m
    assert_metrics_close(metrics(one), metrics(two), ("reward_mean", "grad_norm"), rel=1e-5)
    assert_same_update(load_file(os.path.join(llama_dir, "model.safetensors")),
                       *(load_file(os.path.join(x, "latest", "policy", "model.safetensors")) for x in (one, two)))


def test_one_step_equals_the_padded_path(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    """One step of train_grpo.py (samples packed into micro-batches of at most 150 tokens) against the
    padded path as the loop ran before packing, written out here: the same rollout (same seeds), 2 rows a
    micro-batch sliced from the left/right-padded batch, sequence_logprobs (a dense mask), k3 KL,
    entropy, per-sequence token mean, AdamW. The KL and entropy, the gradient norm (Adam's first step only
    sees each gradient's sign, the norm sees its size) and the update agree."""
    from safetensors.torch import load_file

    from rlmt import chat, data, losses, model as M, optim, reward, rollout
    from rlmt.logprobs import sequence_logprobs
    out = str(tmp_path / "one")
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--steps", 1, "--micro-batch-tokens", 150,
                   "--micro-batch-size", 8))
    got = metrics(out)[0]
    assert got["n_micro"] == 2  # 4 sequences a packed row, where the reference runs 4 micro-batches of 2 rows

    tok = chat.load_tokenizer(llama_dir)
    policy, ref = M.from_pretrained(llama_dir).train(), M.from_pretrained(llama_dir).eval()
    mine, first = rollout.prompts_for(data.load_prompts(rl_prompts), 0, 2, 0)
    ro = rollout.on_policy(policy, tok, mine, step=0, first=first, seed=0, group_size=4, temperature=0.7,
                           rm=reward.RewardModel(llama_rm_dir, dtype=torch.float32), template="chat",
                           max_prompt_len=64, max_new_tokens=12)
    b, P = ro.batch, ro.prompt_len
    adv, mask = losses.group_advantages(ro.rewards, 4), b["response_mask"]
    kls, ents = [], []
    for s in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):
        x = (b["input_ids"][s], b["attention_mask"][s], b["position_ids"][s], 0.7)
        with torch.no_grad():
            ref_logp, _ = sequence_logprobs(ref, *x, start=P)
        logp, ent = sequence_logprobs(policy, *x, with_entropy=True, start=P)
        m = mask[s]
        pg, _ = losses.policy_loss(logp, logp.detach(), adv[s], m, 0.2, 0.2, 3.0)
        kl = losses.kl(logp, ref_logp, "k3", mask=m)
        losses.aggregate(pg + 0.001 * kl - 0.001 * ent, m, "seq-mean-token-mean", count=8).backward()
        kls.append(losses.masked_mean(kl.detach(), m) * m.sum())
        ents.append(losses.masked_mean(ent.detach(), m) * m.sum())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    norm, _ = optim.step(policy, opt, 1.0)
    assert got["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert got["entropy"] == pytest.approx((sum(ents) / mask.sum()).item(), rel=1e-5)
    assert got["kl"] == pytest.approx((sum(kls) / mask.sum()).item(), abs=1e-6)  # ~0 at step 1: rounding
    init = load_file(os.path.join(llama_dir, "model.safetensors"))
    assert_same_update(init, load_file(os.path.join(out, "latest", "policy", "model.safetensors")),
                       {k: v.detach() for k, v in policy.state_dict().items()})
