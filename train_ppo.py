"""PPO with a learned critic and GAE: RLMT's second online algorithm, the same reward model and prompts.

    torchrun --nproc_per_node 8 train_ppo.py --model llama-3.1-8b-instruct --strict \
        --reward-model skywork-reward-llama-3.1-8b-v0.2 --data prompts.jsonl --lr 3e-7 --out runs/ppo
    python train_ppo.py --demo           # a tiny model on the CPU, no network, ~2 minutes

One step (Bhaskar, Ye & Chen 2025, §2; PPO: Schulman et al. 2017; GAE: Schulman et al. 2016):
  1. P prompts (split across ranks) × 1 sample each from the current policy at T 0.7; the reward model
     scores (user turn, answer), the thought is never shown to it;
  2. before any update, with no grad: the policy's log-probs and the critic's values of every response
     token (the "old" ones the whole rollout is trained against), and the reference's log-probs when a
     KL is asked for;
  3. per-token reward = the score on the last response token (− β·k1 to the reference on every token
     with --kl-in-reward β); GAE with γ = λ = 1 over response tokens, bootstrap 0 after the last one;
     returns = advantages + old values; advantages whitened over the whole batch (all ranks, masked);
  4. --ppo-epochs passes over the rollout, each in --mini-batches: per mini-batch one actor step (clipped
     surrogate − entropy bonus [+ KL loss]) and one critic step (value loss clipped around the old
     values, token mean), each model with its own AdamW. A mini-batch runs in micro-batches of at most
     --micro-batch-tokens tokens, samples packed end to end (rlmt.batching), the same ones in step 2.

What differs from train_grpo.py, on purpose: one sample per prompt, with a critic instead of the group as
the baseline, so advantages are per token; old log-probs and values are stored before the first update
because --ppo-epochs / --mini-batches may take several steps per rollout (with the paper's one step the
ratio is exactly 1, at the cost of one extra policy forward); the reference model is loaded only when a KL
is asked for (the paper's PPO has none). Flags, the prompt schedule, seeded sampling, validation, logging
and checkpoints are shared with GRPO through rlmt/ (cli, rollout, log, checkpoint).
"""

import argparse
import os
import sys
import time

import torch

from rlmt import batching, chat, cli, dist, log, loop, losses, model as M, optim, preflight, reward, rollout
from rlmt.logprobs import packed_logprobs, packed_values

# --- CLI ------------------------------------------------------------------------------------------------

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
cli.add_common_args(p)  # the flags PPO shares with GRPO; where the paper's PPO differs, its defaults:
p.set_defaults(out="runs/ppo", group_size=1, kl_coef=0.0)
p.add_argument("--critic-init", default="policy", choices=["policy", "reward"],
               help="critic trunk from the policy with a fresh value head (the paper's) or from the reward model")
p.add_argument("--critic-lr", type=float, default=1e-5, help="critic AdamW learning rate (paper: 1e-5)")
p.add_argument("--value-clip", type=float, default=0.5, help="keep new values within old ± this in the loss (0: off)")
p.add_argument("--gamma", type=float, default=1.0, help="GAE discount γ (paper: 1)")
p.add_argument("--lam", type=float, default=1.0, help="GAE λ (paper: 1)")
p.add_argument("--kl-in-reward", type=float, default=0.0,
               help="per-token k1 KL-to-reference penalty in the reward, this coefficient (classic RLHF; 0: off)")
p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout (paper: 1)")
args = p.parse_args()

if args.demo:
    from rlmt import demo
    demo.apply_ppo_defaults(args, p)
checkpointing = preflight.memory_check(args, p, "ppo")  # --plan prints and exits; a GPU run that cannot fit stops here
if args.ppo_epochs < 1:
    p.error("--ppo-epochs must be at least 1")
if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
    p.error(f"--gamma {args.gamma} and --lam {args.lam} must lie in [0, 1]")
if args.value_clip < 0 or args.kl_in_reward < 0 or args.kl_coef < 0:
    p.error("--value-clip, --kl-in-reward and --kl-coef must be >= 0")
if args.critic_init == "reward" and not args.reward_model:
    p.error("--critic-init reward needs --reward-model (the critic starts from its weights)")
rows, eval_rows, reward_fn, total_steps = preflight.check(args, p)

# --- init -----------------------------------------------------------------------------------------------

rank, world, device = dist.init(timeout=cli.dist_timeout(args))
torch.manual_seed(args.seed)  # also the value head's init: the same on every rank
dtype = cli.torch_dtype(args.dtype, device)
os.makedirs(args.out, exist_ok=True)

# --- models ---------------------------------------------------------------------------------------------

try:
    tokenizer = chat.load_tokenizer(args.model)
    chat.render(tokenizer, rows[0]["messages"], args.template)  # a template/tokenizer mismatch fails here
    if args.critic_init == "reward" and chat.load_tokenizer(args.reward_model).get_vocab() != tokenizer.get_vocab():
        sys.exit(f"error: --critic-init reward: {args.reward_model} has another tokenizer than {args.model}, "
                 "so a critic built from it cannot read the policy's tokens; use --critic-init policy")
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
policy, export_dtype = cli.trained_model(args.model, args, device, dtype, checkpointing)  # fp32 masters
# The critic: a trunk and a scalar head read at every position (a fresh head on the policy's trunk).
critic, _ = cli.trained_model(args.model if args.critic_init == "policy" else args.reward_model, args, device, dtype,
                              checkpointing, head="score")
ref = None
if args.kl_coef > 0 or args.kl_in_reward > 0:  # the frozen initial policy, only when a KL is asked for
    ref = dist.shard(M.from_pretrained(args.model, dtype=dtype), device, dtype, train=False).eval()
rm = reward.RewardModel(args.reward_model, device=device, dtype=dtype,  # it reads the whole (prompt, answer)
                        max_len=args.max_prompt_len + args.max_new_tokens) if args.reward_model else None
sampling = dict(rm=rm, reward_fn=reward_fn, seed=args.seed, **cli.rollout_kwargs(args))  # every rollout's

# --- optimizer ------------------------------------------------------------------------------------------

opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.999),
                               weight_decay=args.weight_decay)
models, optimizers = {"policy": policy, "critic": critic}, {"policy": opt, "critic": critic_opt}
run = loop.Run(args, models, optimizers, {"policy": (policy, tokenizer, export_dtype),
                                          "critic": (critic, tokenizer, export_dtype)},  # it reads the policy's tokens
               device, total_steps, "ppo")  # resumes; logs, saves and stops on SIGTERM at the end of each step
actor = cli.actor_kwargs(args)  # --clip-low ... --entropy-coef, for losses.actor_loss


# --- loop -----------------------------------------------------------------------------------------------

for step in run.steps():
    # rollout: one sample per prompt (--group-size), answers scored
    mine, first = rollout.prompts_for(rows, step, args.prompts_per_step, args.seed, rank, world)
    ro = rollout.on_policy(policy, tokenizer, mine, step=step, first=first, group_size=args.group_size,
                           temperature=args.temperature, **sampling)
    b = {k: v.to(device) for k, v in ro.batch.items()}
    mask, n = b["response_mask"], b["response_mask"].shape[0]
    # Strided mini-batches: mini-batch k holds the same samples whatever the number of ranks (a rank's rows
    # are a contiguous slice of the step's, and each rank's row count is a multiple of --mini-batches).
    # Each is cut into micro-batches by tokens, as many on every rank, the same ones in every pass below.
    t0 = time.perf_counter()
    lengths = b["attention_mask"].sum(1).tolist()
    minis = batching.mini_batches(n, 1, args.mini_batches)
    plans = [batching.micro_batches(lengths, args.micro_batch_tokens, args.micro_batch_size, device, among=idx)
             for idx in minis]

    # before any update, no grad: the log-probs and values every epoch and mini-batch is trained against
    old = {key: torch.zeros(mask.shape, device=device) for key in ("old_logp", "old_values", "ref_logp")}
    with torch.no_grad():
        for group in (g for plan in plans for g in plan):  # []: a pass that joins the busier ranks'
            mb = {key: v[group] for key, v in b.items()}
            old["old_logp"][group] = packed_logprobs(policy, mb, mb["response_mask"], args.temperature)[0]
            old["old_values"][group] = packed_values(critic, mb, mb["response_mask"])
            if ref is not None:
                old["ref_logp"][group] = packed_logprobs(ref, mb, mb["response_mask"], args.temperature)[0]
    for m in (policy, critic, ref):  # after a no-grad forward FSDP2 keeps each root's full weights: free them
        if m is not None:
            dist.reshard(m)
    b.update(old)

    # advantages: the score on the last response token (minus β·k1 per token), GAE, whitened over all ranks
    rewards = losses.last_token_rewards(ro.rewards.to(device), mask)
    if args.kl_in_reward > 0:
        rewards = rewards - args.kl_in_reward * losses.kl(b["old_logp"], b["ref_logp"], "k1", mask=mask)
    adv, b["returns"] = losses.gae(rewards, b["old_values"], mask, args.gamma, args.lam)
    b["advantages"] = losses.masked_whiten(adv, mask, all_reduce=dist.all_reduce_sum)

    # train: per mini-batch one actor and one critic step, each loss normalized by the mini-batch's global count
    stats, grad_norms, critic_grad_norms, value_loss = [], [], [], 0.0
    for _ in range(args.ppo_epochs):
        for idx, plan in zip(minis, plans):
            counts = dist.all_reduce_sum(torch.stack([losses.aggregate_count(mask[idx], args.loss_agg).float(),
                                                      mask[idx].sum().float()]))
            for group in plan:
                mb = {key: t[group] for key, t in b.items()}
                m = mb["response_mask"]
                logp, ent = packed_logprobs(policy, mb, m, args.temperature, with_entropy=args.entropy_coef > 0)
                per_token, pm = losses.actor_loss(logp, mb["old_logp"], mb["advantages"], m,
                                                  ref_logprobs=mb["ref_logp"] if ref is not None else None,
                                                  entropy=ent, sampler_logprobs=mb["sampler_logp"], **actor)
                values = packed_values(critic, mb, m)
                vl, vm = losses.value_loss(values, mb["old_values"], mb["returns"], m, args.value_clip or None)
                actor_loss = losses.aggregate(per_token, m, args.loss_agg, count=counts[0])
                critic_loss = losses.aggregate(vl, m, "token-mean", count=counts[1])
                # × world undoes FSDP's average over ranks (the global count already normalizes). The two
                # losses share no parameter, so one backward fills both models' gradients.
                ((actor_loss + critic_loss) * world).backward()
                value_loss += critic_loss.detach() * world  # summed over micro-batches and ranks: the mean
                pm["value_clip_frac"] = vm["clip_frac"]
                stats.append((pm, m.sum()))
            # each model skips its step when its gradient norm is NaN/inf; the run counts either as skipped
            norm, stepped = optim.step(policy, opt, args.grad_clip)
            critic_norm, critic_stepped = optim.step(critic, critic_opt, args.grad_clip)
            run.skipped.update(stepped and critic_stepped, step + 1, norm if not stepped else critic_norm)
            grad_norms.append(norm)
            critic_grad_norms.append(critic_norm)
    t_train = time.perf_counter() - t0

    # log: the micro-batches' means token-weighted over every rank, then one reduction, floats only here
    metrics = log.step_mean(stats)
    metrics.update(rollout.metrics(ro, world), **batching.metrics(lengths, [r for plan in plans for r in plan],
                                                                   t_train, world),
                   grad_norm=torch.stack(grad_norms).mean(),
                   critic_grad_norm=torch.stack(critic_grad_norms).mean(),
                   value_loss=value_loss / len(grad_norms), value_mean=losses.masked_mean(b["old_values"], mask),
                   explained_variance=losses.explained_variance(b["old_values"], b["returns"], mask,
                                                                all_reduce=dist.all_reduce_sum),
                   adv_mean=losses.masked_mean(adv, mask),  # before whitening: > 0 when the critic underrates
                   **losses.mismatch_stats(b["old_logp"], b["sampler_logp"], mask, args.tis_cap or 2.0, args.tis_mode),
                   t_train=torch.tensor(t_train), skipped_steps=torch.tensor(float(run.skipped.total)))
    if ref is not None:
        metrics["kl"] = losses.masked_mean(losses.kl(b["old_logp"], b["ref_logp"], args.kl_kind, mask=mask), mask)
    if args.eval_every and eval_rows and (step + 1) % args.eval_every == 0:
        metrics.update(rollout.validate(policy, tokenizer, eval_rows, step=step, rank=rank, world=world, **sampling))
    metrics = log.reduce_metrics(metrics)  # no lr: PPO's are constant, and they are in the run's args
    run.log(step + 1, metrics, rollout.sample_rows(ro, args.samples_per_step))
    run.end_of_step(step + 1)  # save when due; on SIGTERM (any rank) save this step and exit 0

# --- save -----------------------------------------------------------------------------------------------

run.finish(policy="policy", critic="critic", state="state")
dist.cleanup()
