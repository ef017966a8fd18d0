"""Per-token log-probs and entropy from hidden states, in fp32, without a [B, T, V] fp32 tensor.

RLMT sequences reach 5,120 tokens and Llama-3's vocabulary has 128,256 entries: the full fp32 logits of
one such sequence take 2.6 GB, and autograd would keep them for backward. Here the tokens are cut into
chunks; each chunk's logits live only inside a checkpointed function, so the forward keeps just the
chunk's log-probs, and the backward recomputes one chunk's logits at a time.

`sequence_values` reads a PPO critic with the same alignment: position t belongs to token t.
`packed_logprobs` does the same for rows that pack several SFT examples end to end.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlmt.data import block_causal_mask


def _chunk(h, weight, targets, temperature, with_entropy):
    """h [n, D], weight [V, D], targets [n] -> logp [n], entropy [n] (zeros unless with_entropy)."""
    # temperature on the logits, before the softmax; divided in place, as the matmul's backward does not
    # read its output: one [n, V] buffer fewer
    logits = F.linear(h, weight).float().div_(temperature)
    # One fused log_softmax (fused backward too) gives the log-prob and H = -Σ p log p: ~15% less time
    # for this function's forward + backward on a CPU than logsumexp and a subtraction. Both paths read
    # logp the same way, so a no-grad pass (PPO's old log-probs) equals the training pass bit for bit.
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False, chunk_size=1024):
    """log π(targets | context) at `temperature`, per token.

    hidden [B, T, D] (final-norm hidden states), weight [V, D] (lm_head), targets [B, T] long: the token
    whose log-prob is read at each position (usually input_ids shifted left by one).
    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None). Gradients flow to hidden and weight.
    Peak extra memory: ~3 × chunk_size × V × 4 bytes, whatever T is.
    """
    B, T, D = hidden.shape
    h, tgt = hidden.reshape(B * T, D), targets.reshape(B * T).clamp(min=0)  # -100 style ids: masked later
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, ents = [], []
    for s in range(0, B * T, chunk_size):
        args = (h[s:s + chunk_size], weight, tgt[s:s + chunk_size], temperature, with_entropy)
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if needs_grad else _chunk(*args)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(B, T)
    return logp, (torch.cat(ents).view(B, T) if with_entropy else None)


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


def packed_logprobs(model, input_ids, position_ids, segment_ids, temperature=1.0):
    """sequence_logprobs for packed rows (several examples a row, rlmt.data.sft_batch with pack_len).

    input_ids, position_ids (restarting at 0 with each example), segment_ids (−1 = padding) [B, T] ->
    logp [B, T] with the same alignment as sequence_logprobs. Attention is causal within each example
    (rlmt.data.block_causal_mask), so each example's log-probs are what it gets alone. The first token of
    an example holds the log-prob of it following the previous example: mask it out (the SFT mask does,
    it is a template token)."""
    targets = torch.roll(input_ids, -1, dims=1)
    logp, _ = model(input_ids, None, position_ids, attn_mask=block_causal_mask(segment_ids), targets=targets,
                    temperature=temperature)
    return torch.cat([logp.new_zeros(logp.shape[0], 1), logp[:, :-1]], dim=1)
