"""On-policy DPO pairs: sample n answers per prompt from the starting model, score the answers only, keep
the best against the worst; and the one function that turns a batch of pairs into log-probs, used alike
for the policy and the reference.

RLMT's DPO (DESIGN.md): 8 samples per prompt at T 0.7; the reward model sees the user turn and the answer
(never the thought); among the parseable samples (the template's format split cleanly,
chat.split_answer) chosen = highest score, rejected = lowest. A prompt is dropped when fewer than 4
samples parse, when every parseable sample scores the same (no preference to learn: common with rule
rewards, rare with a reward model's real-valued scores), or when the longer of the two sequences
(prompt + completion) exceeds 8,192 tokens.

The pairs file is appended to chunk by chunk, each pair with the exact sampled token ids and every
sample's score; the prompts that were dropped go to a sidecar file with the reason. A rerun skips every
prompt already in either file, so a crash costs at most one chunk.
"""

import json
import os

import torch
import torch.distributed as tdist

from rlmt import data, dist, rollout
from rlmt.logprobs import packed_logprobs

DROP_REASONS = ("too_few_parseable", "tie", "too_long")


def select_pair(rewards, ok, min_valid=4):
    """Best vs worst among the parseable samples of one prompt.

    rewards [G], ok [G] bool (the sample's format parsed) -> (chosen index, rejected index, None), or
    (None, None, reason) with reason "too_few_parseable" (fewer than min_valid parse) or "tie" (their
    scores are all equal). The first index wins a tie for the best or for the worst."""
    valid = [i for i in range(len(rewards)) if bool(ok[i])]
    if len(valid) < max(min_valid, 2):
        return None, None, "too_few_parseable"
    scores = [float(rewards[i]) for i in valid]
    best, worst = max(scores), min(scores)
    if best == worst:
        return None, None, "tie"
    return valid[scores.index(best)], valid[scores.index(worst)], None


def dropped_path(out_path):
    """Where the dropped prompts of `out_path` are listed: pairs.jsonl -> pairs.dropped.jsonl."""
    root, _ = os.path.splitext(out_path)
    return root + ".dropped.jsonl"


def _done_ids(path):
    """Ids already written to `path`. A last line cut short by a crash (no newline, invalid JSON) is
    removed, so appending continues from whole lines."""
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    ids, good = set(), []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            if k != len(lines) - 1:  # only the unfinished last line is ours to repair
                raise data.DataError(f"{path}:{k + 1}: not a pair row; is this file a pairs file?") from None
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(g + "\n" for g in good))
    return ids


def _append(path, rows):
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_pairs(policy, tokenizer, rows, out_path, *, template, rm=None, reward_fn=None, group_size=8,
                temperature=0.7, top_p=1.0, max_prompt_len=1024, max_new_tokens=4096, strict=False, min_valid=4,
                max_pair_len=8192, seed=0, chunk_prompts=64, batch_size=64, gpu_memory_utilization=0.9,
                progress=True):
    """Sample, score and select pairs for `rows` (load_prompts records), appending to `out_path`.

    Every rank must call it (under torchrun each chunk's prompts are split over ranks and the results
    gathered to rank 0, which writes). Sample k of the prompt at position j of `rows` draws from the
    seed (seed, j, k), so a rerun, a different chunk size or another number of ranks draws the same
    samples. Returns counts {"pairs", "skipped", and one per reason in DROP_REASONS} for this call.
    """
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise data.DataError(f"prompt id {dup!r} appears more than once; ids tell finished prompts apart on a "
                             "rerun, so they must be unique")
    rank, world = (tdist.get_rank(), tdist.get_world_size()) if tdist.is_initialized() else (0, 1)
    side = dropped_path(out_path)
    done = _done_ids(out_path) | _done_ids(side) if rank == 0 else set()
    if world > 1:  # every rank needs the same to-do list
        box = [sorted(done)]
        tdist.broadcast_object_list(box, src=0)
        done = set(box[0])
    todo = [j for j, r in enumerate(rows) if r["id"] not in done]
    counts = {"pairs": 0, "skipped": len(rows) - len(todo), **{k: 0 for k in DROP_REASONS}}
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="pairs", unit="prompt", dynamic_ncols=True)
    with dist.full_copy(policy) as rollout_model, torch.no_grad():  # plain weights in the compute dtype
        for c in range(0, len(todo), chunk_prompts):
            mine = todo[c:c + chunk_prompts][rank::world]
            local = []
            if mine:
                ro = rollout.rollout(rollout_model, tokenizer, [rows[j] for j in mine], template=template,
                                     group_size=group_size, rm=rm, reward_fn=reward_fn, max_prompt_len=max_prompt_len,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     strict=strict, seed=[(seed << 32) + j for j in mine], batch_size=batch_size,
                                     gpu_memory_utilization=gpu_memory_utilization)
                local = _select(ro, [rows[j] for j in mine], mine, group_size, template, min_valid, max_pair_len)
            elif rm is not None:
                rm.score([], [])  # a sharded reward model: join the other ranks' forwards
            if world > 1:
                gathered = [None] * world
                tdist.all_gather_object(gathered, local)
                local = [x for part in gathered for x in part]
            local.sort(key=lambda x: x[0])  # prompt order, whatever rank sampled it
            kept = [row for _, row, why in local if why is None]
            dropped = [row for _, row, why in local if why is not None]
            for _, _, why in local:
                counts["pairs" if why is None else why] += 1
            if rank == 0:
                _append(out_path, kept)
                _append(side, dropped)
                if bar is not None:
                    bar.update(len(local))
                    bar.set_postfix(kept=counts["pairs"], dropped=sum(counts[k] for k in DROP_REASONS))
            dist.barrier()
    if bar is not None:
        bar.close()
    return counts


def _select(ro, rows, positions, G, template, min_valid, max_pair_len):
    """[(position, row dict, drop reason or None)] for the prompts of one rollout."""
    b = ro.batch
    out = []
    for p, (row, j) in enumerate(zip(rows, positions)):
        g = slice(p * G, (p + 1) * G)
        # usable: the answer's delimiter was found (chat.parseable) and the sample wrote something (a sample
        # that is only its stop token has no text for a pair file)
        ok = ro.parseable[g] & torch.tensor([bool(t.strip()) for t in ro.texts[g]], dtype=torch.bool)
        rewards = ro.rewards[g]
        scores = [round(float(r), 6) if bool(o) else None for r, o in zip(rewards, ok)]
        base = {"n_parseable": int(ok.sum()), "scores": scores}
        c, r, why = select_pair(rewards, ok, min_valid)
        if why is None:  # the exact sampled tokens, read from the batch with the response mask
            prompt_ids = ro.prompt_ids[p]
            comp = [b["input_ids"][p * G + k][b["response_mask"][p * G + k].bool()].tolist() for k in (c, r)]
            length = len(prompt_ids) + max(map(len, comp))
            if length > max_pair_len:
                why, base["length"] = "too_long", length
        if why is not None:
            out.append((j, {"id": row["id"], **base, "reason": why}, why))
            continue
        out.append((j, {"id": row["id"], "prompt": row["messages"], "chosen": ro.texts[p * G + c],
                        "rejected": ro.texts[p * G + r], "chosen_score": float(rewards[c]),
                        "rejected_score": float(rewards[r]), **base, "template": template,
                        "prompt_ids": prompt_ids, "chosen_ids": comp[0], "rejected_ids": comp[1]}, None))
    return out


# ----------------------------------------------------------------------------- training batches

def pair_batch(pairs, pad_id):
    """k pairs [(prompt, chosen, rejected) ids] -> one batch of 2k rows, the k chosen then the k rejected,
    each after its prompt (rlmt.data.join: input_ids, attention_mask, position_ids, response_mask)."""
    prompts = [p for p, _, _ in pairs]
    return data.join(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs], pad_id)


def pair_logps(model, batch):
    """Summed log-probs of each completion of a pair_batch, and its token count.

    The same function gives the policy's (with grad) and the reference's (under no_grad, precomputed
    once or live): one forward over the 2k sequences packed end to end (chosen and rejected of a pair in
    the same micro-batch, so the DPO loss of the pair backpropagates at once), at temperature 1, the LM
    head only on completion tokens. Masked positions are zeroed with torch.where (padding never reaches
    the sum). Returns (logps [2k] fp32, n_tokens [2k] fp32): the k chosen, then the k rejected."""
    m = batch["response_mask"].bool()
    logp, _ = packed_logprobs(model, batch, m)
    total = torch.where(m, logp.float(), torch.zeros((), device=logp.device)).sum(1)
    return total, m.sum(1).float()
