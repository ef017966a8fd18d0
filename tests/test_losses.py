"""rlmt.losses against hand arithmetic (written out beside each expected value) and naive Python loops."""

import math
import statistics

import pytest
import torch

from rlmt import losses as L

MODES = L.AGG_MODES


def ragged_mask(B=8, T=12, seed=0, empty_row=None):
    """Rows with a prompt of random length, a response of random length, then padding: mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        start = int(torch.randint(0, T // 3, (1,), generator=g))
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[b, start:start + length] = 1
    if empty_row is not None:
        mask[empty_row] = 0
    return mask


def poison(x, mask, values=(float("inf"), float("-inf"), float("nan"), 1e30)):
    """A copy of x with inf / -inf / NaN / huge values cycled through its masked positions."""
    x = x.detach().clone()
    idx = (~mask.bool()).nonzero(as_tuple=False)
    for i, (b, t) in enumerate(idx.tolist()):
        x[b, t] = values[i % len(values)]
    return x


# ----------------------------------------------------------------------------- group advantages

def test_group_advantages_hand():
    # group [1, 2, 3, 6]: mean 3, deviations -2 -1 0 3, Σd² = 14, unbiased var 14/3, std 2.1602469
    # A = d / (2.1602469 + 1e-6) = [-0.9258196, -0.4629098, 0, 1.3887294]
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(L.group_advantages(r, 4), torch.tensor([-0.9258196, -0.4629098, 0.0, 1.3887294]))
    # Dr. GRPO: r - mean only
    torch.testing.assert_close(L.group_advantages(r, 4, scale_by_std=False), torch.tensor([-2.0, -1.0, 0.0, 3.0]))
    # two groups of 2: [1, 3] -> mean 2, std sqrt((1 + 1) / 1) = 1.4142136 -> ±0.7071063; [5, 5] -> 0
    r = torch.tensor([1.0, 3.0, 5.0, 5.0])
    torch.testing.assert_close(L.group_advantages(r, 2), torch.tensor([-0.7071063, 0.7071063, 0.0, 0.0]))


def test_group_advantages_vs_naive_loop():
    g = torch.Generator().manual_seed(1)
    G = 8
    r = torch.randn(6 * G, generator=g) * 3 + 1
    expect = []
    for p in range(6):
        grp = r[p * G:(p + 1) * G].tolist()
        mu, sd = statistics.mean(grp), statistics.stdev(grp)  # stdev is the unbiased (n - 1) one
        expect += [(x - mu) / (sd + 1e-6) for x in grp]
    torch.testing.assert_close(L.group_advantages(r, G), torch.tensor(expect))
    assert L.group_advantages(r, G).dtype == torch.float32


def test_groups_are_consecutive_samples():
    # Each prompt's rewards carry a different offset; with repeat_interleave groups every group's
    # advantages have mean 0 and are the same as without the offsets.
    g = torch.Generator().manual_seed(2)
    P, G = 5, 4
    noise = torch.randn(P * G, generator=g)
    offsets = torch.arange(P, dtype=torch.float32).repeat_interleave(G) * 10.0
    adv = L.group_advantages(noise + offsets, G)
    torch.testing.assert_close(adv.view(P, G).mean(1), torch.zeros(P), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv, L.group_advantages(noise, G), atol=1e-5, rtol=1e-5)
    # Not vacuous: rewards laid out [p0, p1, ...] * G (the wrong layout) let the offsets leak in.
    wrong = noise + torch.arange(P, dtype=torch.float32).repeat(G) * 10.0
    assert not torch.allclose(L.group_advantages(wrong, G), L.group_advantages(noise, G), atol=1e-2)


def test_zero_variance_groups_are_zero_and_counted():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = L.group_advantages(r, 4)
    assert torch.equal(adv[:4], torch.zeros(4)) and torch.equal(adv[8:], torch.zeros(4))
    # [0, 1, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.5773503 -> ±0.8660239
    torch.testing.assert_close(adv[4:8], torch.tensor([-0.8660239, 0.8660239, -0.8660239, 0.8660239]))
    torch.testing.assert_close(L.zero_std_fraction(r, 4), torch.tensor(2 / 3))
    assert torch.equal(L.group_advantages(r, 4, scale_by_std=False)[:4], torch.zeros(4))


def test_near_constant_group_does_not_blow_up():
    # std ~1.3e-9 from "float noise": unfloored, (r - mean) / (std + 1e-12) would be ~±1.
    r = torch.tensor([0.0, 1e-9, -1e-9, 2e-9, 0.0, 1.0, 2.0, 3.0])
    for eps in (1e-6, 1e-12, 0.0):
        adv = L.group_advantages(r, 4, eps=eps)
        assert torch.equal(adv[:4], torch.zeros(4)) and adv[4:].abs().max() < 2
    # relative floor: rewards near 30 one ulp apart (fp32 ulp at 30 is 1.9e-6) are still "equal"
    base = torch.tensor(30.0)
    up = torch.nextafter(base, torch.tensor(100.0))
    r = torch.stack([base, up, base, up])
    assert torch.equal(L.group_advantages(r, 4), torch.zeros(4))
    assert L.zero_std_fraction(r, 4) == 1.0
    # a real difference of 1e-3 is signal
    assert L.group_advantages(torch.tensor([0.0, 1e-3, 0.0, 1e-3]), 4).abs().min() > 0.8


def test_group_size_errors_and_single_sample_groups():
    with pytest.raises(ValueError, match=r"10.*4"):
        L.group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match=r"10.*4"):
        L.zero_std_fraction(torch.zeros(10), 4)
    adv = L.group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1)  # G = 1: no signal, finite
    assert torch.equal(adv, torch.zeros(3))


# ----------------------------------------------------------------------------- policy loss

RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5]


def test_policy_loss_hand_clipping():
    # Row 0 A = +1: loss = -min(ρ, clip(ρ, 0.8, 1.2)) = [-0.5, -0.9, -1, -1.1, -1.2]; only ρ=1.5 clips.
    # Row 1 A = -1: loss =  max(ρ, clip(ρ, 0.8, 1.2)) = [0.8, 0.9, 1, 1.1, 1.5];   only ρ=0.5 clips.
    old = torch.zeros(2, 5)
    lp = torch.log(torch.tensor([RATIOS, RATIOS])).requires_grad_()
    mask = torch.ones(2, 5)
    loss, met = L.policy_loss(lp, old, torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -0.9, -1.0, -1.1, -1.2], [0.8, 0.9, 1.0, 1.1, 1.5]]))
    torch.testing.assert_close(met["clip_frac"], torch.tensor(0.2))  # 2 of 10
    torch.testing.assert_close(met["dual_clip_frac"], torch.tensor(0.0))
    torch.testing.assert_close(met["ratio_mean"], torch.tensor(1.0))  # (0.5+0.9+1+1.1+1.5)·2/10
    torch.testing.assert_close(met["ratio_max"], torch.tensor(1.5))
    # approx_kl = mean of ρ - 1 - ln ρ: 0.5→0.1931472 0.9→0.0053605 1→0 1.1→0.0046898 1.5→0.0945349
    torch.testing.assert_close(met["approx_kl"], torch.tensor((0.1931472 + 0.0053605 + 0.0046898 + 0.0945349) / 5))
    assert all(not v.requires_grad for v in met.values())
    # d loss / d log ρ = -A ρ on the unclipped branch, 0 on the clipped one
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, -0.9, -1.0, -1.1, 0.0], [0.0, 0.9, 1.0, 1.1, 1.5]]))


def test_policy_loss_asymmetric_clip():
    # clip_high 0.28 (DAPO clip-higher): A=+1, ρ=1.25 no longer clips (-1.25); ρ=1.5 -> -1.28
    lp = torch.log(torch.tensor([[1.25, 1.5]]))
    loss, met = L.policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28]]))
    torch.testing.assert_close(met["clip_frac"], torch.tensor(0.5))


def test_policy_loss_dual_clip():
    # (A=-1, ρ=5): PPO loss max(5, 1.2) = 5, capped at -3·A = 3.   (A=-2, ρ=2): max(4, 2.4) = 4 < 6, kept.
    # (A=+1, ρ=5): -min(5, 1.2) = -1.2, dual clip only applies to A < 0.
    lp = torch.log(torch.tensor([[5.0], [2.0], [5.0]])).requires_grad_()
    adv, mask, old = torch.tensor([-1.0, -2.0, 1.0]), torch.ones(3, 1), torch.zeros(3, 1)
    loss, met = L.policy_loss(lp, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor([[3.0], [4.0], [-1.2]]))
    torch.testing.assert_close(met["dual_clip_frac"], torch.tensor(1 / 3))
    torch.testing.assert_close(met["ratio_max"], torch.tensor(5.0))
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0], [4.0], [0.0]]))  # capped: constant, no grad
    loss, met = L.policy_loss(lp, old, adv, mask, dual_clip=None)
    torch.testing.assert_close(loss, torch.tensor([[5.0], [4.0], [-1.2]]))
    assert met["dual_clip_frac"] == 0
    with pytest.raises(ValueError, match="dual_clip"):
        L.policy_loss(lp, old, adv, mask, dual_clip=1.0)


def test_policy_loss_on_policy_and_advantage_shapes():
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(4, 6, generator=g).requires_grad_()
    adv, mask = torch.randn(4, generator=g), ragged_mask(4, 6, seed=3)
    loss, met = L.policy_loss(lp, lp, adv, mask)  # old is the same tensor: detached inside
    assert met["clip_frac"] == 0 and met["ratio_max"] == 1 and met["approx_kl"] == 0
    torch.testing.assert_close(loss, -adv[:, None] * mask)  # ρ = 1: loss = -A on response tokens
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -adv[:, None] * mask)  # ∇ρ = ρ ∇log π
    loss2, _ = L.policy_loss(lp, lp.detach(), adv[:, None].expand(4, 6), mask)
    torch.testing.assert_close(loss2, loss)


def test_policy_loss_padding_poison():
    mask = ragged_mask(6, 10, seed=4)
    g = torch.Generator().manual_seed(4)
    lp0, old0 = torch.randn(6, 10, generator=g) * 0.3 - 2, torch.randn(6, 10, generator=g) * 0.3 - 2
    adv0 = torch.randn(6, 10, generator=g)

    def run(lp, old, adv, mode):
        lp = lp.clone().requires_grad_()
        loss, met = L.policy_loss(lp, old, adv, mask)
        out = L.aggregate(loss, mask, mode)
        out.backward()
        return out, lp.grad, met

    for mode in MODES:
        clean = run(lp0, old0, adv0, mode)
        dirty = run(poison(lp0, mask), poison(old0, mask, (float("-inf"), 1e30, float("nan"))),
                    poison(adv0, mask, (float("nan"), float("inf"))), mode)
        assert torch.isfinite(dirty[0]) and torch.isfinite(dirty[1]).all()
        torch.testing.assert_close(dirty[0], clean[0])
        torch.testing.assert_close(dirty[1], clean[1])
        for k in clean[2]:
            torch.testing.assert_close(dirty[2][k], clean[2][k])


# ----------------------------------------------------------------------------- truncated importance sampling

def test_tis_token_truncate_hand():
    # log π_old - log π_sampler = ln [0.5, 1.5, 3, 1]; C = 2 -> w = [0.5, 1.5, 2, 1] (the last token masked: 0).
    # On-policy for the trainer (logprobs == old): ρ = 1, A = +1 -> L = -w;  A = -1 -> L = +w.
    old = torch.full((2, 4), -1.0)
    sampler = old - torch.log(torch.tensor([[0.5, 1.5, 3.0, 1.0]] * 2))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    sampler = poison(sampler, mask)
    w = L.tis_weights(old, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5, 2.0, 0.0]] * 2))
    lp = old.clone().requires_grad_()
    loss, _ = L.policy_loss(lp, old, torch.tensor([1.0, -1.0]), mask, sampler_logprobs=sampler, tis_cap=2.0)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.5, -2.0, 0.0], [0.5, 1.5, 2.0, 0.0]]))
    loss.sum().backward()  # the weight is a constant: d/d log π of -w ρ A is -w A at ρ = 1
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, -1.5, -2.0, 0.0], [0.5, 1.5, 2.0, 0.0]]))


def test_tis_weights_the_clipped_surrogate():
    # A = +1, ρ = π / π_old = 1.5 clips at 1.2: L = -1.2, then w = min(3, 2) = 2 -> -2.4 (and no gradient);
    # A = -1, ρ = 5 is dual-clipped at 3: L = 3, w = 0.5 -> 1.5.
    old = torch.zeros(2, 1)
    lp = torch.log(torch.tensor([[1.5], [5.0]])).requires_grad_()
    sampler = -torch.log(torch.tensor([[3.0], [0.5]]))
    loss, met = L.policy_loss(lp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), sampler_logprobs=sampler,
                              tis_cap=2.0)
    torch.testing.assert_close(loss, torch.tensor([[-2.4], [1.5]]))
    assert met["clip_frac"] == 0.5 and met["dual_clip_frac"] == 0.5  # the clip statistics are not reweighted
    loss.sum().backward()
    assert torch.equal(lp.grad, torch.zeros(2, 1))


def test_tis_seq_mask_hand():
    # ρ_seq = Π_t ρ_t over each row's response tokens, kept up to C = 2, the row dropped above it:
    #   row 0: 1.2 · 1.5 = 1.8 -> 1.8;  row 1: 1.5 · 1.5 = 2.25 > 2 -> 0;  row 2: 0.5 · 0.8 · 1 = 0.4 -> 0.4
    ratios = torch.tensor([[1.2, 1.5, 7.0], [1.5, 1.5, 7.0], [0.5, 0.8, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    old = torch.full((3, 3), -2.0)
    sampler = poison(old - torch.log(ratios), mask)  # the padded ratio 7 (and the poison) must not count
    w = L.tis_weights(old, sampler, mask, cap=2.0, mode="seq-mask")
    torch.testing.assert_close(w, torch.tensor([[1.8, 1.8, 0.0], [0.0, 0.0, 0.0], [0.4, 0.4, 0.4]]))
    loss, _ = L.policy_loss(old, old, torch.tensor([1.0, 1.0, -1.0]), mask, sampler_logprobs=sampler, tis_cap=2.0,
                            tis_mode="seq-mask")
    torch.testing.assert_close(loss, torch.tensor([[-1.8, -1.8, 0.0], [0.0, 0.0, 0.0], [0.4, 0.4, 0.4]]))
    # token-truncate on the same tokens: every token on its own, min(ρ_t, 2)
    torch.testing.assert_close(L.tis_weights(old, sampler, mask, cap=2.0),
                               torch.tensor([[1.2, 1.5, 0.0], [1.5, 1.5, 0.0], [0.5, 0.8, 1.0]]))


@pytest.mark.parametrize("mode", L.TIS_MODES)
def test_tis_with_sampler_equal_to_trainer_changes_nothing(mode):
    # ρ_t = exp(0) = 1 <= C: w ≡ 1, so loss and gradient are bit for bit those without the correction,
    # here off-policy for the update (both clips active), on ragged rows with poisoned padding.
    g = torch.Generator().manual_seed(14)
    mask = ragged_mask(6, 10, seed=14, empty_row=2)
    old = torch.randn(6, 10, generator=g) - 2
    lp0 = old + torch.randn(6, 10, generator=g) * 1.5  # ratios from ~0.05 to ~20
    adv = torch.tensor([1.5, -2.0, 0.7, -0.3, 2.2, -1.1])
    runs = []
    for kw in ({}, {"sampler_logprobs": poison(old, mask), "tis_cap": 1.0, "tis_mode": mode},
               {"sampler_logprobs": old.clone(), "tis_cap": 3.0, "tis_mode": mode}):
        lp = lp0.clone().requires_grad_()
        loss, met = L.policy_loss(lp, old, adv, mask, **kw)
        L.aggregate(loss, mask).backward()
        runs.append((loss.detach(), lp.grad, met))
    assert runs[0][2]["clip_frac"] > 0 and runs[0][2]["dual_clip_frac"] > 0
    for loss, grad, met in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
    stats = L.mismatch_stats(old, old.clone(), mask, mode=mode)
    assert stats == {"mismatch_frac": 0, "mismatch_logp_diff_mean": 0, "mismatch_logp_diff_max": 0,
                     "tis_weight_mean": 1}


def test_mismatch_stats_hand():
    # ρ = π_old / π_sampler on the 5 response tokens: [0.8, 1.05, 1.3] and [1.0, 0.95] (a pad holds 9).
    #   outside [0.9, 1.1]: 0.8 and 1.3 -> 2 / 5 = 0.4
    #   |Δ log p| = [0.2231436, 0.0487902, 0.2623643, 0, 0.0512933]: max 0.2623643, mean 0.5855914 / 5
    #   token-truncate, C = 1.1: w = [0.8, 1.05, 1.1, 1, 0.95] -> mean 4.9 / 5 = 0.98
    #   seq-mask, C = 2: row 0 ρ_seq = 0.8 · 1.05 · 1.3 = 1.092, row 1 0.95 -> (3 · 1.092 + 2 · 0.95) / 5 = 1.0352
    ratios = torch.tensor([[0.8, 1.05, 1.3], [1.0, 0.95, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.full((2, 3), -1.5)
    sampler = poison(old - torch.log(ratios), mask)
    st = L.mismatch_stats(old, sampler, mask, cap=1.1)
    torch.testing.assert_close(st["mismatch_frac"], torch.tensor(0.4))
    torch.testing.assert_close(st["mismatch_logp_diff_max"], torch.tensor(0.2623643))
    torch.testing.assert_close(st["mismatch_logp_diff_mean"], torch.tensor(0.5855914 / 5))
    torch.testing.assert_close(st["tis_weight_mean"], torch.tensor(0.98))
    torch.testing.assert_close(L.mismatch_stats(old, sampler, mask, mode="seq-mask")["tis_weight_mean"],
                               torch.tensor(1.0352))
    assert all(not v.requires_grad and v.dim() == 0 for v in st.values())
    empty = L.mismatch_stats(old, sampler, torch.zeros(2, 3))
    assert all(torch.isfinite(v) for v in empty.values()) and empty["mismatch_logp_diff_max"] == 0


def test_tis_bad_arguments():
    x, mask = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match=">= 1"):
        L.tis_weights(x, x, mask, cap=0.5)
    with pytest.raises(ValueError, match="token-truncate, seq-mask"):
        L.tis_weights(x, x, mask, mode="sequence")
    with pytest.raises(ValueError, match="needs sampler_logprobs"):
        L.policy_loss(x, x, torch.ones(1), mask, tis_cap=2.0)


def test_empty_masks_are_finite():
    lp = torch.randn(3, 5).requires_grad_()
    mask = torch.zeros(3, 5)
    loss, met = L.policy_loss(lp, lp.detach() + 1, torch.ones(3), mask)
    assert all(torch.isfinite(v) for v in met.values())
    for mode in MODES:
        out = L.aggregate(loss + L.kl(lp, torch.zeros(3, 5)), mask, mode)
        assert out == 0
    L.aggregate(loss, mask).backward()
    assert torch.equal(lp.grad, torch.zeros(3, 5))
    assert L.masked_mean(torch.randn(3, 5), mask) == 0
    assert torch.equal(L.masked_whiten(torch.randn(3, 5), mask), torch.zeros(3, 5))
    vl, vmet = L.value_loss(torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5), mask)
    assert torch.equal(vl, torch.zeros(3, 5)) and vmet["clip_frac"] == 0
    adv, ret = L.gae(torch.randn(3, 5), torch.randn(3, 5), mask)
    assert torch.equal(adv, torch.zeros(3, 5)) and torch.equal(ret, torch.zeros(3, 5))


# ----------------------------------------------------------------------------- KL

def test_kl_hand_values():
    # log r = ref - lp = [ln 2, 0, -1]
    lp = torch.zeros(1, 3)
    ref = torch.tensor([[math.log(2.0), 0.0, -1.0]])
    torch.testing.assert_close(L.kl(lp, ref, "k1"), torch.tensor([[-0.6931472, 0.0, 1.0]]))  # -log r
    torch.testing.assert_close(L.kl(lp, ref, "k2"), torch.tensor([[0.2402265, 0.0, 0.5]]))  # ½(ln 2)² = 0.2402265
    # k3 = r - 1 - log r: 2 - 1 - 0.6931472 = 0.3068528;  e^-1 - 1 + 1 = 0.3678794
    torch.testing.assert_close(L.kl(lp, ref), torch.tensor([[0.3068528, 0.0, 0.3678794]]))


def test_kl_estimators_are_unbiased_monte_carlo():
    # Independent check: E_{x~π}[k1] = E_{x~π}[k3] = KL(π‖π_ref), computed exactly over 5 outcomes.
    g = torch.Generator().manual_seed(5)
    logp = torch.log_softmax(torch.randn(5, generator=g), 0)
    logq = torch.log_softmax(torch.randn(5, generator=g), 0)
    exact = (logp.exp() * (logp - logq)).sum()
    x = torch.multinomial(logp.exp(), 400_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = L.kl(logp[x][None], logq[x][None], kind).mean()
        torch.testing.assert_close(est, exact, atol=1e-2, rtol=0)


def test_kl_k3_nonnegative_and_clamped():
    g = torch.Generator().manual_seed(6)
    lp, ref = torch.randn(4, 50, generator=g) * 5, torch.randn(4, 50, generator=g) * 5
    assert (L.kl(lp, ref) >= 0).all()
    lp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[100.0, -100.0]])
    out = L.kl(lp, ref)
    # log r clamped to ±20 (e^20 - 21 and e^-20 + 19), then the value to 10, as verl's low_var_kl
    torch.testing.assert_close(out, torch.tensor([[10.0, 10.0]]))
    out.sum().backward()
    assert torch.equal(lp.grad, torch.zeros(1, 2))
    for kind in L.KL_KINDS:
        assert torch.isfinite(L.kl(torch.zeros(1, 2), ref, kind)).all()
    # the log-ratio clamp still acts before exp for k1 / k2 (their values are not clamped): log r = 20
    torch.testing.assert_close(L.kl(torch.zeros(1, 2), ref, "k1"), torch.tensor([[-20.0, 20.0]]))
    torch.testing.assert_close(L.kl(torch.zeros(1, 2), ref, "k2"), torch.tensor([[200.0, 200.0]]))


def test_kl_k3_value_clamp_hand():
    # log r = ref - lp = [3, 2, -12, -10]:
    #   e^3 - 1 - 3 = 16.0855369 -> 10;  e^2 - 1 - 2 = 4.3890561;  e^-12 - 1 + 12 = 11.0000061 -> 10;
    #   e^-10 - 1 + 10 = 9.0000454.  d k3 / d lp = 1 - r where kept: 1 - e^2 = -6.3890561, 1 - e^-10 = 0.9999546
    lp = torch.zeros(1, 4, requires_grad=True)
    ref = torch.tensor([[3.0, 2.0, -12.0, -10.0]])
    out = L.kl(lp, ref)
    torch.testing.assert_close(out, torch.tensor([[10.0, 4.3890561, 10.0, 9.0000454]]))
    out.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -6.3890561, 0.0, 0.9999546]]))


def test_kl_mask_blocks_nan_padding_gradients():
    mask = ragged_mask(4, 8, seed=7)
    g = torch.Generator().manual_seed(7)
    lp0, ref0 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    grads = []
    for lp_in, ref_in in ((lp0, ref0), (poison(lp0, mask), poison(ref0, mask, (float("nan"), float("-inf"))))):
        lp = lp_in.clone().requires_grad_()
        out = L.aggregate(L.kl(lp, ref_in, mask=mask), mask)
        out.backward()
        grads.append((out, lp.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_actor_loss_hand_kl_on_the_answer_only():
    """L_t = surrogate + kl_coef · k3 − entropy_coef · H, on policy (ρ = 1: surrogate −A); with kl_mask the
    KL covers the answer tokens alone. One row of 3 response tokens, the last two the answer."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -1.0]])
    ent = torch.tensor([[0.3, 0.2, 0.1]])
    mask, answer = torch.tensor([[1, 1, 1]]), torch.tensor([[0, 1, 1]])
    adv = torch.tensor([2.0])
    k3 = lambda lr: math.exp(lr) - 1 - lr  # log r = log π_ref − log π
    kw = dict(ref_logprobs=ref, entropy=ent, kl_coef=0.1, entropy_coef=0.01)
    loss, m = L.actor_loss(logp, logp.detach(), adv, mask, **kw)
    want = [-2 + 0.1 * k3(-0.5) - 0.003, -2 + 0.1 * k3(0.0) - 0.002, -2 + 0.1 * k3(-0.5) - 0.001]
    torch.testing.assert_close(loss, torch.tensor([want]))
    assert m["kl"].item() == pytest.approx(2 * k3(-0.5) / 3) and m["entropy"].item() == pytest.approx(0.2)
    loss, m = L.actor_loss(logp, logp.detach(), adv, mask, kl_mask=answer, **kw)
    want[0] = -2 - 0.003  # the thought token has no KL term
    torch.testing.assert_close(loss, torch.tensor([want]))
    assert m["kl"].item() == pytest.approx(k3(-0.5) / 2)  # the mean over the answer's two tokens
    loss, m = L.actor_loss(logp, logp.detach(), adv, mask, ref_logprobs=ref, kl_coef=0.0)
    assert "kl" not in m and "entropy" not in m  # not in the loss, not logged


def test_bad_kind_and_mode_strings():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        L.kl(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        L.aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(ValueError, match="token-mean"):
        L.aggregate_count(torch.ones(1, 1), "sum")
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        L.dpo_loss(*torch.zeros(4, 1), kind="kto")


# ----------------------------------------------------------------------------- aggregation

def test_aggregate_modes_hand():
    loss = torch.arange(1.0, 13.0).view(3, 4)  # [[1 2 3 4] [5 6 7 8] [9 10 11 12]]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # ragged, last row empty
    tm = L.aggregate(loss, mask, "token-mean")  # (1+2+3+5) / 4 tokens = 2.75
    sm = L.aggregate(loss, mask, "seq-mean-token-mean")  # (6/3 + 5/1 + 0) / 3 rows = 7/3
    dr = L.aggregate(loss, mask, "seq-mean-token-sum-norm")  # (6 + 5 + 0) / T=4 / 3 rows = 11/12
    torch.testing.assert_close(tm, torch.tensor(2.75))
    torch.testing.assert_close(sm, torch.tensor(7 / 3))
    torch.testing.assert_close(dr, torch.tensor(11 / 12))
    assert len({round(float(x), 5) for x in (tm, sm, dr)}) == 3
    # explicit norm_len and count: (6 + 5) / 8 / 2 = 0.6875;  token-mean with count 11: 11 / 11 = 1
    torch.testing.assert_close(L.aggregate(loss, mask, "seq-mean-token-sum-norm", count=2, norm_len=8),
                               torch.tensor(0.6875))
    torch.testing.assert_close(L.aggregate(loss, mask, "token-mean", count=torch.tensor(11)), torch.tensor(1.0))
    assert L.aggregate(loss, mask.bool()) == sm  # bool, int and float masks agree
    assert L.aggregate(loss, mask.float()) == sm


def naive_aggregate(loss, mask, mode, norm_len):
    rows = [[(loss[b, t].item(), mask[b, t].item()) for t in range(loss.shape[1])] for b in range(loss.shape[0])]
    if mode == "token-mean":
        return sum(l for row in rows for l, m in row if m) / max(1, sum(m for row in rows for _, m in row))
    per = []
    for row in rows:
        s, n = sum(l for l, m in row if m), sum(m for _, m in row)
        per.append(s / max(1, n) if mode == "seq-mean-token-mean" else s / norm_len)
    return sum(per) / len(per)


def test_aggregate_ignores_padding_poison():
    g = torch.Generator().manual_seed(13)
    mask = ragged_mask(6, 10, seed=13, empty_row=1)
    x0 = torch.randn(6, 10, generator=g)
    for mode in MODES:
        outs = []
        for x_in in (x0, poison(x0, mask)):
            x = x_in.clone().requires_grad_()
            out = L.aggregate(x, mask, mode)
            out.backward()
            outs.append((out, x.grad))
        torch.testing.assert_close(outs[1][0], outs[0][0])
        torch.testing.assert_close(outs[1][1], outs[0][1])


def test_aggregate_vs_naive_loop():
    g = torch.Generator().manual_seed(8)
    loss, mask = torch.randn(7, 11, generator=g), ragged_mask(7, 11, seed=8, empty_row=2)
    for mode in MODES:
        torch.testing.assert_close(L.aggregate(loss, mask, mode),
                                   torch.tensor(naive_aggregate(loss, mask, mode, 11), dtype=torch.float32))


@pytest.mark.parametrize("mode", MODES)
def test_microbatch_sum_equals_full_batch(mode):
    g = torch.Generator().manual_seed(9)
    mask = ragged_mask(8, 16, seed=9, empty_row=5)
    lp0, old = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    adv = torch.randn(8, generator=g)

    def objective(lp, m, count):
        pl, _ = L.policy_loss(lp, old[rows], adv[rows], m)
        return L.aggregate(pl + 0.001 * L.kl(lp, old[rows], mask=m), m, mode, count=count)

    rows = slice(None)
    lp = lp0.clone().requires_grad_()
    full = objective(lp, mask, None)  # a single call with its own count
    full.backward()
    full_grad = lp.grad.clone()
    for split in (1, 2, 4):  # micro-batches of 1, 2 or 4 rows (also: ranks), summed
        count = sum(L.aggregate_count(mask[i:i + split], mode) for i in range(0, 8, split))  # the all_reduce
        lp = lp0.clone().requires_grad_()
        total = 0.0
        for i in range(0, 8, split):
            rows = slice(i, i + split)
            part = objective(lp[rows], mask[rows], count)
            part.backward()
            total = total + part.detach()
        rows = slice(None)
        torch.testing.assert_close(total, full.detach())
        torch.testing.assert_close(lp.grad, full_grad)


def test_averaging_microbatch_means_is_wrong():
    # The classic accumulation bug (mean per micro-batch / number of micro-batches) differs on ragged rows,
    # so the equivalence test above is not vacuous.
    loss = torch.arange(1.0, 13.0).view(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    full = L.aggregate(loss, mask, "token-mean")
    wrong = sum(L.aggregate(loss[i:i + 1], mask[i:i + 1], "token-mean") for i in range(3)) / 3
    assert not torch.isclose(full, wrong)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 8.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(L.masked_mean(x, mask), torch.tensor(3.0))  # (1+2+3+4+5)/5
    # masked values [1 2 3 4 5]: mean 3, unbiased var (4+1+0+1+4)/4 = 2.5 -> (v - 3) / sqrt(2.5)
    w = L.masked_whiten(x, mask)
    s = math.sqrt(2.5 + 1e-8)
    torch.testing.assert_close(w, torch.tensor([[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]]))
    torch.testing.assert_close(L.masked_whiten(poison(x, mask), mask), w)
    torch.testing.assert_close(L.masked_mean(poison(x, mask), mask), torch.tensor(3.0))


# ----------------------------------------------------------------------------- PPO: rewards, GAE, value

def naive_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last_gae, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last_gae = delta + gamma * lam * last_gae
            adv[b, t], ret[b, t] = last_gae, last_gae + values[b, t].item()
            next_v = values[b, t].item()
    return adv, ret


def test_gae_hand():
    r, v = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # γ = λ = 1: A_t = Σ future r - V_t = 1 - V_t = [0.5, 0.4, 0.3]; returns all 1
    adv, ret = L.gae(r, v, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # γ 0.9, λ 0.5: δ2 = 1 - 0.7 = 0.3 (bootstrap 0, not V=9 of the pad), A2 = 0.3
    # δ1 = 0.9·0.7 - 0.6 = 0.03, A1 = 0.03 + 0.45·0.3 = 0.165;  δ0 = 0.9·0.6 - 0.5 = 0.04, A0 = 0.04 + 0.45·0.165
    adv, ret = L.gae(r, v, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.11425, 0.165, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.61425, 0.765, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.9)])
def test_gae_vs_naive_loop(gamma, lam):
    g = torch.Generator().manual_seed(10)
    mask = ragged_mask(6, 14, seed=10, empty_row=4)
    mask[0, :] = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0])  # holes are skipped, as documented
    r, v = torch.randn(6, 14, generator=g), torch.randn(6, 14, generator=g)
    adv, ret = L.gae(r, v, mask, gamma, lam)
    nadv, nret = naive_gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, nadv)
    torch.testing.assert_close(ret, nret)
    adv2, ret2 = L.gae(poison(r, mask), poison(v, mask), mask, gamma, lam)  # padding poison
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_last_token_rewards_vs_naive_and_nonzero_advantages():
    # Rows as the sampler makes them with pad == EOS: the mask comes from lengths, includes the first EOS.
    EOS = 2
    ids = torch.tensor([[5, 6, 7, EOS, EOS, EOS], [5, 6, 7, 8, 9, 4], [5, EOS, EOS, EOS, EOS, EOS],
                        [5, 6, EOS, EOS, EOS, EOS]])
    prompt_len, resp_len = torch.tensor([1, 2, 1, 6]), torch.tensor([3, 4, 1, 0])  # last row: empty
    pos = torch.arange(6)
    mask = (pos >= prompt_len[:, None]) & (pos < (prompt_len + resp_len)[:, None])
    assert ids[0][mask[0]].tolist() == [6, 7, EOS]  # the first EOS is in, the pads that equal it are not
    scores = torch.tensor([1.5, -2.0, 0.25, 7.0])
    out = L.last_token_rewards(scores, mask)
    naive = torch.zeros(4, 6)
    for b in range(4):
        valid = [t for t in range(6) if mask[b, t]]
        if valid:
            naive[b, valid[-1]] = scores[b]
    assert torch.equal(out, naive)
    assert out[0, 3] == 1.5 and out[1, 5] == -2.0 and out[2, 1] == 0.25 and out[3].abs().sum() == 0
    # With V = 0 and γ = λ = 1 every response token's advantage is its row's score: nonzero count = tokens.
    adv, _ = L.gae(out, torch.zeros(4, 6), mask)
    assert int((adv != 0).sum()) == int(mask.sum()) == 8
    # and on random ragged masks
    mask = ragged_mask(8, 20, seed=11)
    adv, _ = L.gae(L.last_token_rewards(torch.rand(8) + 0.5, mask), torch.zeros(8, 20), mask)
    assert int((adv != 0).sum()) == int(mask.sum())


def test_value_loss_hand():
    # (V, V_old, R) = (1, 0, 2): (1-2)² = 1, clipped V = 0.5 -> (0.5-2)² = 2.25, loss ½·2.25 = 1.125, clipped
    #                 (1, 0.8, 0): 1, V - V_old = 0.2 inside ±0.5 -> same 1, loss 0.5
    #                 (-1, 0, 0): 1, clipped V = -0.5 -> 0.25, max = 1, loss 0.5
    v = torch.tensor([[1.0, 1.0, -1.0, 50.0]], requires_grad=True)
    old, ret = torch.tensor([[0.0, 0.8, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, met = L.value_loss(v, old, ret, mask)
    torch.testing.assert_close(loss, torch.tensor([[1.125, 0.5, 0.5, 0.0]]))
    torch.testing.assert_close(met["clip_frac"], torch.tensor(1 / 3))
    loss.sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 1.0, -1.0, 0.0]]))  # clipped term: no grad to V
    loss, met = L.value_loss(v, old, ret, mask, clip=None)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.5, 0.5, 0.0]]))
    assert met["clip_frac"] == 0


def test_value_loss_inactive_on_first_epoch_and_poison():
    g = torch.Generator().manual_seed(12)
    mask = ragged_mask(5, 9, seed=12)
    v0, ret = torch.randn(5, 9, generator=g) * 3, torch.randn(5, 9, generator=g) * 3
    v = v0.clone().requires_grad_()
    loss, met = L.value_loss(v, v0, ret, mask)
    assert met["clip_frac"] == 0
    torch.testing.assert_close(loss, 0.5 * (v0 - ret) ** 2 * mask)
    L.aggregate(loss, mask, "token-mean").backward()
    vd = poison(v0, mask).requires_grad_()
    loss_d, _ = L.value_loss(vd, poison(v0, mask), poison(ret, mask), mask)
    L.aggregate(loss_d, mask, "token-mean").backward()
    torch.testing.assert_close(loss_d, loss.detach())
    torch.testing.assert_close(vd.grad, v.grad)


def test_whitening_over_ranks_reduces_sums_not_means():
    # Two ranks holding the same rows: an all_reduce that doubles every sum must give the statistics of
    # the batch stacked on itself (same μ, unbiased σ² over 2n − 1 values), not those of one copy.
    g = torch.Generator().manual_seed(13)
    mask = ragged_mask(4, 7, seed=13)
    x = torch.randn(4, 7, generator=g)
    stacked = L.masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:4]
    torch.testing.assert_close(L.masked_whiten(x, mask, all_reduce=lambda t: 2 * t), stacked)
    assert not torch.allclose(L.masked_whiten(x, mask), stacked)


def test_explained_variance_hand():
    # R = [1, 2, 3] on the mask (100 on padding): Var[R] = 1 (unbiased).
    # V = R -> 1;  V = 2 (the mean) -> Var[R − V] = Var[R] -> 0;
    # V = [3, 2, 1] -> R − V = [−2, 0, 2], Var 4 -> 1 − 4 = −3
    ret, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(L.explained_variance(ret, ret, mask), torch.tensor(1.0))
    torch.testing.assert_close(L.explained_variance(torch.full((1, 4), 2.0), ret, mask), torch.tensor(0.0))
    torch.testing.assert_close(L.explained_variance(torch.tensor([[3.0, 2.0, 1.0, -9.0]]), ret, mask),
                               torch.tensor(-3.0))
    assert torch.isnan(L.explained_variance(ret, torch.ones(1, 4), mask))  # constant returns: undefined


# ----------------------------------------------------------------------------- DPO

def test_dpo_golden_values_and_metrics():
    # chosen: -10 vs ref -14 -> +4;  rejected: -20 vs ref -18 -> -2;  margin h = 6, β = 0.1
    c, r, rc, rr = torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-14.0]), torch.tensor([-18.0])
    sig, met = L.dpo_loss(c, r, rc, rr)
    torch.testing.assert_close(sig, torch.tensor([0.437488]))  # log(1 + e^-0.6)
    torch.testing.assert_close(L.dpo_loss(c, r, rc, rr, kind="hinge")[0], torch.tensor([0.4]))  # 1 - 0.6
    torch.testing.assert_close(L.dpo_loss(c, r, rc, rr, kind="ipo")[0], torch.tensor([1.0]))  # (6 - 5)²
    torch.testing.assert_close(met["reward_margin"], torch.tensor(0.6))
    torch.testing.assert_close(met["chosen_reward"], torch.tensor(0.4))
    torch.testing.assert_close(met["rejected_reward"], torch.tensor(-0.2))
    assert met["reward_accuracy"] == 1.0
    # second pair with h = -2: accuracy 1/2, margin mean (0.6 - 0.2) / 2 = 0.2
    _, met = L.dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-20.0, -5.0]), torch.tensor([-14.0, -5.0]),
                        torch.tensor([-18.0, -7.0]))
    assert met["reward_accuracy"] == 0.5
    torch.testing.assert_close(met["reward_margin"], torch.tensor(0.2))


def test_dpo_gradient_and_stability():
    # At h = 0: loss ln 2, d/dπ_c [-log σ(β h)] = -β σ(0) = -0.05, d/dπ_r = +0.05
    c = torch.tensor([-3.0], requires_grad=True)
    r = torch.tensor([-3.0], requires_grad=True)
    loss, _ = L.dpo_loss(c, r, torch.tensor([-3.0]), torch.tensor([-3.0]))
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0)]))
    loss.sum().backward()
    torch.testing.assert_close(c.grad, torch.tensor([-0.05]))
    torch.testing.assert_close(r.grad, torch.tensor([0.05]))
    # logsigmoid: h = ±1e4 gives 0 and β·1e4 = 1000, not inf
    loss, _ = L.dpo_loss(torch.tensor([1e4, -1e4]), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    torch.testing.assert_close(loss, torch.tensor([0.0, 1000.0]))
    _, met = L.dpo_loss(*torch.zeros(4, 0))  # empty batch: finite metrics
    assert all(torch.isfinite(v) for v in met.values())
