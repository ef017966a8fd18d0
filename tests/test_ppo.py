"""train_ppo.py end to end on tiny checkpoints: 2 ranks == 1 process, resumes exactly, the paper's settings
are on-policy, bad flags get clear messages, and the demo learns (reward up, critic's explained variance > 0).
GAE, last-token rewards, whitening and the value loss are tested against hand arithmetic in test_losses.py."""

import json
import os

import pytest
import torch

from conftest import assert_metrics_close, assert_same_update, run_script


def run(*args, **kw):
    return run_script("train_ppo.py", *args, **kw)


def tiny_args(model, rm, data, out, *extra):
    return ["--model", model, "--reward-model", rm, "--data", data, "--out", out, "--prompts-per-step", 4,
            "--micro-batch-size", 1, "--max-new-tokens", 12, "--max-prompt-len", 64, "--lr", 1e-3,
            "--critic-lr", 1e-3, "--save-every", 0, "--eval-every", 0, "--template", "chat", *extra]


# Every PPO path at once: two epochs over each rollout in two mini-batches (so the ratio and the value
# clip move off 1 and 0), k1 in the reward and a k3 loss term (so the reference model is used).
FULL = ("--ppo-epochs", 2, "--mini-batches", 2, "--kl-in-reward", 0.05, "--kl-coef", 0.01)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out, name=None):
    """The export `name` of run OUT's latest checkpoint; without a name, the HF folder OUT itself."""
    from safetensors.torch import load_file
    return load_file(os.path.join(out, *(("latest", name) if name else ()), "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one(llama_dir, llama_rm_dir, rl_prompts, tmp_path_factory):
    """Two steps of the FULL configuration in one process: the reference for the next two tests."""
    out = str(tmp_path_factory.mktemp("ppo-one") / "run")
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--steps", 2, *FULL))
    return out


def test_fsdp_two_ranks_equal_one_process(one, llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) == one process after two steps. Sampling is keyed by the
    global sample index, whitening and explained variance use all-reduced sums, mini-batches are strided
    so that they hold the same samples, and every loss is normalized by the global count."""
    two = str(tmp_path / "two")
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, two, "--steps", 2, *FULL), nproc=2)
    a, b = metrics(one), metrics(two)
    assert [m["step"] for m in b] == [1, 2]
    # 2 ranks: another fp32 reduction order
    assert_metrics_close(a, b, ("reward_mean", "response_len", "value_loss", "grad_norm", "critic_grad_norm"), rel=1e-5)
    # 1 - Var[R - V] / Var[R] from all-reduced sums of squares: the cancellation multiplies their rounding
    # (measured 6e-6 here); per-rank statistics would be off by 1e-1 or more
    assert_metrics_close(a, b, ("explained_variance",), rel=1e-5, floor=1e-4)
    init = weights(llama_dir)  # the critic starts from the policy's trunk and a fresh head
    assert_same_update(init, weights(one, "policy"), weights(two, "policy"))
    assert_same_update(init, weights(one, "critic"), weights(two, "critic"))


def test_resume_equals_uninterrupted(one, llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    part = str(tmp_path / "part")
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, part, "--steps", 1, *FULL))
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, part, "--steps", 2, *FULL,
                   "--resume", part))
    a, b = metrics(one), metrics(part)
    assert [m["step"] for m in b] == [1, 2]
    # resume replays the same computations (same shapes, same order): bit for bit on any one CPU
    assert_metrics_close(a, b, ("reward_mean", "kl", "entropy", "value_loss", "value_mean", "adv_mean",
                                "explained_variance", "grad_norm", "critic_grad_norm", "clip_frac",
                                "value_clip_frac"), rel=1e-6)
    assert max_diff(weights(one, "policy"), weights(part, "policy")) < 1e-6
    assert max_diff(weights(one, "critic"), weights(part, "critic")) < 1e-6


def test_paper_settings_are_on_policy_and_export(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    """One update per rollout, no KL (no reference model): the ratio is exactly 1 and neither the policy
    clip nor the value clip is active. The critic starts from the reward model here (same tokenizer); the
    exported critic is a sequence classifier that transformers loads."""
    out = str(tmp_path / "paper")
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--steps", 1, "--critic-init", "reward"))
    m = metrics(out)[0]
    for key in ("reward_mean", "format_rate", "response_len", "entropy", "clip_frac", "grad_norm",
                "value_loss", "value_clip_frac", "explained_variance", "value_mean", "adv_mean", "critic_grad_norm",
                "tokens_per_s", "t_sample", "t_reward", "t_train"):
        assert key in m, key
    assert "kl" not in m  # the paper's PPO has no KL, and loads no reference
    assert m["ratio_mean"] == 1.0 and m["clip_frac"] == 0.0 and m["value_clip_frac"] == 0.0
    assert m["mismatch_logp_diff_mean"] < 1e-4  # the sampler and the trainer agree on the log-probs
    assert "critic:" in r.stdout
    import transformers
    critic = transformers.AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "latest", "critic"))
    assert critic.config.num_labels == 1
    rm = weights(llama_rm_dir)
    trained = weights(out, "critic")
    assert rm.keys() == trained.keys() and not torch.equal(rm["score.weight"], trained["score.weight"])


def test_bad_flags_get_clear_messages(llama_dir, llama_rm_dir, qwen_rm_dir, rl_prompts, tmp_path):
    out = str(tmp_path / "bad")
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--mini-batches", 3), check=False)
    assert r.returncode != 0 and "= 4 prompts, not divisible by --mini-batches 3" in r.stderr
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--ppo-epochs", 0), check=False)
    assert r.returncode != 0 and "--ppo-epochs must be at least 1" in r.stderr
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--mini-batches", 0), check=False)
    assert r.returncode != 0 and "--mini-batches" in r.stderr and "Traceback" not in r.stderr
    r = run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--tis-cap", 0.5), check=False)
    assert r.returncode != 0 and "--tis-cap must be at least 1" in r.stderr
    r = run("--model", llama_dir, "--reward-fn", "rlmt.demo:reward", "--data", rl_prompts, "--critic-init", "reward",
            check=False)
    assert r.returncode != 0 and "--critic-init reward needs --reward-model" in r.stderr
    r = run(*tiny_args(llama_dir, qwen_rm_dir, rl_prompts, out, "--critic-init", "reward"), check=False)
    assert r.returncode != 0 and "has another tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_demo_learns_and_the_critic_explains_variance(tmp_path):
    """`python train_ppo.py --demo`, shortened: reward up; the critic's explained variance from ~0 to > 0."""
    out = str(tmp_path / "demo")
    run("--demo", "--out", out, "--steps", 10, "--eval-every", 0)
    rows = metrics(out)
    first, last = rows[0]["reward_mean"], sum(m["reward_mean"] for m in rows[-3:]) / 3
    assert last > first + 0.2, (first, last)
    assert rows[0]["explained_variance"] < 0.05 < rows[-1]["explained_variance"], \
        [m["explained_variance"] for m in rows]


def test_one_step_equals_the_padded_path(llama_dir, llama_rm_dir, rl_prompts, tmp_path):
    """One step of train_ppo.py in 2 mini-batches, each one packed micro-batch of its 2 samples, against the
    padded path as the loop ran before packing, written out here: the same rollout, old log-probs and
    values on the left/right-padded batch, GAE, whitening, then per mini-batch one row a micro-batch
    (sequence_logprobs, sequence_values), clipped surrogate − entropy and the clipped value loss, one AdamW
    step per model. Gradient norms (Adam's first step only sees each gradient's sign, the norm sees its
    size), the value loss and both models' updates agree."""
    from rlmt import chat, data, losses, model as M, optim, reward, rollout
    from rlmt.logprobs import sequence_logprobs, sequence_values
    out = str(tmp_path / "one")
    run(*tiny_args(llama_dir, llama_rm_dir, rl_prompts, out, "--steps", 1, "--mini-batches", 2,
                   "--micro-batch-tokens", 100, "--micro-batch-size", 4))
    got = metrics(out)[0]
    assert got["n_micro"] == 2

    torch.manual_seed(0)  # the value head's init, as the script draws it
    tok = chat.load_tokenizer(llama_dir)
    policy, critic = M.from_pretrained(llama_dir).train(), M.from_pretrained(llama_dir, head="score").train()
    mine, first = rollout.prompts_for(data.load_prompts(rl_prompts), 0, 4, 0)
    ro = rollout.on_policy(policy, tok, mine, step=0, first=first, seed=0, group_size=1, temperature=0.7,
                           rm=reward.RewardModel(llama_rm_dir, dtype=torch.float32), template="chat",
                           max_prompt_len=64, max_new_tokens=12)
    b, P = ro.batch, ro.prompt_len
    x, mask = (b["input_ids"], b["attention_mask"], b["position_ids"]), b["response_mask"]
    with torch.no_grad():
        old_logp, old_values = sequence_logprobs(policy, *x, 0.7, start=P)[0], sequence_values(critic, *x)
    adv, returns = losses.gae(losses.last_token_rewards(ro.rewards, mask), old_values, mask)
    adv = losses.masked_whiten(adv, mask)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01) for m in (policy, critic)]
    norms, value_loss = [], 0.0
    for idx in ([0, 2], [1, 3]):
        counts = losses.aggregate_count(mask[idx], "seq-mean-token-mean"), mask[idx].sum()
        for i in idx:
            xi, m = [t[i:i + 1] for t in x], mask[i:i + 1]
            logp, ent = sequence_logprobs(policy, *xi, 0.7, with_entropy=True, start=P)
            pg, _ = losses.policy_loss(logp, old_logp[i:i + 1], adv[i:i + 1], m, 0.2, 0.2, 3.0)
            vl, _ = losses.value_loss(sequence_values(critic, *xi), old_values[i:i + 1], returns[i:i + 1], m, 0.5)
            critic_loss = losses.aggregate(vl, m, "token-mean", count=counts[1])
            (losses.aggregate(pg - 0.001 * ent, m, "seq-mean-token-mean", count=counts[0]) + critic_loss).backward()
            value_loss += critic_loss.item() / 2
        norms.append([optim.step(model, opt, 1.0)[0].item() for model, opt in zip((policy, critic), opts)])
    assert got["grad_norm"] == pytest.approx(sum(n[0] for n in norms) / 2, rel=1e-5)
    assert got["critic_grad_norm"] == pytest.approx(sum(n[1] for n in norms) / 2, rel=1e-5)
    assert got["value_loss"] == pytest.approx(value_loss, rel=1e-5)
    init = weights(llama_dir)
    for name, model in (("policy", policy), ("critic", critic)):
        assert_same_update(init, weights(out, name), {k: v.detach() for k, v in model.state_dict().items()})
