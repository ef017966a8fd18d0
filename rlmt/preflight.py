"""What every trainer checks before its first model loads, so a bad run stops in seconds with one clear
message: the flags against each other and the data files (`check`), --resume and --out, the memory plan
(`memory_check`: --plan prints it; on a GPU a run that cannot fit stops, and --micro-batch-tokens auto and
--activation-checkpointing auto are decided from it), and the one-line report of a failing --reward-fn.

    args = p.parse_args()
    checkpointing = preflight.memory_check(args, p, "grpo")          # every trainer, first
    rows, eval_rows, reward_fn, total_steps = preflight.check(args, p)   # GRPO, PPO
"""

import argparse
import importlib.util
import os
import sys
import traceback

import torch

from rlmt import checkpoint, data, reward
from rlmt.cli import CPU_MICRO_BATCH_TOKENS, MAX_MICRO_BATCH_TOKENS


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
