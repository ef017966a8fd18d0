"""Offline preference learning: DPO on pairs the starting model sampled itself.

    # 1. pairs: 8 samples per prompt at T 0.7, the answers scored, best vs worst (resumable)
    torchrun --nproc_per_node 8 train_dpo.py --build-pairs --model llama-3.1-8b-instruct --template think \\
        --strict --reward-model skywork-reward-llama-3.1-8b-v0.2 --data prompts.jsonl --out pairs.jsonl
    # 2. DPO on them (or give prompts and a reward as --data to do both in one run)
    torchrun --nproc_per_node 8 train_dpo.py --model llama-3.1-8b-instruct --data pairs.jsonl --out runs/dpo
    python train_dpo.py --demo          # a tiny model on the CPU, no network, ~1 minute

Pairs (rlmt.pairs, DESIGN.md): among the parseable samples of a prompt, chosen = the highest reward-model
score of the answer (the thought is never scored), rejected = the lowest; prompts with fewer than 4
parseable samples, tied scores, or a pair longer than 8,192 tokens are dropped. Each pair keeps the exact
sampled token ids, which training uses (a preference file with text only is tokenized instead).

DPO (Rafailov et al. 2023): with h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)),
loss −log σ(β h), β 0.1 (`--loss ipo` uses length-averaged log-probs, `hinge` is SLiC's). The reference
is the starting model (or --ref-model); its log-probs are computed once, before training, by the same
function that computes the policy's (rlmt.pairs.pair_logps), so at step 1 h = 0 and the loss is ln 2.
One forward over [chosen; rejected] per micro-batch; the loss is summed over pairs and divided once by
the step's pair count. AdamW (0.9, 0.95), wd 1e-4, lr 3e-7, 5% warmup then cosine, 2 epochs, batch 128,
sequences cut to 4,096 tokens (prompt from the left first; a completion is never cut to empty).
Metrics: loss, reward_margin (mean β h), reward_accuracy (fraction with h > 0; noise at step 1, where
h = 0), chosen_logp / rejected_logp (the policy's mean summed log-probs; per token under ipo). Chosen
log-probs falling while the margin grows is common in DPO, not a bug.
"""

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from rlmt import batching, chat, cli, data, dist, log, loop, losses, model as M, optim, pairs, preflight, reward

# --- CLI ------------------------------------------------------------------------------------------------

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
cli.add_run_args(p, "pairs", data="pairs ({'prompt', 'chosen', 'rejected'} rows), or prompts to build pairs from",
                 out="output folder (with --build-pairs: the pairs file, or a folder)")  # --model ... --resume --demo
cli.add_offline_args(p)  # --batch-size --warmup --max-len --stop-after: as in SFT
cli.add_sampling_args(p)  # --reward-model --template --group-size --temperature ...: for building pairs
p.add_argument("--build-pairs", action="store_true", help="only build pairs from the --data prompts, then stop")
p.add_argument("--min-parseable", type=int, default=4, help="drop prompts with fewer parseable samples")
p.add_argument("--max-pair-len", type=int, default=8192, help="drop pairs whose longer sequence exceeds this")
p.add_argument("--chunk-prompts", type=int, default=64, help="prompts sampled between appends to the pairs file")
p.add_argument("--ref-model", help="DPO reference (default: --model, the starting policy)")
p.add_argument("--loss", default="sigmoid", choices=losses.DPO_KINDS, help="DPO loss kind")
p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
p.set_defaults(out="runs/dpo", template="think", max_prompt_len=1024, epochs=2.0, batch_size=128, lr=3e-7,
               warmup=0.05, weight_decay=1e-4, save_every=50)
args = p.parse_args()

if args.demo:
    from rlmt import demo
    demo.apply_dpo_defaults(args, p)
checkpointing = preflight.memory_check(args, p, "dpo")  # --plan prints and exits; a GPU run that cannot fit stops here
for flag in ("model", "data"):
    if not getattr(args, flag):
        p.error(f"--{flag} is required (or use --demo)")

# What --data holds decides the work: prompts are sampled into pairs first, pairs are trained on.
world = int(os.environ.get("WORLD_SIZE", 1))
try:
    records = data.read_records(args.data)
    is_pairs = any(k in records[0][1] for k in ("chosen", "rejected"))  # a broken pair row is still a pair row
    if args.build_pairs and is_pairs:
        raise data.DataError(f"{args.data}: already holds pairs; --build-pairs needs prompts")
    build = not is_pairs
    if build:
        if not args.reward_model and not args.reward_fn:
            raise data.DataError(f"{args.data}: prompts, not pairs (no \"chosen\"/\"rejected\"); give --reward-model "
                                 "and/or --reward-fn to build pairs from them, or a pairs file")
        prompt_rows = data.load_prompts(args.data)
        reward_fn = reward.load_reward_fn(args.reward_fn) if args.reward_fn else None
    else:
        pair_rows = data.load_pairs(args.data)
except (ValueError, FileNotFoundError, ImportError, AttributeError) as e:
    sys.exit(f"error: {e}")
pairs_path = args.out if args.build_pairs and args.out.endswith(".jsonl") else os.path.join(args.out, "pairs.jsonl")
if build and args.temperature <= 0:
    p.error("--temperature must be > 0 to sample pairs")
if args.batch_size % world:
    p.error(f"--batch-size {args.batch_size} must be divisible by the number of ranks {world}")
if args.max_len < 2:
    p.error("--max-len must be at least 2")
preflight.resume_state(args)  # a bad --resume fails here, before any model loads

# --- init -----------------------------------------------------------------------------------------------

rank, world, device = dist.init(timeout=cli.dist_timeout(args))
torch.manual_seed(args.seed)
dtype = cli.torch_dtype(args.dtype, device)
os.makedirs(os.path.dirname(os.path.abspath(pairs_path)) if args.build_pairs else args.out, exist_ok=True)

try:
    tokenizer = chat.load_tokenizer(args.model)
    if build or any(r["ids"] is None for r in pair_rows):  # a template/tokenizer mismatch fails here
        chat.render(tokenizer, prompt_rows[0]["messages"] if build else pair_rows[0]["prompt"], args.template)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
policy, export_dtype = cli.trained_model(args.model, args, device, dtype, checkpointing)  # fp32 masters

# --- pairs: sample, score, select (skipped for prompts already done) -------------------------------------

if build:
    rm = reward.RewardModel(args.reward_model, device=device, dtype=dtype,  # it reads the whole (prompt, answer)
                            max_len=args.max_prompt_len + args.max_new_tokens) if args.reward_model else None
    counts = pairs.build_pairs(policy, tokenizer, prompt_rows, pairs_path, template=args.template, rm=rm,
                               reward_fn=reward_fn, group_size=args.group_size, temperature=args.temperature,
                               top_p=args.top_p, max_prompt_len=args.max_prompt_len,
                               max_new_tokens=args.max_new_tokens, strict=args.strict,
                               min_valid=args.min_parseable, max_pair_len=args.max_pair_len, seed=args.seed,
                               chunk_prompts=args.chunk_prompts, batch_size=args.sample_batch_size,
                               gpu_memory_utilization=args.gpu_memory_utilization,
                               progress=dist.is_main())
    del rm
    if dist.is_main():
        print(f"pairs: {counts['pairs']} new, {counts['skipped']} prompts already done; dropped "
              + ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in pairs.DROP_REASONS)
              + f"\npairs file: {pairs_path}\ndropped:    {pairs.dropped_path(pairs_path)}")
    if args.build_pairs:
        dist.cleanup()
        sys.exit(0)
    dist.barrier()
    try:
        pair_rows = data.load_pairs(pairs_path)
    except ValueError as e:
        sys.exit(f"error: no pairs to train on ({e})")

# --- encode: exact token ids, each pair cut to --max-len ---------------------------------------------------

vocab = policy.config.vocab_size
encoded, n_cut = [], 0
for r in pair_rows:
    ids = data.encode_pair(tokenizer, r, args.template)
    if max(max(x) for x in ids) >= vocab:
        sys.exit(f"error: pair {r['id']!r} holds token ids beyond the model's vocabulary ({vocab}); were the pairs "
                 "sampled from another model? drop the *_ids fields to re-tokenize the text")
    *ids, cut = data.truncate_pair(*ids, args.max_len, tokenizer.bos_token_id)
    encoded.append(tuple(ids))
    n_cut += cut
if len(encoded) < args.batch_size:
    sys.exit(f"error: {len(encoded)} pairs, fewer than --batch-size {args.batch_size}; sample more prompts or "
             "lower --batch-size")
steps_per_epoch = len(encoded) // args.batch_size
total_steps = args.steps or max(1, int(args.epochs * steps_per_epoch))
pad_id = chat.pad_id(tokenizer)
if dist.is_main():
    print(f"dpo: {len(encoded)} pairs ({n_cut} cut to --max-len {args.max_len}), {total_steps} steps of "
          f"{args.batch_size}, loss {args.loss}, beta {args.beta}")

# --- reference log-probs, once, through the function that computes the policy's --------------------------


def batch_of(idx):
    """The pairs `idx` as one [chosen; rejected] batch on the device (rlmt.pairs.pair_batch)."""
    return {k: v.to(device) if torch.is_tensor(v) else v
            for k, v in pairs.pair_batch([encoded[i] for i in idx], pad_id).items()}


ref = policy if not args.ref_model else dist.shard(M.from_pretrained(args.ref_model, dtype=dtype), device, dtype,
                                                  train=False)
ref_logps = torch.zeros(len(encoded), 2, device=device)  # [pairs, (chosen, rejected)] summed log-probs
ref_counts = torch.zeros(len(encoded), 2, device=device)
pair_len = [2 * len(p_) + len(c) + len(r) for p_, c, r in encoded]  # a pair's tokens: both sequences
share = batching.balance(pair_len, world)[rank]  # each rank a share; the sum over ranks fills every row
# One plain copy in the compute dtype for the whole pass, as for a rollout (dist.full_copy): no collective
# inside, so ranks may run different numbers of forwards, and no FSDP module is left unsharded after it.
with dist.full_copy(ref) as ref_model, torch.no_grad():
    for group in tqdm(batching.plan([pair_len[i] for i in share], args.micro_batch_tokens, args.micro_batch_size),
                      desc="reference", disable=not dist.is_main(), dynamic_ncols=True):
        idx = [share[j] for j in group]
        lp, n = pairs.pair_logps(ref_model, batch_of(idx))  # the k chosen, then the k rejected
        ref_logps[idx] = torch.stack((lp[:len(idx)], lp[len(idx):]), dim=1)
        ref_counts[idx] = torch.stack((n[:len(idx)], n[len(idx):]), dim=1)
ref_logps, ref_counts = dist.all_reduce_sum(ref_logps), dist.all_reduce_sum(ref_counts)
del ref
policy.train()

# --- optimizer ------------------------------------------------------------------------------------------

opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
# after the reference pass, which needed the starting weights: resume, then log, save, stop on SIGTERM each step
run = loop.Run(args, {"policy": policy}, {"policy": opt}, {"policy": (policy, tokenizer, export_dtype)}, device,
               total_steps, "dpo")


def pairs_for(step):
    """This rank's pair indices at `step`: the step's slice of the shuffled pairs (batching.step_indices),
    split between the ranks by tokens (batching.balance: every rank computes the same split)."""
    chunk = batching.step_indices(len(encoded), args.batch_size, step, args.seed)
    return [chunk[j] for j in batching.balance([pair_len[i] for i in chunk], world)[rank]]


# --- loop -----------------------------------------------------------------------------------------------

for step in run.steps():
    t0 = time.perf_counter()
    lr = optim.cosine_lr(step, total_steps, args.lr, args.warmup)
    optim.set_lr(opt, lr)
    stats = []
    mine = pairs_for(step)
    lengths = [pair_len[i] for i in mine]
    plan = batching.micro_batches(lengths, args.micro_batch_tokens, args.micro_batch_size, device)
    for group in plan:  # []: a pass that joins the busier ranks' collectives
        idx = [mine[j] for j in group]
        logps, counts = pairs.pair_logps(policy, batch_of(idx))
        ref_lp, ref_n = ref_logps[idx], ref_counts[idx]
        if args.loss == "ipo":  # IPO is defined on length-averaged log-probs
            logps, ref_lp = logps / counts.clamp(min=1), ref_lp / ref_n.clamp(min=1)
        chosen, rejected = logps[:len(idx)], logps[len(idx):]
        loss, pm = losses.dpo_loss(chosen, rejected, ref_lp[:, 0], ref_lp[:, 1], args.beta, args.loss)
        # summed over pairs, divided by the step's pair count; × world undoes FSDP's mean over ranks
        (loss.sum() / args.batch_size * world).backward()
        pm.update(loss=loss.detach().mean(), chosen_logp=chosen.detach().mean(),
                  rejected_logp=rejected.detach().mean())
        stats.append((pm, len(idx)))
    grad_norm, stepped = optim.step(policy, opt, args.grad_clip)  # skipped when the norm is NaN/inf
    run.skipped.update(stepped, step + 1, grad_norm)
    dt = time.perf_counter() - t0

    # log: each micro-batch's means weighted by its pairs, over every rank (ranks may hold different numbers)
    metrics = log.step_mean(stats)
    metrics.update(grad_norm=grad_norm, skipped_steps=torch.tensor(float(run.skipped.total)), t_step=torch.tensor(dt),
                   **batching.metrics(lengths, plan, dt, world))
    metrics = log.reduce_metrics(metrics)
    metrics["lr"] = lr
    run.log(step + 1, metrics, postfix=dict(loss=f"{metrics['loss']:.4g}", margin=f"{metrics['reward_margin']:.3g}",
                                            acc=f"{metrics['reward_accuracy']:.2f}", lr=f"{lr:.3g}",
                                            tok_s=f"{metrics['train_tokens_per_s']:.3g}"))
    run.end_of_step(step + 1)  # save when due; on SIGTERM (any rank) save this step and exit 0

# --- save -----------------------------------------------------------------------------------------------

if args.demo and build and world == 1:  # sampling a sharded model needs every rank
    demo.dpo_report(policy, tokenizer, pairs_path, args)
run.finish(plot_keys=("reward_margin", "reward_accuracy"), policy="policy", state="state")
dist.cleanup()
