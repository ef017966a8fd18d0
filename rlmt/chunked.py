"""The LM head's per-token log-probs and entropy in fp32, without a [B, T, V] fp32 tensor.

RLMT sequences reach 5,120 tokens and Llama-3's vocabulary has 128,256 entries: the full fp32 logits of
one such sequence take 2.6 GB, and autograd would keep them for backward. Here the tokens are cut into
chunks; each chunk's logits live only inside one function call, so the forward keeps just the chunk's
log-probs and entropies, and the backward recomputes one chunk's logits at a time and applies the
gradient in closed form (_ChunkLogprobs).

rlmt.model's forward calls `token_logprobs` on its final hidden states (so FSDP's hooks see the lm_head
use); rlmt.logprobs aligns what it returns with the tokens of a batch.
"""

import torch
import torch.nn.functional as F


def _chunk(h, weight, targets, temperature, with_entropy):
    """h [n, D], weight [V, D], targets [n] -> logp [n], entropy [n] (zeros unless with_entropy).
    Never differentiated by autograd (_ChunkLogprobs has its own backward), so it works in place: at most
    two [n, V] fp32 buffers live at once."""
    # temperature on the logits, before the softmax
    logp_all = torch.log_softmax(F.linear(h, weight).float().div_(temperature), dim=-1)
    # One log_softmax gives the log-prob and H = -Σ p log p; the no-entropy path reads logp the same way,
    # so a no-grad pass (PPO's old log-probs) equals the training pass bit for bit.
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    return logp, -logp_all.exp().mul_(logp_all).sum(-1)


class _ChunkLogprobs(torch.autograd.Function):
    """_chunk with a backward that recomputes the chunk's logits (nothing [n, V] is kept in between) and
    writes their gradient in closed form. With z = h Wᵀ / T, p = softmax(z), and a loss a·logp + b·H
    per token (a, b: the incoming gradients):

        ∂(a·logp + b·H)/∂z = a·onehot(target) − p ⊙ (b·log p + a + b·H)

    Autograd through a checkpointed _chunk reran the whole forward, then took the backward of each of
    its ops, a dozen passes over [n, V] with as many buffers; here the logits, the log_softmax, the exp
    and three passes in place, for the same matmuls."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, with_entropy):
        logp, ent = _chunk(h, weight, targets, temperature, with_entropy)
        ctx.save_for_backward(h, weight, targets, ent)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        """g_logp, g_ent [n] (a and b above) -> gradients of h [n, D] and weight [V, D]."""
        h, weight, targets, ent = ctx.saved_tensors
        T = ctx.temperature
        logp_all = torch.log_softmax(F.linear(h, weight).float().div_(T), dim=-1)
        p = logp_all.exp()
        # the gradient of z, already divided by T (∂z/∂(h Wᵀ) = 1/T), in logp_all's or p's buffer
        if ctx.with_entropy:
            g = logp_all.mul_(-g_ent[:, None] / T).sub_(((g_logp + g_ent * ent) / T)[:, None]).mul_(p)
        else:
            g = p.mul_(-g_logp[:, None] / T)
        g.scatter_add_(-1, targets[:, None], g_logp[:, None] / T)
        g = g.to(h.dtype)  # the matmuls in the weights' dtype, as autograd does for bf16
        grad_h = g @ weight if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False, chunk_size=1024):
    """log π(targets | context) at `temperature`, per token.

    hidden [B, T, D] (final-norm hidden states), weight [V, D] (lm_head), targets [B, T] long: the token
    whose log-prob is read at each position (usually input_ids shifted left by one).
    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None). Gradients flow to hidden and weight.
    Peak extra memory: two fp32 [chunk_size, V] buffers (~2 × chunk_size × V × 4 bytes), whatever T is.
    """
    B, T, D = hidden.shape
    h, tgt = hidden.reshape(B * T, D), targets.reshape(B * T).clamp(min=0)  # -100 style ids: masked later
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, ents = [], []
    for s in range(0, B * T, chunk_size):
        args = (h[s:s + chunk_size], weight, tgt[s:s + chunk_size], temperature, with_entropy)
        lp, ent = _ChunkLogprobs.apply(*args) if needs_grad else _chunk(*args)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(B, T)
    return logp, (torch.cat(ents).view(B, T) if with_entropy else None)
