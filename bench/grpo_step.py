"""One GRPO step, rlmt against TRL's `GRPOTrainer`, on the same model, reward and batch, in one run; or
(--lengths rlmt) rlmt's training step at RLMT's lengths, padded rows (before packing) against packed ones.

    pip install trl "torch==2.13.0"   # a benchmark dependency only; the pin keeps pip from swapping torch
    python bench/grpo_step.py [--steps 3] [--warmup 1] [--repeat 3] [--micro-batch-size 4] [--threads 2]
    python bench/grpo_step.py --lengths rlmt [--prompts 2] [--micro-batch-tokens 20480] [--repeat 2]

The model is a random ~7M-parameter Llama (vocab 8,192, width 256, 4 layers, 8 heads, 2 KV heads: the
shape of bench/sample_speed.py) with rlmt.tiny's Llama tokenizer and chat template, padded with
placeholder tokens `<wN>` to the model's 8,192 ids so that every sampled id decodes to text on both sides.
Built once under --workdir.

One step, both sides: 2 prompts × G = 8 samples × exactly 128 new tokens at T 0.7, top-p 1 (EOS never
ends a sample: rlmt `ignore_eos`, TRL `min_new_tokens=128`), a rule reward (answer length), group
advantages (r − mean) / (std + eps), reference log-probs (k3 KL, coefficient 0.001) and policy log-probs
+ entropy (bonus 0.001) at T 0.7, per-sequence token mean, backward, grad clip 1.0, one AdamW step (lr
1e-6, weight decay 0.01, constant lr). fp32, no activation checkpointing on either side.
  rlmt: `rlmt_step` below, the body of train_grpo.py's loop written with the same library calls
        (rollout.rollout, batching.micro_batches, packed_logprobs, losses.*): micro-batches of at most
        --micro-batch-tokens tokens (train_grpo.py's CPU default, 4,096: the step's 16 samples in one packed
        row). rollout() has no ignore_eos argument, so it is passed through to sampler.generate for the call.
  TRL:  GRPOTrainer(loss_type="grpo", beta=0.001, entropy_coef=0.001, num_iterations=1, GA steps =
        16 / --micro-batch-size, generation with transformers' generate, no vLLM), timed from one on_step_end
        callback to the next (so the trainer's own per-step overhead counts, as rlmt's does).

Each side runs in its own process (peak RSS from getrusage), --warmup untimed steps then --steps timed
ones; the sides alternate --repeat times, so a slow spell of this shared machine hits both (each run
prints how many cores other processes kept busy meanwhile: on 2 cores, one other busy process stalls
every 2-thread op, and such runs are not comparable). Reported: the fastest and the median step over the
timed steps of a side's quiet runs (--quiet), tokens/s = 2,048 generated tokens / fastest step, the
median generation time and the median of the rest of a step, and the peak RSS of the process (whole,
and above what it held before its first step).

--lengths rlmt: no sampling, no TRL. One rollout batch at RLMT's lengths is built once per process from a
seed: --prompts real prompts of the paper's data (../shared/data/rlmt-wildchat-if/train.jsonl) rendered
with the Qwen3 tokenizer's chat template (../shared/data/tokenizers/qwen3) and left-truncated at 1,024
tokens (their ids folded into the model's 8,192), × G = 8 responses of long-tailed lengths (log-normal,
median --response-median, σ --response-sigma, cut at 4,096: a share ends at the cap, like RLMT's
`length_frac`), random ids, random rewards. Timed: the training part of train_grpo.py's step (reference
log-probs, policy log-probs + entropy, the loss, backward, clip, AdamW), on the same batch, two ways:
  padded: the loop before packing (commit b6acb88): micro-batches of --micro-batch-size rows sliced in
          order from the batch padded to the longest prompt + the longest response, sequence_logprobs
          with a dense [B, 1, T, T] mask (left-padded prompts);
  packed: today's loop: micro-batches of at most --micro-batch-tokens tokens, samples sorted by length
          and packed end to end (batching.micro_batches, packed_logprobs), no padding computed.
Reported per side: the fastest and median training step, pad_frac (share of computed positions that are
padding), the number of micro-batches, real tokens per second, peak RSS.
"""

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["Why is the sky blue?", "Write a short poem about a river."]
GROUP, NEW_TOKENS, TEMPERATURE = 8, 128, 0.7
LR, WEIGHT_DECAY, GRAD_CLIP, KL_COEF, ENTROPY_COEF, CLIP = 1e-6, 0.01, 1.0, 0.001, 0.001, 0.2


def answer_length(answers):
    """The rule reward of both sides: the answer's length in hundreds of characters."""
    return [len(a) / 100 for a in answers]


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_busy_s():
    """CPU seconds spent busy by the whole machine so far (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def build(workdir):
    """The tiny tokenizer (padded to 8,192 ids) and a random 7M Llama, saved once as an HF folder."""
    from rlmt import tiny
    path = os.path.join(workdir, "llama-7m-chat")
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = tiny.build_tokenizer(os.path.join(workdir, "tok-8192"), "llama",
                                   added_tokens=[f"<w{i}>" for i in range(8192 - 384)])
        assert len(tok) == 8192, len(tok)
        tiny.build_checkpoint(path, family="llama", tokenizer=tok, hidden_size=256, num_layers=4, num_heads=8,
                              num_kv_heads=2, intermediate_size=704, vocab_size=8192)
    return path


# --- rlmt ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def ignoring_eos():
    """rollout.rollout() takes no ignore_eos: hand it to sampler.generate for the call, so every sample
    has exactly max_new_tokens tokens (TRL's side: min_new_tokens)."""
    from rlmt import sampler
    generate = sampler.generate
    sampler.generate = functools.partial(generate, ignore_eos=True)
    try:
        yield
    finally:
        sampler.generate = generate


def rlmt_step(policy, ref, opt, tokenizer, rows, step, micro_batch_tokens):
    """One GRPO step as train_grpo.py's loop does it (one rank, no FSDP) -> (the Rollout, the step's metrics)."""
    import torch

    from rlmt import dist, losses, rollout
    with ignoring_eos(), dist.full_copy(policy) as rollout_model, torch.no_grad():  # fp32 plain: itself
        ro = rollout.rollout(rollout_model, tokenizer, rows, template="chat", group_size=GROUP,
                             reward_fn=lambda prompts, answers: answer_length(answers), max_prompt_len=1024,
                             max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, batch_size=64,
                             seed=[(step << 20) + i for i in range(len(rows))])
    metrics = train_packed(policy, ref, opt, ro.batch, losses.group_advantages(ro.rewards, GROUP), micro_batch_tokens)
    metrics.update(reward_mean=ro.rewards.mean().item())
    return ro, metrics


def _loss(logp, ref_logp, ent, adv, m, count, stats):
    """train_grpo.py's loss of one micro-batch, through the same losses.actor_loss (k3 KL, entropy bonus,
    per-sequence token mean over the step's count), backward; its metrics appended to `stats` with their
    token weight. No sampler log-probs: TIS is off, as in train_grpo.py's default."""
    from rlmt import losses
    per_token, pm = losses.actor_loss(logp, logp.detach(), adv, m, ref_logprobs=ref_logp, entropy=ent,
                                      clip_low=CLIP, clip_high=CLIP, dual_clip=3.0, kl_coef=KL_COEF, kl_kind="k3",
                                      entropy_coef=ENTROPY_COEF)
    losses.aggregate(per_token, m, "seq-mean-token-mean", count=count).backward()
    stats.append((pm, m.sum()))


def _finish(policy, opt, stats, **extra):
    """Clip, step, and the step's metrics as floats."""
    import torch

    from rlmt import log
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {**{k: v.item() for k, v in log.step_mean(stats).items()}, "grad_norm": grad_norm.item(), **extra}


def train_packed(policy, ref, opt, b, adv, micro_batch_tokens, micro_batch_size=None):
    """The training part of train_grpo.py's step: micro-batches of at most micro_batch_tokens tokens, each
    one packed row. b: the rollout batch [N, T]; adv [N]. -> metrics (floats), pad_frac and n_micro."""
    import torch

    from rlmt import batching, dist, losses
    from rlmt.logprobs import packed_logprobs
    b = {**b, "advantages": adv}
    count = dist.all_reduce_sum(losses.aggregate_count(b["response_mask"], "seq-mean-token-mean"))
    lengths = b["attention_mask"].sum(1).tolist()
    plan = batching.micro_batches(lengths, micro_batch_tokens, micro_batch_size)
    micro = [{k: v[rows] for k, v in b.items()} for rows in plan]
    with torch.no_grad():
        ref_logps = [packed_logprobs(ref, mb, mb["response_mask"], TEMPERATURE)[0] for mb in micro]
    stats = []
    for mb, ref_logp in zip(micro, ref_logps):
        m = mb["response_mask"]
        logp, ent = packed_logprobs(policy, mb, m, TEMPERATURE, with_entropy=True)
        _loss(logp, ref_logp, ent, mb["advantages"], m, count, stats)
    return _finish(policy, opt, stats, pad_frac=batching.pad_frac(lengths, plan), n_micro=len(plan))


def train_padded(policy, ref, opt, b, adv, prompt_len, micro_batch_size):
    """The same step as train_grpo.py ran it before packing (commit b6acb88): micro-batches of
    micro_batch_size rows sliced in order from the padded batch, sequence_logprobs (a dense mask)."""
    import torch

    from rlmt import dist, losses
    from rlmt.logprobs import sequence_logprobs
    mask = b["response_mask"]
    count = dist.all_reduce_sum(losses.aggregate_count(mask, "seq-mean-token-mean"))
    micro = [slice(s, s + micro_batch_size) for s in range(0, mask.shape[0], micro_batch_size)]
    x = [(b["input_ids"][s], b["attention_mask"][s], b["position_ids"][s], TEMPERATURE) for s in micro]
    with torch.no_grad():
        ref_logps = [sequence_logprobs(ref, *xs, start=prompt_len)[0] for xs in x]
    stats = []
    for s, xs, ref_logp in zip(micro, x, ref_logps):
        logp, ent = sequence_logprobs(policy, *xs, with_entropy=True, start=prompt_len)
        _loss(logp, ref_logp, ent, adv[s], mask[s], count, stats)
    real = b["attention_mask"].sum().item()
    return _finish(policy, opt, stats, pad_frac=1 - real / b["attention_mask"].numel(), n_micro=len(micro))


def run_rlmt(args, path):
    import torch

    from rlmt import chat
    from rlmt import model as M
    torch.manual_seed(0)
    tokenizer = chat.load_tokenizer(path)
    policy = M.from_pretrained(path).train()
    ref = M.from_pretrained(path).requires_grad_(False).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": p}]} for i, p in enumerate(PROMPTS)]
    base, times, t_gen = peak_mb(), [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        ro, _ = rlmt_step(policy, ref, opt, tokenizer, rows, step, args.micro_batch_tokens)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            t_gen.append(ro.t_sample)
        assert (ro.response_len == NEW_TOKENS).all(), ro.response_len
    return {"times": times, "t_gen": t_gen, "base_mb": base, "peak_mb": peak_mb(),
            "prompt_lens": [len(p) for p in ro.prompt_ids], "threads": torch.get_num_threads()}


# --- TRL ----------------------------------------------------------------------------------------------

def run_trl(args, path):
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    def answer_length_reward(prompts, completions, **kw):
        return answer_length([c[-1]["content"] if isinstance(c, list) else c for c in completions])

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, a, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            self.ends.append(time.perf_counter())

    config = trl.GRPOConfig(
        output_dir=os.path.join(args.workdir, "trl-out"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=len(PROMPTS) * GROUP // args.micro_batch_size,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": NEW_TOKENS}, use_vllm=False,
        beta=KL_COEF, num_iterations=1, epsilon=CLIP, loss_type="grpo", scale_rewards="group",
        entropy_coef=ENTROPY_COEF, learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=0.9, adam_beta2=0.999,
        max_grad_norm=GRAD_CLIP, lr_scheduler_type="constant", warmup_steps=0,
        activation_checkpointing=False, gradient_checkpointing=False, disable_dropout=True,
        model_init_kwargs={"dtype": torch.float32},
        max_steps=args.warmup + args.steps, report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, log_completions=False, seed=0, dataloader_num_workers=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    clock = StepClock()
    trainer = trl.GRPOTrainer(model=path, reward_funcs=answer_length_reward, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[clock])
    torch.set_num_threads(args.threads)  # after the trainer: accelerate may have set its own
    model = trainer.model
    assert not getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False))
    t_gen, lens, prompt_lens = [], [], []
    generate = trainer._generate_single_turn

    def timed_generate(prompt_ids, *a, **kw):
        t0 = time.perf_counter()
        ids, logprobs = generate(prompt_ids, *a, **kw)
        t_gen.append(time.perf_counter() - t0)
        lens.extend(len(c) for c in ids)
        prompt_lens[:] = sorted({len(p) for p in prompt_ids})
        return ids, logprobs
    trainer._generate_single_turn = timed_generate
    base = peak_mb()
    trainer.train()
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:])][args.warmup:]
    assert len(times) == args.steps and len(t_gen) == args.warmup + args.steps, (clock.ends, t_gen)
    assert all(n == NEW_TOKENS for n in lens), lens
    return {"times": times, "t_gen": t_gen[args.warmup:], "base_mb": base, "peak_mb": peak_mb(),
            "prompt_lens": prompt_lens, "threads": torch.get_num_threads(), "trl": trl.__version__}


# --- RLMT's lengths: padded vs packed -------------------------------------------------------------------

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
MAX_PROMPT, MAX_RESPONSE = 1024, 4096


def rlmt_batch(args, vocab):
    """A rollout batch at RLMT's lengths, the same for a given --seed: --prompts of the paper's prompts
    (their Qwen3 chat-template tokens, left-truncated at 1,024, ids folded into `vocab`) × GROUP responses
    of log-normal lengths cut at 4,096 -> (batch as sampler.to_batch lays it out, advantages [N])."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from rlmt import data, losses
    rng = np.random.RandomState(args.seed)
    rows = data.load_prompts(os.path.join(SHARED, "rlmt-wildchat-if", "train.jsonl"))
    rows = [rows[i] for i in rng.choice(len(rows), args.prompts, replace=False)]
    tok = AutoTokenizer.from_pretrained(os.path.join(SHARED, "tokenizers", "qwen3"))
    prompts, _ = data.encode_prompts(tok, rows, "chat", MAX_PROMPT)
    prompts = [[t % vocab for t in p] for p in prompts for _ in range(GROUP)]
    lens = np.minimum(MAX_RESPONSE, np.ceil(rng.lognormal(np.log(args.response_median), args.response_sigma,
                                                            len(prompts)))).astype(int)
    responses = [rng.randint(0, vocab, n).tolist() for n in lens]
    b = data.join(prompts, responses, 0)
    b["sampler_logp"] = torch.zeros(b["input_ids"].shape)
    rewards = torch.tensor(rng.randn(len(prompts)), dtype=torch.float32)
    return b, losses.group_advantages(rewards, GROUP)


def run_lengths(args, path):
    import torch

    from rlmt import model as M
    torch.manual_seed(0)
    policy = M.from_pretrained(path).train()
    ref = M.from_pretrained(path).requires_grad_(False).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    b, adv = rlmt_batch(args, policy.config.vocab_size)
    prompt_len, b = b["prompt_len"], {k: v for k, v in b.items() if torch.is_tensor(v)}
    base, times = peak_mb(), []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        if args.side == "packed":
            m = train_packed(policy, ref, opt, b, adv, args.micro_batch_tokens, args.micro_batch_cap)
        else:
            m = train_padded(policy, ref, opt, b, adv, prompt_len, args.micro_batch_size)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    am = b["attention_mask"]
    return {"times": times, "t_gen": [0.0] * len(times), "base_mb": base, "peak_mb": peak_mb(), "metrics": m,
            "rows": am.shape[0], "width": am.shape[1], "tokens": int(am.sum()),
            "prompt_tokens": int(am[:, :prompt_len].sum()), "response_tokens": int(b["response_mask"].sum()),
            "length_frac": float((b["response_mask"].sum(1) == MAX_RESPONSE).float().mean()),
            "threads": torch.get_num_threads()}


def summarize_lengths(args, quiet, res):
    first = res["padded"][0]
    print(f"\none step: {args.prompts} prompts x {GROUP} samples = {first['rows']} rows, {first['tokens']:,} tokens "
          f"({first['prompt_tokens']:,} prompt, {first['response_tokens']:,} response; "
          f"{first['length_frac']:.0%} of responses at {MAX_RESPONSE:,}); padded to {first['width']:,} columns; "
          f"{first['threads']} threads; {args.steps} timed steps x {args.repeat} processes per side")
    print(f"  {'':40s} {'fastest':>8s} {'median':>8s} {'tok/s':>7s} {'pad_frac':>8s} {'micro':>5s} {'peak RSS':>9s}")
    summary = {}
    for side, name in [("padded", f"padded, {args.micro_batch_size} rows a micro-batch"),
                       ("packed", f"packed, <= {args.micro_batch_tokens:,} tokens a micro-batch")]:
        times = [t for one in quiet[side] for t in one["times"]]
        m = res[side][0]["metrics"]
        summary[side] = min(times), statistics.median(times)
        print(f"  {name:40s} {min(times):7.2f}s {statistics.median(times):7.2f}s {first['tokens'] / min(times):7.0f} "
              f"{m['pad_frac']:8.3f} {m['n_micro']:5d} {max(one['peak_mb'] for one in res[side]):6.0f} MB")
    (f_a, m_a), (f_b, m_b) = summary["padded"], summary["packed"]
    print(f"  ratio (padded / packed): {f_a / f_b:.2f}x fastest, {m_a / m_b:.2f}x median")


# --- driver -------------------------------------------------------------------------------------------

def child(args):
    import torch
    torch.set_num_threads(args.threads)
    path = build(args.workdir)
    res = {"rlmt": run_rlmt, "trl": run_trl}.get(args.side, run_lengths)(args, path)
    print("RESULT " + json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, per process")
    p.add_argument("--repeat", type=int, default=3, help="processes per side, alternating rlmt / TRL")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="rows per forward/backward: TRL's side; with --lengths rlmt, the padded side's")
    p.add_argument("--micro-batch-tokens", type=int,
                   help="rlmt's token budget of a micro-batch (default: train_grpo.py's on the CPU, 4,096; with "
                        "--lengths rlmt, 20,480: the padded side's 4 rows of 5,120)")
    p.add_argument("--micro-batch-cap", type=int, help="with --lengths rlmt: at most this many rows in a packed "
                   "micro-batch (train_grpo.py's --micro-batch-size; default: no cap)")
    p.add_argument("--lengths", choices=["rlmt"], help="rlmt: padded vs packed training at RLMT's lengths, no TRL")
    p.add_argument("--prompts", type=int, default=2, help="with --lengths rlmt: prompts a step (x 8 samples)")
    p.add_argument("--response-median", type=float, default=900.0,
                   help="with --lengths rlmt: median response length (log-normal, cut at 4,096)")
    p.add_argument("--response-sigma", type=float, default=0.8, help="with --lengths rlmt: its log-normal sigma")
    p.add_argument("--seed", type=int, default=0, help="with --lengths rlmt: which prompts and lengths")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rlmt-bench"),
                   help="where the random checkpoint is saved (reused)")
    p.add_argument("--quiet", type=float, default=0.25,
                   help="summarize only runs during which other processes used fewer cores than this")
    p.add_argument("--side", choices=["rlmt", "trl", "padded", "packed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.micro_batch_tokens is None:
        args.micro_batch_tokens = 4 * (MAX_PROMPT + MAX_RESPONSE) if args.lengths else 4096
    if not args.lengths and (len(PROMPTS) * GROUP) % args.micro_batch_size:
        p.error(f"--micro-batch-size must divide {len(PROMPTS) * GROUP} rows (TRL's gradient accumulation)")
    if args.side:
        return child(args)
    if args.lengths:
        return compare(args, ("padded", "packed"), summarize_lengths)
    if importlib.util.find_spec("trl") is None:
        import torch
        print("bench/grpo_step.py times rlmt against TRL's GRPOTrainer, and trl is not installed: nothing to do.\n"
              f"Install it without replacing torch:  pip install trl \"torch=={torch.__version__.split('+')[0]}\"\n"
              "(a benchmark dependency only; rlmt itself does not need it)")
        return
    compare(args, ("rlmt", "trl"), summarize_trl)


def compare(args, sides, summarize):
    """Each side in its own process, the sides alternating --repeat times; then summarize(args, quiet, res):
    res {side: [results]}, quiet: the same without the runs a busy neighbour disturbed (all of them when no
    side has a quiet run, with a warning)."""
    os.makedirs(args.workdir, exist_ok=True)
    build(args.workdir)  # once, before any timing
    res = {side: [] for side in sides}
    for r in range(args.repeat):
        for side in sides:
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side] + sys.argv[1:]
            busy0, kids0, t0 = cpu_busy_s(), children_cpu_s(), time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True)
            others = (cpu_busy_s() - busy0 - (children_cpu_s() - kids0)) / (time.perf_counter() - t0)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode or line is None:
                sys.exit(f"{side} run failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
            res[side].append(dict(json.loads(line[len("RESULT "):]), others=others))
            one = res[side][-1]
            print(f"run {r + 1} {side:6s}: steps " + ", ".join(f"{t:.2f}" for t in one["times"]) +
                  " s (generation " + ", ".join(f"{t:.2f}" for t in one["t_gen"]) +
                  f" s); peak RSS {one['peak_mb']:.0f} MB, {one['peak_mb'] - one['base_mb']:.0f} MB above setup; "
                  f"other processes used {others:.1f} cores", flush=True)
    quiet = {side: [one for one in runs if one["others"] < args.quiet] for side, runs in res.items()}
    if all(quiet.values()):
        print(f"summary of the quiet runs (other processes below {args.quiet} cores): "
              + ", ".join(f"{len(quiet[side])} {side}" for side in sides) + f" of {args.repeat} each")
    else:
        quiet = res
        print(f"WARNING: no quiet run on at least one side (other processes used >= {args.quiet} cores); "
              "the summary mixes in contended runs and is not a fair comparison: rerun on an idle machine")
    summarize(args, quiet, res)


def summarize_trl(args, quiet, res):
    import torch
    import transformers
    first = res["trl"][0]
    tokens = len(PROMPTS) * GROUP * NEW_TOKENS
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, trl {first['trl']}, "
          f"{first['threads']} threads (rlmt {res['rlmt'][0]['threads']}); prompts of "
          f"{res['rlmt'][0]['prompt_lens']} tokens (TRL {first['prompt_lens']})")
    print(f"one step: {len(PROMPTS)} prompts x {GROUP} samples x {NEW_TOKENS} new tokens = {tokens} tokens, "
          f"micro-batches of {args.micro_batch_tokens} tokens (rlmt) / {args.micro_batch_size} rows (TRL); "
          f"{args.steps} timed steps x {args.repeat} processes per side")
    print(f"  {'':18s} {'fastest':>8s} {'median':>8s} {'tok/s':>7s} {'generation':>10s} {'the rest':>9s} "
          f"{'peak RSS':>9s} {'above setup':>11s}")
    summary = {}
    for side, name in [("rlmt", "rlmt"), ("trl", "TRL GRPOTrainer")]:
        times = [t for one in quiet[side] for t in one["times"]]
        gen = statistics.median(t for one in quiet[side] for t in one["t_gen"])
        rest = statistics.median(t - g for one in quiet[side] for t, g in zip(one["times"], one["t_gen"]))
        peak = max(one["peak_mb"] for one in res[side])
        above = max(one["peak_mb"] - one["base_mb"] for one in res[side])
        summary[side] = min(times), statistics.median(times), gen, rest, peak, above
        print(f"  {name:18s} {min(times):7.2f}s {statistics.median(times):7.2f}s {tokens / min(times):7.0f} "
              f"{gen:9.2f}s {rest:8.2f}s {peak:6.0f} MB {above:8.0f} MB")
    (f_r, m_r, g_r, r_r, p_r, a_r), (f_t, m_t, g_t, r_t, p_t, a_t) = summary["rlmt"], summary["trl"]
    print(f"  ratio (TRL / rlmt): {f_t / f_r:.2f}x fastest, {m_t / m_r:.2f}x median (generation {g_t / g_r:.2f}x, "
          f"the rest {r_t / r_r:.2f}x); peak RSS {p_t / p_r:.2f}x ({a_t / max(a_r, 1):.2f}x above setup)")
    print("  (medians per step over the summarized runs; \"the rest\": reward, reference and policy log-probs, "
          "backward, optimizer, trainer overhead; peak RSS: the largest of all runs)")


if __name__ == "__main__":
    main()
