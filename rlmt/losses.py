"""Pure objective functions: group advantages, GAE, the PPO/GRPO surrogate, KL estimators, value loss,
DPO, and the one place where per-token losses become a scalar (`aggregate`).

Shapes: B rows, T tokens, G samples per prompt (group size), N = prompts × G.
`mask` [B, T] is 1 on response tokens (up to and including the first EOS) and 0 on prompt and padding.

House rules, each of which has broken a public RLHF framework:
  * everything is computed in fp32, whatever the model's dtype;
  * masked positions are replaced with torch.where *before* exp or any product, so inf / NaN sitting in
    padding never reaches the loss or the gradient (a mask multiply would give 0 · inf = NaN);
  * log-ratios are clamped to ±LOG_RATIO_CLAMP before exp; every denominator is clamped to ≥ 1 (or eps);
  * metrics are detached 0-d tensors; call .item() only when logging.

Ideas from verl (core_algos: agg_loss, dual-clip PPO, the clamped low-variance KL, rollout importance
sampling), OpenRLHF and TRL (masked whitening, value clipping, vLLM importance-sampling correction), Dr. GRPO
(fixed-constant normalization) and J. Schulman's note "Approximating KL divergence" (k1/k2/k3).
The code is written from the equations, not copied.
"""

import torch
import torch.nn.functional as F

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 4.9e8: finite in fp32, far beyond any ratio that clipping would keep
K3_CLAMP = 10.0  # verl's low_var_kl: the per-token k3 value is clamped to [-10, 10] (k3 >= 0: at most 10)
REL_STD_FLOOR = 1e-6  # a group's std below 1e-6 · max(1, |mean|) is float noise: the group has no signal
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
TIS_MODES = ("token-truncate", "seq-mask")
MISMATCH_BAND = (0.9, 1.1)  # a token whose sampler/trainer probability ratio leaves this band is counted
DPO_KINDS = ("sigmoid", "hinge", "ipo")


def _where(mask, x):
    """x [B, T] with masked-out positions set to 0 (not multiplied: 0 · inf = NaN)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x, mask):
    """Σ x·mask / max(1, Σ mask) over all positions. x, mask [B, T] -> 0-d fp32 (0 for an empty mask)."""
    return _where(mask, x.float()).sum() / mask.bool().sum().clamp(min=1)


def masked_moments(x, mask, all_reduce=None):
    """Mean and unbiased variance of x over masked positions: x, mask [B, T] -> (μ, σ²) 0-d fp32.

    all_reduce: a function that sums a tensor over ranks (rlmt.dist.all_reduce_sum) for statistics of
    the global batch: it is applied to sums and counts, never to per-rank means, so the result does not
    depend on how rows are split across ranks (averaging per-rank means would weight ranks equally).
    An empty mask gives (0, 0)."""
    m = mask.bool()
    red = all_reduce or (lambda t: t)
    sums = red(torch.stack([_where(m, x.float()).sum(), m.sum().float()]))
    n = sums[1].clamp(min=1)
    mean = sums[0] / n
    var = red(_where(m, (x.float() - mean) ** 2).sum()) / (n - 1).clamp(min=1)
    return mean, var


def masked_whiten(x, mask, eps=1e-8, all_reduce=None):
    """(x − μ) / sqrt(σ² + eps) with μ, σ² over masked positions only; masked positions come back 0.

    x, mask [B, T] -> [B, T] fp32. σ² is the unbiased variance (Bessel-corrected, as in TRL/OpenRLHF).
    Used to whiten PPO advantages over the batch; statistics from padding would shift every value.
    all_reduce: see `masked_moments` (pass rlmt.dist.all_reduce_sum to whiten over all ranks' rows).
    """
    m = mask.bool()
    mean, var = masked_moments(x, m, all_reduce)
    return _where(m, (x.float() - mean) * torch.rsqrt(var + eps))


def explained_variance(values, returns, mask, all_reduce=None, eps=1e-8):
    """1 − Var[R − V] / Var[R] over masked positions: how much of the return the critic predicts.

    values, returns, mask [B, T] -> 0-d fp32 (detached). 1 is a perfect critic, 0 is no better than
    predicting the mean return, negative is worse; NaN when the returns do not vary (Var[R] ≤ eps), where
    it is undefined. all_reduce: see `masked_moments`."""
    with torch.no_grad():
        _, var_err = masked_moments(returns.float() - values.float(), mask, all_reduce)
        _, var_ret = masked_moments(returns, mask, all_reduce)
        ev = 1.0 - var_err / var_ret.clamp(min=eps)
        return torch.where(var_ret > eps, ev, torch.full_like(ev, float("nan")))


# ----------------------------------------------------------------------------- GRPO advantages

def _group_stats(rewards, group_size):
    """rewards [N] -> (centered [N/G, G], std [N/G, 1], flat [N/G, 1] bool: the group has no signal)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards are not divisible by group_size {group_size}: N must be prompts × G")
    # Consecutive samples form a group: [p0 s0, p0 s1, ..., p1 s0, ...], the repeat_interleave layout.
    r = rewards.detach().float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    centered = r - mean
    # Unbiased std, written out so that G = 1 gives 0 (not NaN) and a single sample carries no signal.
    std = (centered.pow(2).sum(dim=1, keepdim=True) / max(group_size - 1, 1)).sqrt()
    # Equal rewards scored in different batches differ by float noise (std ~1e-8); dividing that by the
    # std would give ±1 advantages, or 1e4 with a tiny eps. Below the floor the group counts as constant.
    flat = std <= REL_STD_FLOOR * mean.abs().clamp(min=1.0)
    return centered, std, flat


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """GRPO advantage of each sample relative to its group.

        A_i = (r_i − mean(r_group)) / (std(r_group) + eps)      (GRPO, DeepSeekMath eq. 3; the paper's)
        A_i =  r_i − mean(r_group)                               (scale_by_std=False: Dr. GRPO)

    rewards [N] with N = prompts × G, the G samples of a prompt consecutive -> advantages [N] fp32,
    detached (advantages are constants of the surrogate). std is unbiased; groups whose std is below
    REL_STD_FLOOR · max(1, |mean|) get advantage exactly 0 in both modes (see `zero_std_fraction`).
    """
    centered, std, flat = _group_stats(rewards, group_size)
    adv = centered / (std + eps) if scale_by_std else centered
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)


def zero_std_fraction(rewards, group_size):
    """Fraction of groups whose rewards are all equal (up to the std floor): rewards [N] -> 0-d fp32.

    These groups give zero advantage and no gradient; a high fraction means the batch is wasted.
    """
    _, _, flat = _group_stats(rewards, group_size)
    return flat.float().mean()


# ----------------------------------------------------------------------------- surrogate and KL

def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                sampler_logprobs=None, tis_cap=None, tis_mode="token-truncate"):
    """PPO / GRPO clipped surrogate per token, with dual clip (Schulman et al. 2017; Ye et al. 2020).

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        L_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t)
        L_t = min(L_t, −c · A_t)  where A_t < 0                  (dual clip, c = dual_clip > 1)
        L_t = w_t · L_t,  w = tis_weights(old_logprobs, sampler_logprobs, mask, tis_cap, tis_mode)
                                                                 (truncated IS, only when tis_cap is set)

    logprobs [B, T] (with grad), old_logprobs [B, T] (the trainer's, before the first update; constant),
    advantages [B] (one per sequence, broadcast over tokens) or [B, T], mask [B, T].
    sampler_logprobs [B, T]: the sampler's log-probs of the same tokens, needed only with tis_cap.
    tis_cap: C of truncated importance sampling (>= 1), which reweights each token's surrogate for the
    rollout–training mismatch (see `tis_weights`); None (the default, the paper's) leaves it out.
    Returns (loss [B, T] fp32, 0 at masked positions; metrics dict of detached 0-d tensors:
    clip_frac, dual_clip_frac, ratio_mean, ratio_max, approx_kl = mean of k3(π_old‖π) = (ρ−1) − log ρ).
    dual_clip=None disables the dual clip. With one update per rollout ρ ≡ 1 and nothing clips.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    if tis_cap is not None and sampler_logprobs is None:
        raise ValueError("tis_cap needs sampler_logprobs: the weights are π_old / π_sampler")
    m = mask.bool()
    adv = advantages.detach().float()
    adv = _where(m, adv[:, None].expand_as(m) if adv.dim() == 1 else adv)
    log_ratio = _where(m, logprobs.float() - old_logprobs.detach().float())
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # exactly 1 at masked positions

    loss_unclipped = -ratio * adv
    loss_clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = torch.maximum(loss_unclipped, loss_clipped)  # −min(ρA, clip(ρ)A)
    clipped = m & (loss_clipped > loss_unclipped)  # the clipped branch is the one in use
    if dual_clip is not None:
        # For A < 0, −ρA grows without bound as ρ grows (stale off-policy tokens); beyond ρ = c the loss
        # is held at −c·A, a constant, so such a token stops contributing gradient.
        cap = -dual_clip * adv
        dual = m & (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    else:
        dual = torch.zeros_like(m)
    if tis_cap is not None:  # after both clips, as verl and TRL weight the per-token PPO loss
        loss = loss * tis_weights(old_logprobs, sampler_logprobs, m, tis_cap, tis_mode)
    loss = _where(m, loss)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clipped.float(), m),
            "dual_clip_frac": masked_mean(dual.float(), m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": _where(m, ratio).max() if ratio.numel() else ratio.new_zeros(()),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
        }
    return loss, metrics


def tis_weights(old_logprobs, sampler_logprobs, mask, cap=2.0, mode="token-truncate"):
    """Truncated importance-sampling weights for the rollout–training mismatch (detached, no gradient).

    The sampler (bf16 kernels, another attention path) and the trainer give the same tokens slightly
    different probabilities, so the rollout is off-policy for the trainer. With
        log ρ_t = log π_old(a_t) − log π_sampler(a_t)     (π_old: the trainer, before the first update)
      token-truncate   w_t = min(ρ_t, C)                                           (token-level TIS)
      seq-mask         w_t = ρ_seq · 1[ρ_seq ≤ C],  ρ_seq = exp(Σ_t m_t log ρ_t)   (sequence-level MIS)
    token-truncate is Yao et al. 2025's TIS ("Your efficient RL framework secretly brings you off-policy RL
    training": verl `rollout_is="token"`, TRL `vllm_importance_sampling_mode="token_truncate"`); seq-mask
    is the masked sequence-level variant of Liu, Li et al. 2025 ("When speed kills stability"; TRL
    "sequence_mask"): a sequence's whole-trajectory ratio, kept as is up to C and the sequence dropped
    (weight 0) above it, broadcast to its tokens. Log-ratios are clamped to ±LOG_RATIO_CLAMP before exp.

    old_logprobs, sampler_logprobs, mask [B, T] -> w [B, T] fp32, 0 at masked positions. cap: C >= 1, so
    identical log-probs give w ≡ 1 exactly (ρ = exp(0) = 1) and the loss is unchanged bit for bit.
    """
    if mode not in TIS_MODES:
        raise ValueError(f"unknown TIS mode {mode!r}; expected one of {', '.join(TIS_MODES)}")
    if not cap >= 1.0:
        raise ValueError(f"the TIS cap must be >= 1 (a cap below 1 would down-weight on-policy tokens), got {cap}")
    m = mask.bool()
    with torch.no_grad():
        log_rho = _where(m, old_logprobs.detach().float() - sampler_logprobs.detach().float())
        if mode == "token-truncate":
            w = torch.exp(log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)
        else:
            rho_seq = torch.exp(log_rho.sum(dim=1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            w = torch.where(rho_seq <= cap, rho_seq, torch.zeros_like(rho_seq)).expand_as(log_rho)
        return _where(m, w)


def mismatch_stats(old_logprobs, sampler_logprobs, mask, cap=2.0, mode="token-truncate"):
    """How far the sampler's log-probs are from the trainer's, over response tokens (for the step's log).

    old_logprobs, sampler_logprobs, mask [B, T] -> dict of detached 0-d fp32 tensors:
      mismatch_frac           share of tokens with ρ_t = π_old / π_sampler outside [0.9, 1.1]
      mismatch_logp_diff_mean mean |log π_old − log π_sampler|
      mismatch_logp_diff_max  max  |log π_old − log π_sampler| (0 for an empty mask)
      tis_weight_mean         mean over tokens of the weights tis_weights(cap, mode) gives, whether or
                              not the loss applies them (1 when the two agree; below 1: truncation bites)
    Each mean is over the mask's tokens, so rlmt.log.micro_batch_mean weights micro-batches by their token
    counts, and takes the maximum of the *_max entry.
    """
    m = mask.bool()
    with torch.no_grad():
        diff = _where(m, old_logprobs.detach().float() - sampler_logprobs.detach().float())
        rho = torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        lo, hi = MISMATCH_BAND
        return {"mismatch_frac": masked_mean(((rho < lo) | (rho > hi)).float(), m),
                "mismatch_logp_diff_mean": masked_mean(diff.abs(), m),
                "mismatch_logp_diff_max": diff.abs().max() if diff.numel() else diff.new_zeros(()),
                "tis_weight_mean": masked_mean(tis_weights(old_logprobs, sampler_logprobs, m, cap, mode), m)}


def kl(logprobs, ref_logprobs, kind="k3", mask=None):
    """Per-token estimators of KL(π ‖ π_ref) from samples of π, with log r = log π_ref − log π:

        k1 = −log r                 unbiased, high variance, can be negative
        k2 = ½ (log r)²             biased value, low variance; as a loss its gradient is ∇KL(π‖π_ref)
        k3 = r − 1 − log r          unbiased, low variance, ≥ 0 (Schulman; the paper's KL loss); as a
                                    loss its gradient is a biased estimate of ∇KL(π‖π_ref). Clamped to
                                    [−10, 10] per token, as verl's low_var_kl (the authors' trainer) does:
                                    a token whose k3 exceeds 10 (log r > 2.61 or < −11) adds 10, no gradient.

    logprobs, ref_logprobs [B, T] -> [B, T] fp32. log r is clamped to ±LOG_RATIO_CLAMP before exp.
    mask [B, T] (optional): zeroes masked positions before exp, so NaN in padding cannot reach gradients;
    without it, reduce with `aggregate`/`masked_mean`, which ignore masked positions in the forward pass.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {', '.join(KL_KINDS)}")
    log_r = ref_logprobs.float() - logprobs.float()
    if mask is not None:
        log_r = _where(mask, log_r)
    log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.pow(2)
    return (torch.exp(log_r) - 1.0 - log_r).clamp(-K3_CLAMP, K3_CLAMP)


RATIO_METRICS = ("clip_frac", "dual_clip_frac", "ratio_mean", "ratio_max", "approx_kl")  # policy_loss's


def actor_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, entropy=None, sampler_logprobs=None,
               kl_mask=None, clip_low=0.2, clip_high=0.2, dual_clip=3.0, tis_cap=None, tis_mode="token-truncate",
               kl_coef=0.0, kl_kind="k3", entropy_coef=0.0):
    """The per-token loss GRPO and PPO train the policy on (the paper's §2, after DeepSeekMath's GRPO):

        L_t = policy_loss_t + kl_coef · kl_t(π ‖ π_ref) − entropy_coef · H_t

    logprobs [B, T] (with grad), old_logprobs, mask [B, T], advantages [B] or [B, T]: as policy_loss;
    ref_logprobs [B, T] (None, or kl_coef 0: no KL term), entropy [B, T] (with grad; None: no bonus),
    sampler_logprobs: for truncated IS (tis_cap); kl_mask [B, T]: the tokens the KL term covers (None: all
    of `mask`; the batch's answer_mask puts it on the answer alone). The flags: cli.actor_kwargs(args).
    -> (loss [B, T] fp32, 0 at masked positions; metrics: policy_loss's, + kl (over kl_mask) and entropy
    when in the loss). Reduce with aggregate()."""
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                sampler_logprobs=sampler_logprobs, tis_cap=tis_cap, tis_mode=tis_mode)
    if ref_logprobs is not None and kl_coef > 0:
        on = mask if kl_mask is None else mask.bool() & kl_mask.bool()
        k = _where(on, kl(logprobs, ref_logprobs, kl_kind, mask=on))
        loss = loss + kl_coef * k
        metrics["kl"] = masked_mean(k.detach(), on)
    if entropy is not None:
        loss = loss - entropy_coef * entropy
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return _where(mask.bool(), loss), metrics


# ----------------------------------------------------------------------------- aggregation

def aggregate_count(mask, mode):
    """The local count that `aggregate` divides by for `mode`: response tokens (token-mean) or rows.
    Sum it over micro-batches and ranks (all_reduce) and pass the total as `count`. mask [B, T] -> 0-d."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")
    m = mask.bool()
    return m.sum().float() if mode == "token-mean" else torch.tensor(float(m.shape[0]), device=m.device)


def aggregate(loss, mask, mode="seq-mean-token-mean", count=None, norm_len=None):
    """Reduce a per-token loss [B, T] to a scalar, normalized once for the whole optimizer step.

        token-mean               Σ_b Σ_t ℓ·m / count,  count = response tokens   (DAPO)
        seq-mean-token-mean      Σ_b [Σ_t ℓ·m / max(1, Σ_t m)] / count,  count = sequences  (the paper's)
        seq-mean-token-sum-norm  Σ_b Σ_t ℓ·m / norm_len / count,  count = sequences  (Dr. GRPO)

    count: the count for the whole step (all micro-batches, all ranks; see `aggregate_count`); None uses
    this batch's own (mask.sum() or B). With the global count, summing aggregate() over micro-batches
    equals one call on the full batch; dividing per-micro-batch means by the number of micro-batches
    does not when lengths are ragged. Rows with an empty mask contribute 0 but count as sequences.
    norm_len: Dr. GRPO's constant (the max response length), default T = mask.shape[1]; pass it
    explicitly when micro-batches are padded to different widths. Returns a 0-d fp32 tensor.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")
    m = mask.bool()
    total = _where(m, loss.float())
    if count is None:
        count = aggregate_count(m, mode)
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device).clamp(min=1)
    if mode == "token-mean":
        return total.sum() / count
    if mode == "seq-mean-token-mean":
        return (total.sum(dim=1) / m.sum(dim=1).clamp(min=1)).sum() / count
    norm_len = m.shape[1] if norm_len is None else norm_len
    return total.sum() / max(float(norm_len), 1.0) / count


# ----------------------------------------------------------------------------- PPO: rewards, GAE, critic

def last_token_rewards(scores, mask):
    """Put each sequence's scalar reward on its last response token: scores [B], mask [B, T] -> [B, T].

    The index comes from the mask (never from searching for a pad id, which may equal EOS); a row with an
    empty mask gets no reward. All other positions are 0.
    """
    m = mask.bool()
    out = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    if m.shape[1] == 0:
        return out
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, pos, -1).amax(dim=1, keepdim=True)  # −1 for an empty row: matches nothing
    return torch.where(pos == last, scores.detach().float()[:, None].expand_as(out), out)


def gae(rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalized advantage estimation over response tokens (Schulman et al. 2016, eq. 11–16).

        δ_t = r_t + γ V_{t'} − V_t           t' = next response token; V after the last one is 0
        A_t = δ_t + γ λ A_{t'}               R_t = A_t + V_t (the critic's target)

    rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]) fp32, detached, 0 where masked.
    Masked positions are skipped (the recursion carries over them), so prompt tokens and padding never
    enter, and the last response token bootstraps from 0. A reverse loop over T, vectorized over B.
    """
    m = mask.bool()
    r = _where(m, rewards.detach().float())
    v = _where(m, values.detach().float())
    adv = torch.zeros_like(r)
    next_v = r.new_zeros(r.shape[0])
    next_a = r.new_zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        adv[:, t] = torch.where(m[:, t], a, torch.zeros_like(a))
        next_v = torch.where(m[:, t], v[:, t], next_v)  # masked step: keep the later token's value
        next_a = torch.where(m[:, t], a, next_a)
    return adv, _where(m, adv + v)


def value_loss(values, old_values, returns, mask, clip=0.5):
    """Clipped value loss per token (PPO2 baselines / OpenRLHF / verl):

        L_t = ½ max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε, ε) − R_t)²)

    values [B, T] (critic, with grad), old_values [B, T] (rollout time), returns [B, T] (targets from
    `gae`), mask [B, T]. clip=None gives ½ (V − R)². Returns (loss [B, T] fp32, 0 where masked;
    metrics {"clip_frac": fraction of tokens where the clipped term is the larger}).
    """
    m = mask.bool()
    v = _where(m, values.float())
    v_old = _where(m, old_values.detach().float())
    ret = _where(m, returns.detach().float())
    err = (v - ret) ** 2
    if clip is None:
        loss, clipped = 0.5 * err, torch.zeros_like(m)
    else:
        err_clipped = (v_old + (v - v_old).clamp(-clip, clip) - ret) ** 2
        loss = 0.5 * torch.maximum(err, err_clipped)
        clipped = m & (err_clipped > err)  # equal on the first epoch (V == V_old): never active
    with torch.no_grad():
        metrics = {"clip_frac": masked_mean(clipped.float(), m)}
    return _where(m, loss), metrics


# ----------------------------------------------------------------------------- DPO

def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, kind="sigmoid"):
    """DPO-family losses on the implicit-reward margin (Rafailov et al. 2023; IPO: Azar et al. 2023).

        h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
        sigmoid   −log σ(β h)                 (DPO, the paper's; via logsigmoid, stable for any h)
        hinge     max(0, 1 − β h)             (SLiC)
        ipo       (h − 1 / (2β))²             (IPO; pass length-AVERAGED log-probs, as IPO defines it)

    All inputs [B]: summed (sigmoid, hinge) or length-averaged (ipo) log-probs of each completion.
    Returns (loss [B] fp32; metrics: reward_margin = mean β h, reward_accuracy = fraction with h > 0,
    chosen_reward = mean β(π_c − ref_c), rejected_reward = mean β(π_r − ref_r), all detached).
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"unknown DPO kind {kind!r}; expected one of {', '.join(DPO_KINDS)}")
    chosen = chosen_logps.float() - ref_chosen_logps.float()
    rejected = rejected_logps.float() - ref_rejected_logps.float()
    h = chosen - rejected
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif kind == "hinge":
        loss = torch.relu(1.0 - beta * h)
    else:
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    with torch.no_grad():
        n = max(h.numel(), 1)  # an empty batch gives zeros, not NaN
        metrics = {
            "reward_margin": (beta * h).sum() / n,
            "reward_accuracy": (h > 0).float().sum() / n,
            "chosen_reward": (beta * chosen).sum() / n,
            "rejected_reward": (beta * rejected).sum() / n,
        }
    return loss, metrics
