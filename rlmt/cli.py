"""The flags the trainers share, declared once, and the flags turned into what the library takes.

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)                        # GRPO and PPO: --model --reward-model --data --lr ...
    p.set_defaults(out="runs/ppo", group_size=1)  # where a script's defaults differ (PPO: one sample)
    p.add_argument("--critic-lr", ...)            # the script's own flags
    args = p.parse_args()                         # then rlmt.preflight checks them

add_run_args: every trainer; add_offline_args: SFT and DPO; add_sampling_args: GRPO, PPO and DPO's pair
building. A flag lives here only if it means the same thing in every script that has it.
"""

import argparse
import datetime
import sys

import torch

from rlmt import chat, dist, losses
from rlmt.model import checkpoint_dtype, from_pretrained


def add_run_args(p, unit="sequences", data="training prompts: JSONL, JSON or Parquet ({'messages'} or {'prompt'} rows)",
                 out="output folder: metrics, samples, checkpoints, plot"):
    """The flags of every trainer (GRPO, PPO, SFT, DPO), with GRPO's defaults: a script changes them with
    p.set_defaults. `unit`: what --micro-batch-size counts; data, out: the help of --data and --out."""
    p.add_argument("--model", help="policy to start from: folder, hub id or alias (e.g. llama-3.1-8b-instruct)")
    p.add_argument("--data", help=data)
    p.add_argument("--out", default="runs/grpo", help=out)
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is unset")
    p.add_argument("--lr", type=float, default=1e-6, help="policy AdamW learning rate (the peak, where scheduled)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    add_precision_args(p)
    add_memory_args(p, unit)
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    add_checkpoint_args(p, save_every=45)  # the paper's schedule: every 45 steps, each export kept (135 of 234)
    add_log_args(p)
    p.add_argument("--demo", action="store_true", help="tiny offline CPU demo (builds its own model and data)")


def add_offline_args(p):
    """The flags SFT and DPO add to add_run_args: a fixed batch, a warmup-then-cosine lr, a length cap."""
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step, all ranks together")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warmup (then cosine)")
    p.add_argument("--max-len", type=int, default=4096, help="tokens per training sequence (longer ones are cut)")
    p.add_argument("--stop-after", type=int, help="end this run after step N, saving (the lr schedule still spans "
                   "the whole run; --resume continues it), e.g. to fit a job time limit")


def add_sampling_args(p):
    """The flags of sampling and scoring the policy's answers (GRPO and PPO rollouts, DPO's pair building)."""
    p.add_argument("--reward-model", help="reward model: folder, hub id or alias (skywork-reward-llama-3.1-8b-v0.2)")
    p.add_argument("--reward-fn", help="rule reward module:function or file.py:function, alone or added to the RM")
    p.add_argument("--template", default="chat-think", choices=chat.TEMPLATES,
                   help="prompt template. chat-think (default, the paper's GRPO/PPO rollouts and eval): the chat "
                        "template, the warm-started model opens <think> itself; think: the turn pre-filled with "
                        "<think> (the paper's DPO sampling); chat: no-think runs; zero / zero-nothink: base models")
    p.add_argument("--strict", action="store_true",
                   help="score [NULL] when the answer's delimiter is missing (</think> for chat-think / think, "
                        "<response>...</response> for zero); no effect with chat, which has none")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--sample-batch-size", type=int, default=64,
                   help="most sampler slots (rows decoded together); on a GPU the KV cache takes fewer when "
                        "--gpu-memory-utilization leaves no room for more")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling (and training log-prob) temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 keeps the RL gradient exact)")
    p.add_argument("--max-prompt-len", type=int,
                   help="prompt tokens kept (left-truncated; default: 896 for the zero templates and for PPO, as the "
                        "authors' configs, else 1,024)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="response token budget")


def add_common_args(p):
    """The flags GRPO shares with PPO (defaults are GRPO's; override with p.set_defaults)."""
    add_run_args(p)
    add_sampling_args(p)
    p.add_argument("--eval-data", help="held-out prompts for greedy validation (default: none)")
    p.add_argument("--eval-prompts", type=int, default=250, help="validate on at most this many eval prompts")
    p.add_argument("--prompts-per-step", type=int, default=64, help="prompts per step, all ranks together")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the sampler's decode step (GPUs: ~20%% faster an 8B step; the first rollout "
                        "compiles, 40-65 s for an 8B)")
    p.add_argument("--kl-coef", type=float, default=0.001, help="KL-to-reference loss coefficient (0 = no KL loss)")
    p.add_argument("--kl-kind", default="k3", choices=losses.KL_KINDS, help="KL estimator used as loss")
    p.add_argument("--entropy-coef", type=float, default=0.001, help="entropy bonus coefficient")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO clip epsilon below 1")
    p.add_argument("--clip-high", type=float, default=0.2, help="PPO clip epsilon above 1")
    p.add_argument("--dual-clip", type=float, default=3.0, help="dual-clip constant c (> 1)")
    p.add_argument("--mini-batches", type=_positive_int, default=1,
                   help="optimizer steps per pass over a rollout, each on 1/N of its prompts (their old log-probs: the "
                        "trainer's before the first step; three of the authors' GRPO configs take 2 of 128 prompts)")
    p.add_argument("--tis-cap", type=float,
                   help="truncated importance sampling of the sampler/trainer mismatch: weight each token's surrogate "
                        "by min(pi_old / pi_sampler, C) (--tis-mode seq-mask: the sequence's ratio, 0 above C); "
                        "unset: off, as in the paper")
    p.add_argument("--tis-mode", default="token-truncate", choices=losses.TIS_MODES,
                   help="token-truncate: each token's min(ratio, C); seq-mask: the sequence's ratio, 0 above C")
    p.add_argument("--loss-agg", default="seq-mean-token-mean", choices=losses.AGG_MODES, help="loss aggregation")
    p.add_argument("--eval-every", type=int, default=45, help="validate every N steps (0: never; the paper: 45)")
    p.add_argument("--samples-per-step", type=int, default=4, help="rows written to samples.jsonl each step")


def add_log_args(p):
    """The logging flags of every trainer (GRPO, PPO, SFT, DPO); metrics.jsonl and TensorBoard need none."""
    p.add_argument("--wandb", metavar="PROJECT",
                   help="also log each step's metrics and the run's flags to this Weights & Biases project "
                        "(rank 0; needs `pip install wandb`)")


def _positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _non_negative_int(text):
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {n}")
    return n


def _positive_float(text):
    x = float(text)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return x


def add_checkpoint_args(p, save_every):
    """The checkpoint flags of every trainer (GRPO, PPO, SFT, DPO); `save_every`: the script's default."""
    p.add_argument("--save-every", type=_non_negative_int, default=save_every, metavar="N",
                   help="save OUT/checkpoints/step-NNNNNN (exports + training state) every N steps (0: end only)")
    p.add_argument("--keep-last", type=_non_negative_int, default=1, metavar="K",
                   help="keep the training states of the newest K saved steps (0: all); the exports of every saved "
                        "step are kept")
    p.add_argument("--resume", help="auto: the last complete checkpoint in --out if there is one (else start fresh); "
                                    "or an OUT folder, a step folder OUT/checkpoints/step-NNNNNN, or its state/")
    p.add_argument("--dist-timeout", type=_positive_float, default=30.0, metavar="MINUTES",
                   help="how long a rank waits in a collective for the others (NCCL's default, 10, is shorter than "
                        "a long rollout or rank 0's export of an 8B model)")


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


CPU_MICRO_BATCH_TOKENS = 4096   # --micro-batch-tokens auto on the CPU, where only tiny models train
MAX_MICRO_BATCH_TOKENS = 32768   # auto on a GPU: at most this (beyond it a pass is long enough that the
                                 # per-pass costs, FSDP's gathers and launches, are already hidden)


def add_memory_args(p, unit="sequences"):
    """The memory flags of every trainer: activation checkpointing, the size of a micro-batch (`unit`: what
    --micro-batch-size counts) and the memory plan (rlmt.memory)."""
    p.add_argument("--micro-batch-tokens", type=_positive_int, metavar="N",
                   help="token budget of one forward/backward on one rank: sequences sorted by length and packed end "
                        "to end (no padding) into micro-batches of at most N tokens; a longer sequence gets one of its "
                        f"own (default: on a GPU the most, in steps of 1,024 up to {MAX_MICRO_BATCH_TOKENS:,}, that "
                        "the memory plan fits, at least 4 of the longest sequences where they fit; "
                        f"{CPU_MICRO_BATCH_TOKENS:,} on the CPU)")
    p.add_argument("--micro-batch-size", type=_positive_int, metavar="N",
                   help=f"at most N {unit} in one forward/backward (default: no cap, --micro-batch-tokens decides)")
    p.add_argument("--activation-checkpointing", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="recompute each block in the backward (auto: on a GPU, on unless the memory plan shows a "
                        "micro-batch of --micro-batch-tokens (auto: 4 of the longest sequences) fits without it, as it "
                        "does not at RLMT's 4 x 5,120 tokens; off on the CPU)")
    p.add_argument("--plan", action="store_true",
                   help="print what each GPU holds in each phase (from the model configs, no weights) and exit")
    p.add_argument("--world-size", type=_positive_int,
                   help="GPUs to plan for with --plan (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--gpu-memory-gb", type=_positive_float,
                   help="memory of one GPU in GiB, to plan for (default: this GPU's; 80 without one)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of each GPU the run may fill (vLLM's meaning): the plan's budget; the sampler's KV "
                        "cache takes what the rest leaves of it, --sample-batch-size slots at most")


def dist_timeout(args):
    """--dist-timeout (minutes) -> the timedelta dist.init passes to init_process_group."""
    return datetime.timedelta(minutes=args.dist_timeout)


def rollout_kwargs(args):
    """The flags every rollout of a run shares (training and validation), as rollout.rollout() kwargs."""
    return dict(template=args.template, max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                top_p=args.top_p, strict=args.strict, batch_size=args.sample_batch_size,
                gpu_memory_utilization=args.gpu_memory_utilization, compile=args.compile)


def actor_kwargs(args):
    """The flags of the actor's loss (GRPO, PPO), as losses.actor_loss() kwargs."""
    return dict(clip_low=args.clip_low, clip_high=args.clip_high, dual_clip=args.dual_clip, tis_cap=args.tis_cap,
                tis_mode=args.tis_mode, kl_coef=args.kl_coef, kl_kind=args.kl_kind, entropy_coef=args.entropy_coef)


def torch_dtype(name, device):
    """--dtype -> the compute dtype: auto is bf16 on GPUs and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def trained_model(path, args, device, dtype, checkpointing, head=None):
    """A model to train (the policy, PPO's critic) from `path`: loaded in its checkpoint's dtype, then sharded
    with fp32 masters and --dtype compute (dist.shard), activation checkpointing as memory_check decided,
    in train mode -> (model, the exports' dtype). A path that does not load: one line, exit 1."""
    try:
        model = from_pretrained(path, head=head)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    export_dtype = save_dtype(args, model)
    model.gradient_checkpointing = checkpointing
    return dist.shard(model, device, dtype).train(), export_dtype


def save_dtype(args, model):
    """--save-dtype -> the exports' dtype: auto is what `model`'s checkpoint was saved in."""
    return checkpoint_dtype(model) if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
