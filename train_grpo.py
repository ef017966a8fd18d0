"""RLMT's main recipe: GRPO with a preference reward model scoring only the answer.

    torchrun --nproc_per_node 8 train_grpo.py --model llama-3.1-8b-instruct --strict \
        --reward-model skywork-reward-llama-3.1-8b-v0.2 --data prompts.jsonl --lr 3e-7 --out runs/grpo
    python train_grpo.py --demo          # a tiny model on the CPU, no network, ~2 minutes

One step (Bhaskar, Ye & Chen 2025, §2; GRPO from DeepSeekMath):
  1. P prompts (split across ranks) × G samples each from the current policy at T 0.7;
  2. the reward model scores (user turn, answer) — the thought is never shown to it;
  3. advantages (r − mean) / (std + 1e-6) within each prompt's group;
  4. --mini-batches optimizer steps (paper: 1), each over a share of the prompts: clipped surrogate + k3
     KL to the initial policy − entropy bonus, per-sequence token mean, normalized once per mini-batch. A
     micro-batch is at most --micro-batch-tokens tokens of samples packed end to end (rlmt.batching): no
     padding is computed, and every rank runs as many micro-batches as the busiest one.

With one step per rollout (the paper's setting) the "old" log-probs are the current ones detached and the
ratio is exactly 1; with several, the old log-probs are the trainer's, from a no-grad forward before the
first step, and the clips act. The sampler's log-probs are compared with the trainer's old ones each step
(`mismatch_*` in metrics.jsonl) to catch a temperature or kernel mismatch; --tis-cap corrects the loss for
it (truncated importance sampling, off by default). Precision: the policy's weights, gradients and AdamW
state are fp32, its forward and backward run in --dtype (bf16 on a GPU), the sampler decodes a bf16 copy,
and the reference and reward model are stored in bf16.

Memory (rlmt.memory; `--plan` prints it for any cluster): the policy, the reference and the reward model
are all FSDP2-sharded; each phase frees what it held before the next: the rollout copy and the KV cache
(sized from what the card has left) before scoring, the reward model's and the reference's gathered
weights after their forwards. An 8B run on 8×80 GB peaks at ~72 GiB a GPU while sampling, ~40 training.
"""

import argparse
import os
import sys
import time

import torch

from rlmt import batching, chat, cli, dist, log, loop, losses, model as M, optim, preflight, reward, rollout
from rlmt.logprobs import packed_logprobs

# --- CLI ------------------------------------------------------------------------------------------------

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
cli.add_common_args(p)  # the flags GRPO shares with PPO; GRPO's own follow
p.add_argument("--no-std-scale", action="store_true", help="advantages r - mean without / std (Dr. GRPO)")
args = p.parse_args()

if args.demo:
    from rlmt import demo
    demo.apply_grpo_defaults(args, p)
checkpointing = preflight.memory_check(args, p, "grpo")  # --plan prints and exits; a GPU run that cannot fit stops here
rows, eval_rows, reward_fn, total_steps = preflight.check(args, p)

# --- init -----------------------------------------------------------------------------------------------

rank, world, device = dist.init(timeout=cli.dist_timeout(args))
torch.manual_seed(args.seed)
dtype = cli.torch_dtype(args.dtype, device)
os.makedirs(args.out, exist_ok=True)

# --- models ---------------------------------------------------------------------------------------------

try:
    tokenizer = chat.load_tokenizer(args.model)
    chat.render(tokenizer, rows[0]["messages"], args.template)  # a template/tokenizer mismatch fails here
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
policy, export_dtype = cli.trained_model(args.model, args, device, dtype, checkpointing)  # fp32 masters
ref = None
if args.kl_coef > 0:  # the frozen initial policy, sharded like the reward model (FSDP2 when world > 1)
    ref = dist.shard(M.from_pretrained(args.model, dtype=dtype), device, dtype, train=False).eval()
rm = reward.RewardModel(args.reward_model, device=device, dtype=dtype,  # it reads the whole (prompt, answer)
                        max_len=args.max_prompt_len + args.max_new_tokens) if args.reward_model else None
sampling = dict(rm=rm, reward_fn=reward_fn, seed=args.seed, **cli.rollout_kwargs(args))  # every rollout's

# --- optimizer ------------------------------------------------------------------------------------------

opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
run = loop.Run(args, {"policy": policy}, {"policy": opt}, {"policy": (policy, tokenizer, export_dtype)}, device,
               total_steps, "grpo")  # resumes; logs, saves and stops on SIGTERM at the end of each step
actor = cli.actor_kwargs(args)  # --clip-low ... --entropy-coef, for losses.actor_loss


# --- loop -----------------------------------------------------------------------------------------------

for step in run.steps():
    # rollout: G samples per prompt, answers scored
    mine, first = rollout.prompts_for(rows, step, args.prompts_per_step, args.seed, rank, world)
    ro = rollout.on_policy(policy, tokenizer, mine, step=step, first=first, group_size=args.group_size,
                           temperature=args.temperature, **sampling)
    b = {k: v.to(device) for k, v in ro.batch.items()}
    adv = losses.group_advantages(ro.rewards, args.group_size, scale_by_std=not args.no_std_scale).to(device)

    # train: --mini-batches optimizer steps, each over a share of the prompts (a group stays together) in
    # micro-batches of at most --micro-batch-tokens tokens, each a packed row; each step's loss is normalized
    # by its mini-batch's global count
    t0 = time.perf_counter()
    mask, b["advantages"], G = b["response_mask"], adv, args.group_size
    lengths = b["attention_mask"].sum(1).tolist()
    minis = batching.mini_batches(len(lengths), G, args.mini_batches)  # strided groups, whole
    plans = [batching.micro_batches(lengths, args.micro_batch_tokens, args.micro_batch_size, device, among=idx)
             for idx in minis]
    micro = [[{k: v[group] for k, v in b.items()} for group in plan] for plan in plans]  # []: joins the others
    with torch.no_grad():  # before any update: the reference's log-probs, and with several steps the old ones
        for mbs in micro:
            for mb in mbs:
                if ref is not None:
                    mb["ref_logp"] = packed_logprobs(ref, mb, mb["response_mask"], args.temperature)[0]
                if args.mini_batches > 1:  # one step: the current log-probs detached are the old ones
                    mb["old_logp"] = packed_logprobs(policy, mb, mb["response_mask"], args.temperature)[0]
    for m_ in (ref, policy):  # a no-grad forward leaves each root's full weights gathered: free them
        if m_ is not None:
            dist.reshard(m_)
    stats, grad_norms = [], []
    for idx, mbs in zip(minis, micro):
        count = dist.all_reduce_sum(losses.aggregate_count(mask[idx], args.loss_agg).to(device))
        for mb in mbs:
            m = mb["response_mask"]
            logp, ent = packed_logprobs(policy, mb, m, args.temperature, with_entropy=args.entropy_coef > 0)
            old = mb.get("old_logp", logp.detach())  # one step per rollout: the ratio is exactly 1
            per_token, pm = losses.actor_loss(logp, old, mb["advantages"], m, ref_logprobs=mb.get("ref_logp"),
                                              entropy=ent, sampler_logprobs=mb["sampler_logp"], **actor)
            # normalized by the mini-batch's count; × world undoes FSDP's average over ranks (a sum is due)
            (losses.aggregate(per_token, m, args.loss_agg, count=count) * world).backward()
            if args.mini_batches == 1:  # ρ ≡ 1: the clip fractions and ratios are constants, not logged
                pm = {k: v for k, v in pm.items() if k not in losses.RATIO_METRICS}
            pm.update(losses.mismatch_stats(old, mb["sampler_logp"], m, args.tis_cap or 2.0, args.tis_mode))
            stats.append((pm, m.sum()))
        grad_norm, stepped = optim.step(policy, opt, args.grad_clip)  # skipped when the norm is NaN/inf
        run.skipped.update(stepped, step + 1, grad_norm)
        grad_norms.append(grad_norm)
    t_train = time.perf_counter() - t0

    # log: the micro-batches' means token-weighted over every rank, then one reduction, floats only here
    metrics = log.step_mean(stats)
    metrics.update(rollout.metrics(ro, world), **batching.metrics(lengths, [g for plan in plans for g in plan],
                                                                   t_train, world),
                   grad_norm=torch.stack(grad_norms).mean(), t_train=torch.tensor(t_train),
                   zero_std_frac=losses.zero_std_fraction(ro.rewards, args.group_size),
                   skipped_steps=torch.tensor(float(run.skipped.total)))
    if args.eval_every and eval_rows and (step + 1) % args.eval_every == 0:
        metrics.update(rollout.validate(policy, tokenizer, eval_rows, step=step, rank=rank, world=world, **sampling))
    metrics = log.reduce_metrics(metrics)  # no lr: GRPO's is constant, and it is in the run's args
    run.log(step + 1, metrics, rollout.sample_rows(ro, args.samples_per_step))
    run.end_of_step(step + 1)  # save when due; on SIGTERM (any rank) save this step and exit 0

# --- save -----------------------------------------------------------------------------------------------

run.finish(policy="policy", state="state")
dist.cleanup()
