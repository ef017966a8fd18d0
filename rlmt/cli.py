"""The flags that the online trainers (train_grpo.py, train_ppo.py) share, and the checks that run before
any model loads.

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)                        # --model --reward-model --data --out --steps --lr ...
    p.set_defaults(out="runs/ppo", group_size=1)  # where a script's defaults differ (PPO: one sample)
    p.add_argument("--critic-lr", ...)            # the script's own flags
    args = p.parse_args()
    rows, eval_rows, reward_fn, total_steps = cli.check(args, p)   # or one clear error, then exit

A flag lives here only if it means the same thing in every script that has it.
"""

import argparse
import os
import sys

import torch

from rlmt import chat, data, losses, reward
from rlmt.model import checkpoint_dtype


def add_common_args(p):
    """Add the shared flags to an argparse parser (defaults are GRPO's; override with p.set_defaults)."""
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
    p.add_argument("--lr", type=float, default=1e-6, help="policy AdamW learning rate (paper: 1e-6; 3e-7 Instruct)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--kl-coef", type=float, default=0.001, help="KL-to-reference loss coefficient (0 = no KL loss)")
    p.add_argument("--kl-kind", default="k3", choices=losses.KL_KINDS, help="KL estimator used as loss")
    p.add_argument("--entropy-coef", type=float, default=0.001, help="entropy bonus coefficient")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO clip epsilon below 1")
    p.add_argument("--clip-high", type=float, default=0.2, help="PPO clip epsilon above 1")
    p.add_argument("--dual-clip", type=float, default=3.0, help="dual-clip constant c (> 1)")
    p.add_argument("--loss-agg", default="seq-mean-token-mean", choices=losses.AGG_MODES, help="loss aggregation")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling and log-prob temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 keeps the RL gradient exact)")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="prompt tokens kept (left-truncated; Zero: 896)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="response token budget")
    add_precision_args(p)
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--save-every", type=int, default=50, help="export + training state every N steps (0: end only)")
    p.add_argument("--eval-every", type=int, default=25, help="validate every N steps (0: never)")
    p.add_argument("--samples-per-step", type=int, default=4, help="rows written to samples.jsonl each step")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    p.add_argument("--resume", help="training state folder to resume from (OUT/state)")
    p.add_argument("--demo", action="store_true", help="tiny offline CPU demo (builds its own model and data)")


def _positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_precision_args(p):
    """The precision flags of every trainer (GRPO, PPO, SFT, DPO)."""
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype of forward and backward (auto: bf16 on a GPU, fp32 on the CPU). Whatever "
                        "it is, what is trained (policy, critic) is stored in fp32 with fp32 gradients and AdamW "
                        "state; frozen models (reference, reward model) are stored in it, and the sampler decodes "
                        "a copy of the policy in it")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype of the exported HF folders (auto: the starting checkpoint's, bf16 for the paper's "
                        "models); the resumable state keeps the fp32 masters")
    p.add_argument("--max-skipped-steps", type=_positive_int, default=5,
                   help="optimizer steps are skipped when the gradient norm is NaN/inf; stop after this many in a row")


def check(args, p, mini_batches=1):
    """Check the flags and read the data files before any model loads; exit with one clear message.

    mini_batches: optimizer steps per rollout epoch (PPO's --mini-batches; GRPO takes one), each on a
    1/mini_batches share of every rank's rows. Returns (rows, eval_rows, reward_fn, total_steps)."""
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
    rows_msg = f"each rank trains on {args.prompts_per_step}/{world} prompts x {args.group_size} samples = " \
               f"{rows_per_rank} rows"
    if rows_per_rank % mini_batches:
        p.error(f"{rows_msg}, not divisible by --mini-batches {mini_batches}")
    per_mini_batch = rows_per_rank // mini_batches
    if per_mini_batch % args.micro_batch_size:
        split = f" in {mini_batches} mini-batches of {per_mini_batch}" if mini_batches > 1 else ""
        p.error(f"{rows_msg}{split}, not divisible by --micro-batch-size {args.micro_batch_size}; "
                f"use a micro-batch size that divides {per_mini_batch}")
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
    total_steps = args.steps or max(1, int(args.epochs * (len(rows) // args.prompts_per_step)))
    return rows, eval_rows, reward_fn, total_steps


def rollout_kwargs(args):
    """The flags every rollout of a run shares (training and validation), as rollout.rollout() kwargs."""
    return dict(template=args.template, max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                top_p=args.top_p, strict=args.strict, batch_size=args.sample_batch_size)


def torch_dtype(name, device):
    """--dtype -> the compute dtype: auto is bf16 on GPUs and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def save_dtype(args, model):
    """--save-dtype -> the exports' dtype: auto is what `model`'s checkpoint was saved in."""
    return checkpoint_dtype(model) if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
