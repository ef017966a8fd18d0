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
import datetime
import importlib.util
import os
import sys
import traceback

import torch

from rlmt import chat, checkpoint, data, losses, reward
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
    p.add_argument("--template", default="chat-think", choices=chat.TEMPLATES,
                   help="prompt template. chat-think (default, the paper's GRPO/PPO rollouts and eval): the chat "
                        "template, the warm-started model opens <think> itself; think: the turn pre-filled with "
                        "<think> (the paper's DPO sampling); chat: no-think runs; zero / zero-nothink: base models")
    p.add_argument("--strict", action="store_true",
                   help="score [NULL] when the answer's delimiter is missing (</think> for chat-think / think, "
                        "<response>...</response> for zero); no effect with chat, which has none")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the prompts when --steps is unset")
    p.add_argument("--prompts-per-step", type=int, default=64, help="prompts per step, all ranks together")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--sample-batch-size", type=int, default=64,
                   help="most sampler slots (rows decoded together); on a GPU the KV cache takes fewer when "
                        "--gpu-memory-utilization leaves no room for more")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the sampler's decode step (GPUs: ~20%% faster an 8B step; the first rollout "
                        "compiles, 40-65 s for an 8B)")
    p.add_argument("--lr", type=float, default=1e-6, help="policy AdamW learning rate (paper: 1e-6; 3e-7 Instruct)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
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
    p.add_argument("--temperature", type=float, default=0.7, help="sampling and log-prob temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 keeps the RL gradient exact)")
    p.add_argument("--max-prompt-len", type=int,
                   help="prompt tokens kept (left-truncated; default: 896 for the zero templates and for PPO, as the "
                        "authors' configs, else 1,024)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="response token budget")
    add_precision_args(p)
    add_memory_args(p)
    p.add_argument("--eval-every", type=int, default=45, help="validate every N steps (0: never; the paper: 45)")
    p.add_argument("--samples-per-step", type=int, default=4, help="rows written to samples.jsonl each step")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    add_checkpoint_args(p, save_every=45)  # the paper's schedule: every 45 steps, each export kept (135 of 234)
    add_log_args(p)
    p.add_argument("--demo", action="store_true", help="tiny offline CPU demo (builds its own model and data)")


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


def longest_unit(args, kind):
    """Tokens of the longest unit a micro-batch of script `kind` holds whole: prompt + response (GRPO,
    PPO), a pair's two sequences (DPO keeps chosen and rejected together), one conversation (SFT)."""
    if kind in ("grpo", "ppo"):
        return args.max_prompt_len + args.max_new_tokens
    return 2 * args.max_len if kind == "dpo" else args.max_len


def memory_plan(args, kind, world, card, checkpointing):
    """The memory plan (rlmt.memory.plan) of script `kind` ("grpo", "ppo", "dpo", "sft") with these flags,
    for `world` GPUs of `card` bytes; built from the config.json files alone. A micro-batch holds
    --micro-batch-tokens tokens, or the longest unit when that is longer (it then has one of its own)."""
    from rlmt import memory
    policy = memory.shapes(memory.read_config(args.model))
    c = 4 if args.dtype == "float32" else 2  # planned for GPUs: auto is bf16 there
    rm = memory.shapes(memory.read_config(args.reward_model)) if getattr(args, "reward_model", None) else None
    kw = dict(policy=policy, world=world, card=card, utilization=args.gpu_memory_utilization, c=c, reward_model=rm)
    training = dict(tokens=max(args.micro_batch_tokens or 0, longest_unit(args, kind)), checkpointing=checkpointing)
    if kind in ("grpo", "ppo"):
        prompts = max(1, args.prompts_per_step // world)
        length = args.max_prompt_len + args.max_new_tokens
        kw.update(sampling=dict(samples=prompts * args.group_size, slots=args.sample_batch_size, prompts=prompts,
                                prompt_len=args.max_prompt_len, new_tokens=args.max_new_tokens),
                  scoring=dict(batch=8, length=length),  # RewardModel's batch_size and max_len
                  training=training)
        if args.kl_coef > 0:
            kw["reference"] = policy
        if kind == "ppo":
            start = args.model if args.critic_init == "policy" else args.reward_model
            kw["critic"] = memory.shapes(memory.read_config(start), head="score")
    elif kind == "dpo":
        if rm is not None:  # the pairs are sampled first
            prompts = max(1, args.chunk_prompts // world)
            kw.update(sampling=dict(samples=prompts * args.group_size, slots=args.sample_batch_size,
                                    prompts=prompts, prompt_len=args.max_prompt_len, new_tokens=args.max_new_tokens),
                      scoring=dict(batch=8, length=args.max_prompt_len + args.max_new_tokens))
    kw["training"] = training
    return memory.plan(**kw)


def _budgets(lo, hi):
    """Token budgets a plan may pick between lo and hi: lo itself, then the multiples of 1,024 above it."""
    return [lo] + list(range((lo // 1024 + 1) * 1024, hi + 1, 1024))


def _largest_budget(args, kind, world, card, ckpt, lo, hi):
    """The largest of _budgets(lo, hi) whose training phase fits, or None (a binary search: the training
    peak grows with the tokens of a micro-batch)."""
    from rlmt import memory

    def fits(tokens):
        changed = argparse.Namespace(**{**vars(args), "micro_batch_tokens": tokens})
        return not any(x.startswith("training") for x in memory.problems(memory_plan(changed, kind, world, card, ckpt)))
    options, best = _budgets(lo, hi), None
    i, j = 0, len(options) - 1
    while i <= j:
        k = (i + j) // 2
        if fits(options[k]):
            best, i = options[k], k + 1
        else:
            j = k - 1
    return best


def _memory_hints(args, kind, world, card, ckpt):
    """Concrete changes that make a plan fit: checkpointing, a smaller --micro-batch-tokens, more GPUs."""
    from rlmt import memory
    longest = longest_unit(args, kind)
    tokens = max(args.micro_batch_tokens, longest)

    def fits(w=world, t=tokens, on=ckpt):
        changed = argparse.Namespace(**{**vars(args), "micro_batch_tokens": t})
        return not memory.problems(memory_plan(changed, kind, w, card, on))
    per_step = getattr(args, "prompts_per_step", None) or args.batch_size  # split over ranks: must divide
    hints = ["--activation-checkpointing on"] if not ckpt and fits(on=True) else []
    fewer = _largest_budget(args, kind, world, card, True, longest, tokens - 1) if tokens > longest else None
    if fewer is not None and fits(t=fewer, on=True):
        hints.append(f"--micro-batch-tokens {fewer}" + ("" if ckpt else " --activation-checkpointing on"))
    for t in dict.fromkeys((tokens, longest)):
        more = next((w for w in (16, 32, 64, 128) if w > world and per_step % w == 0 and fits(w, t, True)), None)
        if more is not None:
            hints.append(f"{more} GPUs of this size (the fp32 state is sharded over them)"
                         + (f" and --micro-batch-tokens {t}" if t != tokens else ""))
            break
    return hints


def memory_check(args, p, kind):
    """Before any weights load: --plan prints the memory plan and exits; a GPU run is refused, with what to
    change, when a phase cannot fit. Fills the run-dependent defaults first (paper_defaults). Resolves
    --activation-checkpointing auto -> True / False (returned)
    and --micro-batch-tokens auto -> a number (set in `args`).

    The auto budget on a GPU: checkpointing is decided at 4 of the longest units (the memory of the old
    default, 4 padded sequences a micro-batch), then the budget is the most tokens that fit with that
    decision, in steps of 1,024 up to MAX_MICRO_BATCH_TOKENS (at least the longest unit, which a
    micro-batch must hold whole). On the CPU: CPU_MICRO_BATCH_TOKENS."""
    from rlmt import memory
    check_outputs(args, p)  # every trainer passes here first: the checks of what it writes come with it
    sys.excepthook = reward_fn_crash_hook(args.out, getattr(sys.excepthook, "default", sys.excepthook))
    paper_defaults(args, kind)
    cuda = torch.cuda.is_available()
    if not args.plan and not cuda:  # the CPU: tiny models, nothing to plan
        args.micro_batch_tokens = args.micro_batch_tokens or CPU_MICRO_BATCH_TOKENS
        return args.activation_checkpointing == "on"
    if not args.model:
        p.error("--model is required (or use --demo)")
    if not 0 < args.gpu_memory_utilization <= 1:
        p.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    if args.gpu_memory_gb:
        card = int(args.gpu_memory_gb * memory.GiB)
    else:
        card = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory if cuda \
            else 80 * memory.GiB
    ckpt = args.activation_checkpointing == "on"
    auto = args.micro_batch_tokens is None
    try:
        longest = longest_unit(args, kind)
        if auto:
            args.micro_batch_tokens = max(longest, min(4 * longest, MAX_MICRO_BATCH_TOKENS))
        plan = memory_plan(args, kind, world, card, ckpt)
        if args.activation_checkpointing == "auto" and any(x.startswith("training") for x in memory.problems(plan)):
            ckpt, plan = True, memory_plan(args, kind, world, card, True)
        if auto:
            best = _largest_budget(args, kind, world, card, ckpt, longest, max(args.micro_batch_tokens,
                                                                                MAX_MICRO_BATCH_TOKENS))
            args.micro_batch_tokens = best or longest
            plan = memory_plan(args, kind, world, card, ckpt)
        bad = memory.problems(plan)
        hints = _memory_hints(args, kind, world, card, ckpt) if bad else []
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    main = int(os.environ.get("RANK", 0)) == 0
    title = (f"memory plan for {kind}, activation checkpointing {'on' if ckpt else 'off'}, micro-batches of "
             f"{max(args.micro_batch_tokens, longest_unit(args, kind)):,} tokens")
    if args.plan:
        if main:
            print("\n".join([memory.format_plan(plan, title)] + [f"it would fit with {h}" for h in hints]))
        sys.exit(0)
    if bad:
        sys.exit("error: this run does not fit its GPUs (see --plan):\n  " + "\n  ".join(
            bad + [f"it would fit with {h}" for h in hints]) if main else 1)
    if main:
        print(f"{title}: peak " + ", ".join(f"{ph} {plan.peak(ph) / memory.GiB:.1f}" for ph in plan.phases)
              + f" GiB of {plan.budget / memory.GiB:.1f} per GPU"
              + (f"; KV cache {plan.slots} slots" if plan.slots else ""))
    return ckpt


def check_outputs(args, p):
    """--out must be a folder (or not exist yet; DPO's --build-pairs may name the pairs .jsonl file), and
    --wandb needs wandb installed: both said now, not after the models have loaded."""
    pairs_file = getattr(args, "build_pairs", False) and args.out.endswith(".jsonl")
    if os.path.isfile(args.out) and not pairs_file:
        p.error(f"--out {args.out} is a file; it must be a folder (or a path that does not exist yet)")
    if getattr(args, "wandb", None) and importlib.util.find_spec("wandb") is None:
        p.error("--wandb needs wandb: pip install wandb")


def reward_fn_crash(out, e):
    """A --reward-fn that raised (reward.RewardFnError `e`) -> the one line to print; its full traceback is
    written to OUT/error.log (error.rank<N>.log on the other ranks), which the line names."""
    rank = int(os.environ.get("RANK", 0))
    folder = os.path.dirname(os.path.abspath(out)) if out.endswith(".jsonl") else out  # DPO's pairs file
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "error.log" if rank == 0 else f"error.rank{rank}.log")
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(e)))  # the chain: the user's traceback first
    at = f" at step {e.step}" if e.step is not None else ""
    return f"error: reward function {e.spec!r} raised{at}: {e} (traceback in {path})"


def reward_fn_crash_hook(out, default):
    """A sys.excepthook: a failing --reward-fn, raised from deep in a rollout, ends the run with
    reward_fn_crash's one line instead of a traceback through rlmt; anything else goes to `default`.
    A hook rather than a try in each trainer's loop: the error can come from any rollout (training,
    validation, DPO's pair sampling), and the exit status stays 1."""
    def hook(kind, e, tb):
        if isinstance(e, reward.RewardFnError):
            print(reward_fn_crash(out, e), file=sys.stderr)
        else:
            default(kind, e, tb)
    hook.default = default  # a second memory_check in one process replaces this hook instead of stacking
    return hook


def paper_defaults(args, kind):
    """Fill the flags whose default depends on the run (memory_check calls it first): --max-prompt-len is
    896 for the zero templates and for PPO (both of the authors' released PPO configs), else 1,024."""
    if getattr(args, "max_prompt_len", 0) is None:
        args.max_prompt_len = 896 if args.template.startswith("zero") or kind == "ppo" else 1024


def check(args, p):
    """Check the flags and read the data files before any model loads; exit with one clear message.

    --mini-batches: optimizer steps per rollout epoch, each on a 1/mini_batches share of every rank's
    prompts (a prompt's group stays together). Micro-batches divide nothing: they are cut by tokens
    (--micro-batch-tokens, rlmt.batching). Returns (rows, eval_rows, reward_fn, total_steps)."""
    for flag in ("model", "data"):
        if not getattr(args, flag):
            p.error(f"--{flag} is required (or use --demo)")
    if not args.reward_model and not args.reward_fn:
        p.error("give --reward-model, --reward-fn, or both")

    # Batch arithmetic, checked before anything loads (TRL's most reported GRPO error).
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.prompts_per_step % world:
        p.error(f"--prompts-per-step {args.prompts_per_step} must be divisible by the number of ranks {world}")
    if (args.prompts_per_step // world) % args.mini_batches:
        p.error(f"each rank trains on {args.prompts_per_step}/{world} = {args.prompts_per_step // world} prompts, not "
                f"divisible by --mini-batches {args.mini_batches} (a prompt's samples stay in one mini-batch)")
    if args.tis_cap is not None and args.tis_cap < 1:
        p.error(f"--tis-cap must be at least 1 (1 keeps no token above the sampler's probability), got {args.tis_cap}")
    if args.max_prompt_len < 2:
        p.error(f"--max-prompt-len must be at least 2, got {args.max_prompt_len}")
    try:
        rows = data.load_prompts(args.data)
        eval_rows = data.load_prompts(args.eval_data)[:args.eval_prompts] if args.eval_data else []
        reward_fn = reward.load_reward_fn(args.reward_fn) if args.reward_fn else None
    except (ValueError, FileNotFoundError, ImportError, AttributeError) as e:
        sys.exit(f"error: {e}")
    resume_state(args)  # a bad --resume fails here, before any model loads
    if args.temperature <= 0:
        p.error("--temperature must be > 0 for training (log-probs are computed at it); greedy is for eval")
    if len(rows) < args.prompts_per_step:
        sys.exit(f"error: {args.data} has {len(rows)} prompts, fewer than --prompts-per-step {args.prompts_per_step}")
    total_steps = args.steps or max(1, int(args.epochs * (len(rows) // args.prompts_per_step)))
    return rows, eval_rows, reward_fn, total_steps


def resume_state(args):
    """--resume -> the training state folder to load, or None (start fresh); one clear error and exit when
    there is no checkpoint where it says (rlmt.checkpoint.find_resume)."""
    try:
        return checkpoint.find_resume(args.resume, args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")


def resume(args, state_dir, models, optimizers):
    """Load `state_dir` (resume_state's answer; None: start fresh) into the built, sharded models and their
    optimizers, and drop what a killed run logged after that step -> (step, optimizer steps skipped so far)."""
    from rlmt import dist, log
    step, skipped = 0, 0
    if state_dir:
        state = checkpoint.load_state(state_dir, models, optimizers)
        step, skipped = state["step"], state.get("skipped_steps", 0)
    if args.resume and dist.is_main():
        log.truncate_after(args.out, step)
        print(f"resumed from {state_dir} at step {step}" if state_dir else
              f"--resume auto: no checkpoint in {args.out}, starting fresh")
    return step, skipped


def dist_timeout(args):
    """--dist-timeout (minutes) -> the timedelta dist.init passes to init_process_group."""
    return datetime.timedelta(minutes=args.dist_timeout)


def rollout_kwargs(args):
    """The flags every rollout of a run shares (training and validation), as rollout.rollout() kwargs."""
    return dict(template=args.template, max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                top_p=args.top_p, strict=args.strict, batch_size=args.sample_batch_size,
                gpu_memory_utilization=args.gpu_memory_utilization, compile=args.compile)


def torch_dtype(name, device):
    """--dtype -> the compute dtype: auto is bf16 on GPUs and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def save_dtype(args, model):
    """--save-dtype -> the exports' dtype: auto is what `model`'s checkpoint was saved in."""
    return checkpoint_dtype(model) if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
