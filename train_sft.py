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

import torch

from rlmt import batching, chat, cli, data, dist, log, loop, losses, optim, preflight
from rlmt.logprobs import packed_logprobs

# --- CLI ------------------------------------------------------------------------------------------------

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
cli.add_run_args(p, "conversations", out="output folder: metrics, checkpoints",  # --model ... --resume --demo
                 data="SFT conversations: JSONL, JSON or Parquet ({'messages'} rows ending with an assistant turn)")
cli.add_offline_args(p)  # --batch-size --warmup --max-len --stop-after: as in DPO
p.set_defaults(out="runs/sft", epochs=2.0, lr=4e-6, weight_decay=1e-4, save_every=200, max_len=20000)
# --max-len 20,000: the authors' SFT script, so that long traces keep their answer and end-of-turn token
args = p.parse_args()

if args.demo:
    from rlmt import demo
    demo.apply_sft_defaults(args, p)
checkpointing = preflight.memory_check(args, p, "sft")  # --plan prints and exits; a GPU run that cannot fit stops here
for flag in ("model", "data"):
    if not getattr(args, flag):
        p.error(f"--{flag} is required (or use --demo)")

# Batch arithmetic and the data, checked before any model loads.
world = int(os.environ.get("WORLD_SIZE", 1))
if args.batch_size % world:
    p.error(f"--batch-size {args.batch_size} must be divisible by the number of ranks {world}")
if args.max_len < 2:
    p.error("--max-len must be at least 2")
preflight.resume_state(args)  # a bad --resume fails here, before any model loads
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

policy, export_dtype = cli.trained_model(args.model, args, device, dtype, checkpointing)  # fp32 masters
pad_id = chat.pad_id(tokenizer)

opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
run = loop.Run(args, {"policy": policy}, {"policy": opt}, {"policy": (policy, tokenizer, export_dtype)}, device,
               total_steps, "sft")  # resumes; logs, saves and stops on SIGTERM at the end of each step


def examples_for(step):
    """This rank's conversations at `step`: the step's slice of the shuffled data (batching.step_indices),
    split between the ranks by tokens (batching.balance)."""
    chunk = [examples[j] for j in batching.step_indices(len(examples), args.batch_size, step, args.seed)]
    return [chunk[j] for j in batching.balance([len(ids) for ids, _ in chunk], world)[rank]]


# --- loop -----------------------------------------------------------------------------------------------

for step in run.steps():
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
    run.skipped.update(stepped, step + 1, grad_norm)
    dt = time.perf_counter() - t0

    # log: one reduction over ranks (a mean, so the per-rank shares of the loss are scaled by world)
    metrics = log.reduce_metrics({
        "loss": loss_sum * world, "grad_norm": grad_norm, "skipped_steps": torch.tensor(float(run.skipped.total)),
        "assistant_tokens": count, **batching.metrics(lengths, plan, dt, world), "t_step": torch.tensor(dt)})
    metrics["lr"] = lr
    run.log(step + 1, metrics, postfix=dict(loss=f"{metrics['loss']:.4g}", lr=f"{lr:.3g}",
                                            tok_s=f"{metrics['train_tokens_per_s']:.3g}"))
    run.end_of_step(step + 1)  # save when due; on SIGTERM (any rank) save this step and exit 0

# --- save -----------------------------------------------------------------------------------------------

if args.demo and world == 1:  # sampling a sharded model needs every rank
    with torch.no_grad():
        for q in ("name three color?", "tell me about river?"):
            demo.show(policy.eval(), tokenizer, [{"role": "user", "content": q}])
run.finish(plot_keys=("loss",), policy="policy", state="state")
dist.cleanup()
