"""Warm start: supervised fine-tuning on thinking traces, the loss on assistant tokens only.

    torchrun --nproc_per_node 8 train_sft.py --model llama-3.1-8b-instruct --data sft.jsonl --out runs/sft
    python train_sft.py --demo          # a tiny model learns the thinking format on the CPU, ~1 minute

Data: {"messages": [..., {"role": "assistant", "content": "<think>\\n{thought}\\n</think>\\n\\n{answer}"}]}
rows, RLMT's warm-start format (DESIGN.md). Each conversation is rendered with the model's own chat
template; the loss mask is read off the template rendered prefix by prefix (rlmt.data.encode_sft), so it
covers the assistant turns and their end-of-turn token and nothing else: no system, user or header token.

One step: --batch-size conversations (all ranks together); -log π of every assistant token is summed and
divided once by the step's assistant-token count over all micro-batches and ranks, a token mean for the
whole step whatever the micro-batching. AdamW betas (0.9, 0.95), weight decay 1e-4, lr 4e-6 with 10%
linear warmup then cosine decay to zero, 2 epochs, gradient norm clipped to 1.0.

A step's conversations are split between ranks by tokens, and each rank's are packed end to end into
micro-batches of at most --micro-batch-tokens tokens (rlmt.batching), positions restarting at 0 and no
attention between conversations: no padding is computed, and the loss per token is what each conversation
gets alone. What is simplified: a conversation longer than --max-len is cut at the end (the count is
printed).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from rlmt import batching, chat, checkpoint, cli, data, dist, log, losses, model as M, optim
from rlmt.logprobs import packed_logprobs

# --- CLI ------------------------------------------------------------------------------------------------

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", help="starting model: folder, hub id or alias (e.g. llama-3.1-8b-instruct)")
p.add_argument("--data", help="SFT conversations, JSONL or JSON ({'messages'} rows ending with an assistant turn)")
p.add_argument("--out", default="runs/sft", help="output folder: metrics, checkpoints")
p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
p.add_argument("--epochs", type=float, default=2.0, help="passes over the data when --steps is unset")
p.add_argument("--batch-size", type=int, default=16, help="conversations per optimizer step, all ranks together")
p.add_argument("--lr", type=float, default=4e-6, help="peak AdamW learning rate")
p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warmup (then cosine)")
p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
p.add_argument("--max-len", type=int, default=20000,
               help="tokens per conversation, cut at the end (the authors' SFT script: 20,000, so that long traces "
                    "keep their answer and end-of-turn token)")
cli.add_precision_args(p)  # --dtype, --save-dtype, --max-skipped-steps: as in GRPO and PPO
cli.add_memory_args(p, "conversations")  # --micro-batch-tokens / -size, --activation-checkpointing, --plan
p.add_argument("--seed", type=int, default=0, help="seed for the data order")
p.add_argument("--stop-after", type=int, help="end this run after step N, saving (the lr schedule still spans "
               "the whole run; --resume continues it), e.g. to fit a job time limit")
cli.add_checkpoint_args(p, save_every=200)  # --save-every --keep-last --resume --dist-timeout: as in GRPO and PPO
cli.add_log_args(p)  # --wandb: as in GRPO and PPO
p.add_argument("--demo", action="store_true", help="tiny offline CPU demo (builds its own model and data)")
args = p.parse_args()

if args.demo:
    from rlmt import demo
    demo.apply_sft_defaults(args, p)
checkpointing = cli.memory_check(args, p, "sft")  # --plan prints and exits; a GPU run that cannot fit stops here
for flag in ("model", "data"):
    if not getattr(args, flag):
        p.error(f"--{flag} is required (or use --demo)")

# Batch arithmetic and the data, checked before any model loads.
world = int(os.environ.get("WORLD_SIZE", 1))
if args.batch_size % world:
    p.error(f"--batch-size {args.batch_size} must be divisible by the number of ranks {world}")
if args.max_len < 2:
    p.error("--max-len must be at least 2")
resume_from = cli.resume_state(args)  # the state folder to load, or None; a bad --resume fails here
try:
    rows = data.load_sft(args.data)
    tokenizer = chat.load_tokenizer(args.model)
    examples, n_cut = [], 0
    for r in rows:
        try:
            ids, mask = data.encode_sft(tokenizer, r["messages"])
        except ValueError as e:
            raise data.DataError(f"{args.data}: row {r['id']!r}: {e}") from None
        n_cut += len(ids) > args.max_len
        examples.append((ids[:args.max_len], mask[:args.max_len]))
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
empty = sum(1 for _, m in examples if not any(m))
examples = [e for e in examples if any(e[1])]  # cut before the first assistant token: nothing to learn
if len(examples) < args.batch_size:
    sys.exit(f"error: {args.data} has {len(examples)} usable conversations, fewer than --batch-size {args.batch_size}")
steps_per_epoch = len(examples) // args.batch_size
total_steps = args.steps or max(1, int(args.epochs * steps_per_epoch))

# --- init -----------------------------------------------------------------------------------------------

rank, world, device = dist.init(timeout=cli.dist_timeout(args))
torch.manual_seed(args.seed)
dtype = cli.torch_dtype(args.dtype, device)
os.makedirs(args.out, exist_ok=True)
if dist.is_main():
    print(f"sft: {len(examples)} conversations, {sum(sum(m) for _, m in examples):,} assistant tokens; "
          f"{n_cut} cut at --max-len {args.max_len}, {empty} dropped (nothing left to learn); "
          f"{total_steps} steps of {args.batch_size}")

# --- model and optimizer --------------------------------------------------------------------------------

try:
    policy = M.from_pretrained(args.model)  # in the checkpoint's dtype; shard() makes the fp32 masters
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
export_dtype = cli.save_dtype(args, policy)
policy.gradient_checkpointing = checkpointing
policy = dist.shard(policy, device, dtype).train()
pad_id = chat.pad_id(tokenizer)

opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
skipped = optim.SkippedSteps(args.max_skipped_steps)
start, skipped.total = cli.resume(args, resume_from, {"policy": policy}, {"policy": opt})
tb = log.tensorboard(args.out) if dist.is_main() else None
wb = log.wandb(args) if dist.is_main() else None  # --wandb PROJECT, else None
preemption = checkpoint.Preemption(device)  # SIGTERM: save at the end of the step, exit 0


def examples_for(step):
    """This rank's conversations at `step`: epoch-wise shuffles, a slice per step, split between the ranks
    by tokens (batching.balance). A function of the step alone, so resuming needs nothing but the step."""
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.RandomState(args.seed + epoch).permutation(len(examples))
    chunk = [examples[j] for j in order[i * args.batch_size:(i + 1) * args.batch_size]]
    return [chunk[j] for j in batching.balance([len(ids) for ids, _ in chunk], world)[rank]]


def save(step):
    checkpoint.save(args.out, step, {"policy": policy}, {"policy": opt},
                    {"step": step, "skipped_steps": skipped.total, "args": vars(args)},
                    exports={"policy": (policy, tokenizer, export_dtype)}, keep_last=args.keep_last)


# --- loop -----------------------------------------------------------------------------------------------

end = min(total_steps, args.stop_after or total_steps)
bar = tqdm(range(start, end), initial=start, total=total_steps, disable=not dist.is_main(),
           desc="sft", dynamic_ncols=True)
for step in bar:
    t0 = time.perf_counter()
    lr = optim.cosine_lr(step, total_steps, args.lr, args.warmup)
    optim.set_lr(opt, lr)
    mine = examples_for(step)
    lengths = [len(ids) for ids, _ in mine]
    # the step's assistant tokens, all ranks
    count = dist.all_reduce_sum(torch.tensor(float(sum(sum(m) for _, m in mine)), device=device))
    plan = batching.micro_batches(lengths, args.micro_batch_tokens, args.micro_batch_size, device)
    loss_sum = torch.zeros((), device=device)
    for group in plan:  # []: a pass that joins the busier ranks' collectives, nothing in the loss
        mb = {k: v.to(device) for k, v in data.sft_batch([mine[i] for i in group], pad_id).items()}
        logp, _ = packed_logprobs(policy, mb, mb["loss_mask"])
        # Σ −log π over assistant tokens / the step's count; × world undoes FSDP's mean over ranks
        loss = losses.aggregate(-logp, mb["loss_mask"], "token-mean", count=count)
        (loss * world).backward()
        loss_sum += loss.detach()
    grad_norm, stepped = optim.step(policy, opt, args.grad_clip)  # skipped when the norm is NaN/inf
    skipped.update(stepped, step + 1, grad_norm)
    dt = time.perf_counter() - t0

    # log: one reduction over ranks (a mean, so the per-rank shares of the loss are scaled by world)
    metrics = log.reduce_metrics({
        "loss": loss_sum * world, "grad_norm": grad_norm, "skipped_steps": torch.tensor(float(skipped.total)),
        "assistant_tokens": count, **batching.metrics(lengths, plan, dt, world), "t_step": torch.tensor(dt)})
    metrics["lr"] = lr
    if dist.is_main():
        log.log_step(args.out, step + 1, metrics, (), tb, wb)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{lr:.3g}", tok_s=f"{metrics['train_tokens_per_s']:.3g}")
    skipped.check(step + 1)  # after the log, so metrics.jsonl shows the bad norms

    # save; on SIGTERM (any rank) this step too, then exit
    due = (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == end
    if due:
        save(step + 1)
    if step + 1 < end and preemption.requested():
        if not due:
            save(step + 1)
        preemption.stop(step + 1, args.out)

# --- save -----------------------------------------------------------------------------------------------

if args.demo and world == 1:  # sampling a sharded model needs every rank
    with torch.no_grad():
        for q in ("name three color?", "tell me about river?"):
            demo.show(policy.eval(), tokenizer, [{"role": "user", "content": q}])
if dist.is_main():
    latest = os.path.join(args.out, checkpoint.LATEST)
    print(f"metrics: {os.path.join(args.out, 'metrics.jsonl')}\npolicy:  {os.path.join(latest, 'policy')}"
          f"\nstate:   {os.path.join(latest, 'state')}")
if wb is not None:
    wb.finish()
dist.cleanup()
