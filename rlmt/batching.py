"""Which units a step trains on, and how they are cut: the step's data order (`step_indices`), and
micro-batches by a token budget, the same number of them on every rank.

A training step's units (rollout samples, DPO pairs, SFT conversations) are cut into micro-batches of at
most `max_tokens` tokens: units sorted longest first, each put into the first micro-batch with room for
it (first-fit decreasing), so long and short ones share micro-batches and their number is close to
total / max_tokens. Each micro-batch is then one packed row (rlmt.logprobs.packed_logprobs): its sequences
end to end, no padding computed. A unit longer than the budget gets a micro-batch of its own.

Under FSDP every forward and backward gathers and reduces weights, a collective, so every rank must run
the same number of passes: `micro_batches` agrees on the busiest rank's count and gives the others empty
micro-batches, one-token passes whose gradient is 0. Where a step's units are not yet split between
ranks (SFT, DPO: a slice of one shuffled list), `balance` splits them by tokens, so that the busiest rank
is as light as it can be; rollout samples stay on the rank that sampled them.

The loss normalization does not depend on any of this: it divides by the step's global count
(losses.aggregate), computed before the first micro-batch.
"""

import numpy as np
import torch


def step_indices(n, per_step, step, seed):
    """The units of `step` among n: epoch-wise shuffles (seed + epoch), a slice of `per_step` a step, the
    tail of an epoch that fills no step left out. -> [per_step indices]. A function of the step alone, so
    resuming needs nothing but the step (the online trainers' prompts, SFT's conversations, DPO's pairs)."""
    epoch, i = divmod(step, n // per_step)
    order = np.random.RandomState(seed + epoch).permutation(n)
    return order[i * per_step:(i + 1) * per_step].tolist()


def plan(lengths, max_tokens, max_rows=None):
    """Units grouped into micro-batches by tokens.

    lengths: tokens of each unit (ints) -> [[unit indices, increasing]]: each micro-batch holds at most
    `max_tokens` tokens (or one unit that is longer) and at most `max_rows` units (None: no cap); the
    largest micro-batches come first. Deterministic: equal lengths go in index order."""
    if max_tokens < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError(f"max_tokens ({max_tokens}) and max_rows ({max_rows}) must be at least 1")
    bins, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        j = next((j for j in range(len(bins)) if used[j] + n <= max_tokens
                  and (max_rows is None or len(bins[j]) < max_rows)), None)
        if j is None:
            bins.append([])
            used.append(0)
            j = len(bins) - 1
        bins[j].append(i)
        used[j] += n
    return [sorted(b) for b in bins]


def mini_batches(rows, group_size, n):
    """A rollout's rows (prompt-major, `group_size` samples a prompt) split into `n` optimizer steps ->
    [[row indices]]: mini-batch k holds the groups g with g % n == k, whole. Strided, so it holds the same
    prompts whatever the number of ranks: a rank's prompts are a contiguous slice of the step's whose
    length is a multiple of n (rlmt.preflight.check), and g % n is then the same locally and globally."""
    return [[g * group_size + j for g in range(k, rows // group_size, n) for j in range(group_size)]
            for k in range(n)]


def micro_batches(lengths, max_tokens, max_rows=None, device=None, among=None):
    """`plan`, then empty micro-batches ([]) appended until this rank has as many as the busiest one: one
    all-reduce, so every rank must call it. device: where the collective's tensor lives (the process
    group's: cuda under NCCL). among: plan only these units (indices into lengths; PPO's mini-batch).
    -> [[unit indices into lengths, increasing]], the same number of micro-batches on every rank."""
    from rlmt import dist
    among = list(range(len(lengths))) if among is None else list(among)
    mine = [sorted(among[i] for i in mb) for mb in plan([lengths[j] for j in among], max_tokens, max_rows)]
    n = int(dist.all_reduce_max(torch.tensor(len(mine), device=device)))
    return mine + [[] for _ in range(n - len(mine))]


def balance(lengths, world):
    """Units split between `world` ranks by tokens: longest first, each to the rank with the fewest tokens
    so far (ties: the lowest rank) -> one list of unit indices per rank, each increasing. A pure function
    of the lengths, so every rank computes the same split; with at least `world` units no rank is empty."""
    ranks, load = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        ranks[r].append(i)
        load[r] += int(lengths[i])
    return [sorted(r) for r in ranks]


def pad_frac(lengths, micro):
    """Share of the positions the micro-batches compute that are padding: a packed micro-batch computes
    its units' tokens and nothing else, an empty one (a pass that joins the busier ranks' collectives)
    one stand-in token. lengths: tokens of each unit; micro: micro_batches' answer. -> float."""
    real = sum(int(lengths[i]) for mb in micro for i in mb)
    return 1.0 - real / max(1, real + sum(1 for mb in micro if not mb))


def metrics(lengths, micro, seconds, world=1):
    """The step's micro-batching for metrics.jsonl, as 0-d tensors (log.reduce_metrics averages them over
    ranks): pad_frac, n_micro (micro-batches a rank runs in one pass over its units), train_tokens_per_s
    (the tokens of this rank's units per second of training, `seconds`, × world so that the average over
    ranks is the total)."""
    real = sum(int(lengths[i]) for mb in micro for i in mb)
    return {"pad_frac": torch.tensor(pad_frac(lengths, micro)), "n_micro": torch.tensor(float(len(micro))),
            "train_tokens_per_s": torch.tensor(real / max(seconds, 1e-9) * world)}
