"""Per-token log-probs and entropy of a batch's tokens through a model, in fp32, without a [B, T, V] fp32
tensor: the model's forward computes them chunk by chunk from its final hidden states
(rlmt.chunked.token_logprobs, which holds the arithmetic), and this module aligns them with the tokens.

`sequence_values` reads a PPO critic with the same alignment: position t belongs to token t.
`packed_logprobs` and `packed_values` give the same numbers for the rows of a padded batch laid end to end
in one row (no padding computed; rlmt.batching cuts a step into such micro-batches), returned in the
padded batch's layout, so the losses read them exactly as they read sequence_logprobs's.
"""

import torch

from rlmt.model import Segments


def sequence_logprobs(model, input_ids, attention_mask=None, position_ids=None, temperature=1.0,
                      with_entropy=False, start=0):
    """Log-probs of each token given the ones before it, through the model.

    input_ids, attention_mask, position_ids [B, T] -> (logp [B, T], entropy [B, T] or None), where
    position t holds log π(input_ids[t] | input_ids[:t]); position 0 has no context and is 0.
    Multiply by the response mask: only response positions are meaningful to the losses.
    start: positions t < start are returned as 0 and their logits are never computed (the trunk still
    reads every token). A rollout batch's responses all begin at its `prompt_len` column, so passing it
    skips the prompt's LM head, log-softmax and entropy, which the mask would drop anyway.
    """
    B, T = input_ids.shape
    if not 0 <= start <= T:
        raise ValueError(f"start={start} is outside the {T} positions of the batch")
    targets = torch.roll(input_ids, -1, dims=1)  # the target at t is the token at t+1
    # logp[:, t] is read from the hidden state at t − 1, so the head starts one position before `start`
    logp, ent = model(input_ids, attention_mask, position_ids, targets=targets, temperature=temperature,
                      with_entropy=with_entropy, logits_from=max(start - 1, 0))
    # shift right so that logp[:, t] belongs to input_ids[:, t]
    pad = logp.new_zeros(logp.shape[0], 1)
    logp = torch.cat([pad, logp[:, :-1]], dim=1)
    if ent is not None:
        ent = torch.cat([pad, ent[:, :-1]], dim=1)
    return logp, ent


def sequence_values(critic, input_ids, attention_mask=None, position_ids=None):
    """A critic's value of the state before each token, aligned like `sequence_logprobs`.

    critic: a "score"-head model (one scalar per position). input_ids, attention_mask, position_ids
    [B, T] -> values [B, T] fp32, where values[:, t] = V(input_ids[:t]), read from the hidden state at
    t − 1: the state in which the policy chose token t, so values[:, t] pairs with logp[:, t] (GAE's
    V(s_t) for action a_t). Position 0 has no state and is 0; multiply by the response mask.
    """
    v = critic(input_ids, attention_mask, position_ids).float()
    return torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)


def pack(batch, mask):
    """The rows of a padded batch laid end to end in one row, and where a loss reads them.

    batch: input_ids, attention_mask, position_ids [S, T], any padding (a rollout's left-padded prompts
    and right-padded responses, DPO pairs, right-padded SFT rows); mask [S, T]: the tokens a loss reads.
    Returns (ids [1, n], position_ids [1, n], Segments, at [S, T] bool, sel [k] long): the n real tokens
    row by row, each row's positions as the padded batch has them (restarting at 0); `at` the positions
    that get a log-prob (mask, minus each row's first token, which has no context in its row) and `sel`
    the same k tokens' places along the packed row, in the same (row-major) order.
    No rows, or rows without tokens (a micro-batch that only joins the other ranks' collectives): one
    token of id 0 stands in, so the forward and backward still run."""
    am = batch["attention_mask"].bool()
    at = mask.bool() & am & (am.cumsum(1) > 1)
    lengths = am.sum(1)
    device = am.device
    if not bool(lengths.any()):
        z = torch.zeros(1, 1, dtype=torch.long, device=device)
        return z, z, Segments.of([1], device), at, torch.zeros(0, dtype=torch.long, device=device)
    ids, pos = batch["input_ids"][am][None], batch["position_ids"][am][None]
    sel = at[am].nonzero()[:, 0]
    return ids, pos, Segments.of([n for n in lengths.tolist() if n], device), at, sel


def _unpack(values, at, sel):
    """values [k] (one per `sel` token, or one stand-in when k = 0) -> [S, T] in the batch's layout, 0
    off `at`. With nothing to read the result is 0 but still depends on `values`, so the backward reaches
    every parameter (FSDP's reduce-scatter runs on every rank)."""
    out = torch.zeros(at.shape, dtype=values.dtype, device=values.device)
    if len(sel) == 0:
        return out + values.sum() * 0
    return out.masked_scatter(at, values)  # row-major, sel's order; the backward keeps only the bool mask


def packed_logprobs(model, batch, mask, temperature=1.0, with_entropy=False):
    """sequence_logprobs for the rows of `batch` packed end to end in one row (each attending to itself
    alone, rlmt.model.Segments), the LM head run only where `mask` reads.

    batch: input_ids, attention_mask, position_ids [S, T] (see `pack`); mask [S, T] -> (logp [S, T],
    entropy [S, T] or None) fp32, in batch's layout: logp[s, t] = log π(ids[s, t] | ids[s, :t]) at
    `temperature` where mask is 1 (but a row's first token), 0 elsewhere: what sequence_logprobs gives there.
    Peak memory: the trunk over the batch's real tokens only, plus the head's chunks
    (rlmt.chunked.token_logprobs)."""
    ids, pos, seg, at, sel = pack(batch, mask)
    if len(sel):  # a token's log-prob is read from the hidden state before it
        head, targets = sel - 1, ids[:, sel]
    else:  # nothing to read: one position, so the head still runs (its result is multiplied by 0)
        head, targets = sel.new_zeros(1), ids[:, :1]
    logp, ent = model(ids, None, pos, segments=seg, targets=targets, logits_at=head, temperature=temperature,
                      with_entropy=with_entropy)
    return _unpack(logp[0], at, sel), _unpack(ent[0], at, sel) if ent is not None else None


def packed_values(critic, batch, mask):
    """sequence_values for the rows of `batch` packed end to end in one row: values [S, T] fp32 in batch's
    layout, values[s, t] = V(ids[s, :t]) where mask is 1 (but a row's first token), 0 elsewhere."""
    ids, pos, seg, at, sel = pack(batch, mask)
    v = critic(ids, None, pos, segments=seg).float()[0]  # [n]: the score head is one dot product a token
    return _unpack(v[sel - 1] if len(sel) else v[:1], at, sel)
