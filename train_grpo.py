"""RLMT's main recipe: GRPO with a preference reward model scoring only the answer.

    torchrun --nproc_per_node 8 train_grpo.py --model llama-3.1-8b-instruct --template think --strict \
        --reward-model skywork-reward-llama-3.1-8b-v0.2 --data prompts.jsonl --lr 3e-7 --out runs/grpo
    python train_grpo.py --demo          # a tiny model on the CPU, no network, ~2 minutes

One step (Bhaskar, Ye & Chen 2025, §2; GRPO from DeepSeekMath):
  1. P prompts (split across ranks) × G samples each from the current policy at T 0.7;
  2. the reward model scores (user turn, answer) — the thought is never shown to it;
  3. advantages (r − mean) / (std + 1e-6) within each prompt's group;
  4. one optimizer step over micro-batches: clipped surrogate + k3 KL to the initial policy
     − entropy bonus, per-sequence token mean, normalized once for the whole step.

What is simplified, on purpose: one optimizer step per rollout (the paper's setting), so the "old"
log-probs are the current ones detached and the ratio is exactly 1 — clipping is kept for forks that
take several steps per rollout. The sampler's own log-probs are compared with the trainer's each step
(`sampler_logp_diff`) to catch a temperature or kernel mismatch. The reward model is replicated on each
rank (no collectives while scoring); the policy and the reference are sharded with FSDP2.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from rlmt import chat, checkpoint, data, dist, log, losses, model as M, reward, rollout
from rlmt.logprobs import sequence_logprobs

# --- CLI ------------------------------------------------------------------------------------------------

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", help="policy: folder, hub id or alias (e.g. llama-3.1-8b-instruct)")
p.add_argument("--reward-model", help="reward model: folder, hub id or alias (skywork-reward-llama-3.1-8b-v0.2)")
p.add_argument("--reward-fn", help="rule reward module:function or file.py:function, alone or added to the RM")
p.add_argument("--data", help="training prompts, JSONL or JSON ({'messages'} or {'prompt'} rows)")
p.add_argument("--eval-data", help="held-out prompts for greedy validation (default: none)")
p.add_argument("--eval-prompts", type=int, default=250, help="validate on at most this many eval prompts")
p.add_argument("--out", default="runs/grpo", help="output folder: metrics, samples, checkpoints, plot")
p.add_argument("--template", default="think", choices=chat.TEMPLATES, help="prompt template")
p.add_argument("--strict", action="store_true", help="score [NULL] when the thinking format is broken")
p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
p.add_argument("--epochs", type=float, default=1.0, help="passes over the prompts when --steps is unset")
p.add_argument("--prompts-per-step", type=int, default=64, help="prompts per step, all ranks together")
p.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward on one rank")
p.add_argument("--sample-batch-size", type=int, default=64, help="sampler slots (rows decoded together)")
p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (paper: 1e-6; 3e-7 Instruct)")
p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
p.add_argument("--kl-coef", type=float, default=0.001, help="KL-to-reference loss coefficient (0 = no ref)")
p.add_argument("--kl-kind", default="k3", choices=losses.KL_KINDS, help="KL estimator used as loss")
p.add_argument("--entropy-coef", type=float, default=0.001, help="entropy bonus coefficient")
p.add_argument("--clip-low", type=float, default=0.2, help="PPO clip epsilon below 1")
p.add_argument("--clip-high", type=float, default=0.2, help="PPO clip epsilon above 1")
p.add_argument("--dual-clip", type=float, default=3.0, help="dual-clip constant c (> 1)")
p.add_argument("--loss-agg", default="seq-mean-token-mean", choices=losses.AGG_MODES, help="loss aggregation")
p.add_argument("--no-std-scale", action="store_true", help="advantages r - mean without / std (Dr. GRPO)")
p.add_argument("--temperature", type=float, default=0.7, help="sampling and log-prob temperature")
p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 keeps the RL gradient exact)")
p.add_argument("--max-prompt-len", type=int, default=1024, help="prompt tokens kept (left-truncated; Zero: 896)")
p.add_argument("--max-new-tokens", type=int, default=4096, help="response token budget")
p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
               help="parameter dtype (auto: bf16 on GPU, fp32 on CPU)")
p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
p.add_argument("--save-every", type=int, default=50, help="export + training state every N steps (0: end only)")
p.add_argument("--eval-every", type=int, default=25, help="validate every N steps (0: never)")
p.add_argument("--samples-per-step", type=int, default=4, help="rows written to samples.jsonl each step")
p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
p.add_argument("--resume", help="training state folder to resume from (OUT/state)")
p.add_argument("--demo", action="store_true", help="tiny offline CPU demo (builds its own model and data)")
args = p.parse_args()

if args.demo:
    from rlmt import demo
    demo.apply_grpo_defaults(args, p)
for flag in ("model", "data"):
    if not getattr(args, flag):
        p.error(f"--{flag} is required (or use --demo)")
if not args.reward_model and not args.reward_fn:
    p.error("give --reward-model, --reward-fn, or both")

# Batch arithmetic, checked before anything loads (TRL's most reported GRPO error).
world = int(os.environ.get("WORLD_SIZE", 1))
if args.prompts_per_step % world:
    p.error(f"--prompts-per-step {args.prompts_per_step} must be divisible by the number of ranks {world}")
rows_per_rank = args.prompts_per_step // world * args.group_size
if rows_per_rank % args.micro_batch_size:
    p.error(f"each rank trains on {args.prompts_per_step}/{world} prompts x {args.group_size} samples = "
            f"{rows_per_rank} rows, not divisible by --micro-batch-size {args.micro_batch_size}; "
            f"use a micro-batch size that divides {rows_per_rank}")
try:
    rows = data.load_prompts(args.data)
    eval_rows = data.load_prompts(args.eval_data)[:args.eval_prompts] if args.eval_data else []
    reward_fn = reward.load_reward_fn(args.reward_fn) if args.reward_fn else None
except (ValueError, FileNotFoundError, ImportError, AttributeError) as e:
    sys.exit(f"error: {e}")
if args.resume and not os.path.exists(os.path.join(args.resume, "trainer_state.json")):
    sys.exit(f"error: --resume {args.resume}: no trainer_state.json; not a training state folder "
             f"(resume from <out>/state)")
if args.temperature <= 0:
    p.error("--temperature must be > 0 for training (log-probs are computed at it); greedy is for eval")
if len(rows) < args.prompts_per_step:
    sys.exit(f"error: {args.data} has {len(rows)} prompts, fewer than --prompts-per-step {args.prompts_per_step}")
steps_per_epoch = len(rows) // args.prompts_per_step
total_steps = args.steps or max(1, int(args.epochs * steps_per_epoch))

# --- init -----------------------------------------------------------------------------------------------

rank, world, device = dist.init()
torch.manual_seed(args.seed)
dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
         "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
os.makedirs(args.out, exist_ok=True)

# --- models ---------------------------------------------------------------------------------------------

try:
    tokenizer = chat.load_tokenizer(args.model)
    chat.render(tokenizer, rows[0]["messages"], args.template)  # a template/tokenizer mismatch fails here
    policy = M.from_pretrained(args.model, dtype=dtype)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
policy.gradient_checkpointing = args.activation_checkpointing
policy = dist.shard(policy, device).train()
ref = None
if args.kl_coef > 0:  # the frozen initial policy
    ref = dist.shard(M.from_pretrained(args.model, dtype=dtype).requires_grad_(False), device).eval()
rm = reward.RewardModel(args.reward_model, device=device, dtype=dtype) if args.reward_model else None

# --- optimizer ------------------------------------------------------------------------------------------

opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
start = 0
if args.resume:
    start = checkpoint.load_state(args.resume, {"policy": policy}, {"policy": opt})["step"]
    if dist.is_main():
        log.truncate_after(args.out, start)
        print(f"resumed from {args.resume} at step {start}")
tb = log.tensorboard(args.out) if dist.is_main() else None


def prompts_for(step):
    """This rank's prompts at `step`: epoch-wise shuffles of the data, a slice per step, one per rank.
    The position is a function of the step, so resuming needs nothing but the step."""
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.RandomState(args.seed + epoch).permutation(len(rows))
    chunk = order[i * args.prompts_per_step:(i + 1) * args.prompts_per_step]
    share = args.prompts_per_step // world
    return [rows[j] for j in chunk[rank * share:(rank + 1) * share]]


def sample(rows_, step, first, **kw):
    """Roll out `rows_`, whose first row is prompt number `first` of the step across all ranks. Each
    prompt's random stream is keyed by (seed, step, that number), so 1 rank and N ranks draw alike."""
    seeds = [(args.seed << 40) + (step << 20) + first + i for i in range(len(rows_))]
    with dist.unsharded(policy), torch.no_grad():
        policy.eval()
        ro = rollout.rollout(policy, tokenizer, rows_, template=args.template, rm=rm, reward_fn=reward_fn,
                             max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                             top_p=args.top_p, strict=args.strict, batch_size=args.sample_batch_size,
                             seed=seeds, **kw)
        policy.train()
    return ro


def validate(step):
    share = math.ceil(len(eval_rows) / world)
    mine = eval_rows[rank * share:(rank + 1) * share] or eval_rows[:1]  # every rank joins the reduction
    ro = sample(mine, step, rank * share, group_size=1, temperature=0.0)
    return {"val_reward_mean": ro["rewards"].mean(), "val_format_rate": ro["format_ok"].float().mean(),
            "val_response_len": ro["response_len"].mean()}


def save(step):
    checkpoint.export(policy, os.path.join(args.out, "policy"), tokenizer)
    checkpoint.save_state(os.path.join(args.out, "state"), {"policy": policy}, {"policy": opt},
                          {"step": step, "args": vars(args)})


# --- loop -----------------------------------------------------------------------------------------------

bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=not dist.is_main(),
           desc="grpo", dynamic_ncols=True)
for step in bar:
    # rollout: G samples per prompt, answers scored
    ro = sample(prompts_for(step), step, rank * (args.prompts_per_step // world), group_size=args.group_size,
                temperature=args.temperature)
    b = {k: v.to(device) for k, v in ro["batch"].items() if torch.is_tensor(v)}
    adv = losses.group_advantages(ro["rewards"], args.group_size, scale_by_std=not args.no_std_scale).to(device)

    # train: one optimizer step over micro-batches, normalized by the step's global count
    t0 = time.perf_counter()
    mask = b["response_mask"]
    count = dist.all_reduce_sum(losses.aggregate_count(mask, args.loss_agg).to(device))
    stats = []
    for s in range(0, mask.shape[0], args.micro_batch_size):
        mb = {k: v[s:s + args.micro_batch_size] for k, v in b.items()}
        m = mb["response_mask"]
        ids, am, pos = mb["input_ids"], mb["attention_mask"], mb["position_ids"]
        if ref is not None:
            with torch.no_grad():
                ref_logp, _ = sequence_logprobs(ref, ids, am, pos, args.temperature)
        logp, ent = sequence_logprobs(policy, ids, am, pos, args.temperature,
                                      with_entropy=args.entropy_coef > 0)
        pg, pm = losses.policy_loss(logp, logp.detach(), adv[s:s + args.micro_batch_size], m,
                                    args.clip_low, args.clip_high, args.dual_clip)
        per_token = pg
        if ref is not None:
            kl = losses.kl(logp, ref_logp, args.kl_kind, mask=m)
            per_token = per_token + args.kl_coef * kl
            pm["kl"] = losses.masked_mean(kl.detach(), m)
        if ent is not None:
            per_token = per_token - args.entropy_coef * ent
            pm["entropy"] = losses.masked_mean(ent.detach(), m)
        # normalized by the whole step's count; × world undoes FSDP's average over ranks (a sum is due)
        (losses.aggregate(per_token, m, args.loss_agg, count=count) * world).backward()
        pm["sampler_logp_diff"] = losses.masked_mean((logp.detach() - mb["old_logprobs"]).abs(), m)
        stats.append(pm)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t_train = time.perf_counter() - t0

    # log: one reduction over ranks, floats only here
    n_tok = ro["response_len"].sum()
    metrics = {k: torch.stack([s_[k] for s_ in stats]).mean() for k in stats[0]}
    metrics.update(reward_mean=ro["rewards"].mean(), reward_std=ro["rewards"].std(),
                   format_rate=ro["format_ok"].float().mean(), response_len=ro["response_len"].mean(),
                   thought_len=ro["thought_len"].mean(),
                   length_frac=torch.tensor(sum(f == "length" for f in ro["finish"]) / len(ro["finish"])),
                   zero_std_frac=losses.zero_std_fraction(ro["rewards"], args.group_size),
                   grad_norm=grad_norm, tokens_per_s=n_tok / max(ro["t_sample"], 1e-9),
                   t_sample=torch.tensor(ro["t_sample"]), t_reward=torch.tensor(ro["t_reward"]),
                   t_train=torch.tensor(t_train))
    if args.eval_every and eval_rows and (step + 1) % args.eval_every == 0:
        metrics.update(validate(step))
    metrics = log.reduce_metrics(metrics)
    metrics["lr"] = args.lr
    metrics["tokens_per_s"] *= world  # the mean over ranks of per-rank throughput, times ranks
    if dist.is_main():
        log.log_step(args.out, step + 1, metrics, rollout.sample_rows(ro, args.samples_per_step), tb)
        bar.set_postfix(log.progress_postfix(metrics))

    # save
    if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total_steps:
        save(step + 1)

# --- save -----------------------------------------------------------------------------------------------

if dist.is_main():
    plot = log.plot_rewards(args.out)
    print(f"metrics: {os.path.join(args.out, 'metrics.jsonl')}\nsamples: {os.path.join(args.out, 'samples.jsonl')}"
          f"\npolicy:  {os.path.join(args.out, 'policy')}\nstate:   {os.path.join(args.out, 'state')}"
          + (f"\nplot:    {plot}" if plot else ""))
dist.cleanup()
