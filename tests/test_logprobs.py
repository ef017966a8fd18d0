"""Chunked log-probs and entropy against the naive log_softmax + gather (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from rlmt import data, model as M
from rlmt.chunked import token_logprobs
from rlmt.logprobs import packed_logprobs, packed_values, sequence_logprobs, sequence_values
from conftest import assert_close_to_scale


def _naive(hidden, weight, targets, temperature):
    # the logits through the kernel the model uses (F.linear): with bf16 inputs another GEMM may round the
    # bf16 output differently, a 2^-8 relative difference that is not what these tests are about
    logp_all = torch.log_softmax(F.linear(hidden, weight).float() / temperature, dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("with_entropy", [True, False])  # the closed-form backward has a branch for each
def test_chunked_equals_naive(temperature, chunk_size, with_entropy):
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 3, 11, 16, 50
    h0 = torch.randn(B, T, D, generator=g) * 0.3
    w0 = torch.randn(V, D, generator=g) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    coef = torch.randn(B, T, generator=g, dtype=torch.float32)  # an arbitrary downstream loss
    results = []
    for fn in (_naive, lambda h, w, t, temp: token_logprobs(h, w, t, temp, with_entropy, chunk_size)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        logp, ent = fn(h, w, targets, temperature)
        loss = (logp * coef).sum() + ((ent * coef).sum() * 0.5 if with_entropy else 0)
        loss.backward()
        results.append((logp, ent if with_entropy else None, h.grad, w.grad))
    # another summation order (chunks of other shapes), measured 4e-7 of each value's scale; a wrong term in
    # the closed-form backward, or a temperature left out, is off by 1e-1 or more
    for a, b, what in zip(*results, ("log-probs", "entropy", "hidden grad", "weight grad")):
        if a is None:
            assert b is None
            continue
        assert_close_to_scale(a, b, 1e-5, what)


def test_float32_math_on_bf16_weights():
    """bf16 hidden states and weights: the bf16 logits are upcast, then softmaxed in fp32 (as verl and TRL
    do; an fp32 copy of an [128256, 4096] lm_head would cost 2 GB)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 8, generator=g).bfloat16()
    w = torch.randn(40, 8, generator=g).bfloat16()
    t = torch.randint(0, 40, (2, 5), generator=g)
    logp, _ = token_logprobs(h, w, t, 0.7)
    assert logp.dtype == torch.float32
    want, _ = _naive(h, w, t, 0.7)
    assert_close_to_scale(logp, want, 1e-5)  # the same bf16 logits, then fp32 math in another order
    in_bf16 = torch.log_softmax((h @ w.T) / 0.7, -1).gather(-1, t[..., None]).squeeze(-1)
    assert (in_bf16.float() - want).abs().max() > 1e-3  # what a bf16 log-softmax would have lost


def test_bf16_gradients():
    """The closed-form backward hands bf16 weights a bf16 gradient, as autograd through the naive path does."""
    g = torch.Generator().manual_seed(3)
    h0 = (torch.randn(2, 6, 8, generator=g) * 0.5).bfloat16()
    w0 = (torch.randn(40, 8, generator=g) * 0.5).bfloat16()
    t = torch.randint(0, 40, (2, 6), generator=g)
    coef = torch.randn(2, 6, generator=g)
    grads = []
    for fn in (_naive, lambda h, w, t, temp: token_logprobs(h, w, t, temp, True, 5)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        logp, ent = fn(h, w, t, 0.7)
        ((logp * coef).sum() + (ent * coef).sum() * 0.5).backward()
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):  # bf16 (2^-8 = 3.9e-3): ~5 of its ulps of the scale; measured 3e-3 (one ulp)
        assert a.dtype == torch.bfloat16
        assert_close_to_scale(a, b, 2e-2)


def test_no_grad_path_and_negative_targets():
    h, w = torch.randn(1, 4, 8), torch.randn(20, 8)
    t = torch.tensor([[1, -100, 3, 4]])  # ignore-index style ids must not crash the gather
    with torch.no_grad():
        logp, ent = token_logprobs(h, w, t)
    assert ent is None and torch.isfinite(logp).all()


def test_sequence_logprobs_alignment(llama_dir):
    """sequence_logprobs[:, t] is log p(ids[t] | ids[:t]), read from the full logits by hand."""
    model = M.from_pretrained(llama_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    with torch.no_grad():
        logp, ent = sequence_logprobs(model, ids, am, temperature=0.7, with_entropy=True)
        logits = model(ids, am).float() / 0.7
    ref = torch.log_softmax(logits, -1)
    assert logp[:, 0].abs().max() == 0
    want = ref[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # logp[:, t] is read from position t - 1
    assert_close_to_scale(logp[:, 1:], want, 1e-5, "log-probs")
    assert_close_to_scale(ent[:, 1:], -(ref.exp() * ref).sum(-1)[:, :-1], 1e-5, "entropy")


def test_gradients_reach_the_model(llama_dir):
    model = M.from_pretrained(llama_dir).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    logp, _ = sequence_logprobs(model, ids)
    logp.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("start", [0, 1, 4, 8])  # T = 9: none skipped, only position 0, a prompt, all but one
@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_dir"])  # untied and tied (lm_head = embeddings)
def test_start_skips_the_head_before_it(fixture, start, request):
    """sequence_logprobs(start=s): on positions ≥ s the log-probs, entropies and every parameter's gradient
    equal the full computation's (the trunk still reads the whole row); before s they are exactly 0."""
    model = M.from_pretrained(request.getfixturevalue(fixture)).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[0, :2] = 0  # left padding, as in a rollout batch
    keep = (torch.arange(9) >= start).float()
    coef = torch.randn(3, 9, generator=g) * keep  # a loss that reads only positions ≥ start, as the mask does
    results = []
    for s in (0, start):
        model.zero_grad(set_to_none=True)
        logp, ent = sequence_logprobs(model, ids, am, temperature=0.7, with_entropy=True, start=s)
        ((logp * coef).sum() + (ent * coef).sum() * 0.5).backward()
        results.append((logp, ent, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp, ent, grads), (logp_s, ent_s, grads_s) = results
    assert logp_s.shape == ent_s.shape == (3, 9)
    assert logp_s[:, :start].abs().sum() == 0 and ent_s[:, :start].abs().sum() == 0
    # the head runs over fewer positions, so another GEMM shape and summation order (measured: 6e-7 of scale)
    assert_close_to_scale(logp_s[:, start:], logp[:, start:], 1e-5, "log-probs")
    assert_close_to_scale(ent_s[:, start:], ent[:, start:], 1e-5, "entropy")
    assert grads.keys() == grads_s.keys()
    for n in grads:
        assert_close_to_scale(grads_s[n], grads[n], 1e-5, n)


def test_start_out_of_range(llama_dir):
    model = M.from_pretrained(llama_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        assert sequence_logprobs(model, ids, start=5)[0].abs().sum() == 0  # nothing left to score
        for bad in (-1, 6):
            with pytest.raises(ValueError, match="outside"):
                sequence_logprobs(model, ids, start=bad)


def test_sequence_values_alignment(llama_dir):
    """A critic's values[:, t] = V(ids[:t]): the score head at t − 1, the state in which token t was chosen,
    so it pairs with sequence_logprobs[:, t]; changing token t leaves values[:, t] unchanged."""
    critic = M.from_pretrained(llama_dir, head="score")  # the policy's trunk, a fresh value head
    ids = torch.randint(0, critic.config.vocab_size, (2, 7))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    with torch.no_grad():
        values = sequence_values(critic, ids, am)
        per_position = critic(ids, am)
        changed = ids.clone()
        changed[:, 4] = (changed[:, 4] + 1) % critic.config.vocab_size
        values_changed = sequence_values(critic, changed, am)
    assert values.dtype == torch.float32 and values[:, 0].abs().max() == 0
    torch.testing.assert_close(values[:, 1:], per_position[:, :-1].float())
    torch.testing.assert_close(values_changed[:, :5], values[:, :5])
    assert (values_changed[:, 5] - values[:, 5]).abs().min() > 0


# ----------------------------------------------------------------------------- packed rows

def _rollout_like(vocab, prompt_lens, response_lens, seed=0):
    """A batch laid out as a rollout's (rlmt.data.join: left-padded prompts, right-padded responses)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in response_lens]
    return data.join(prompts, responses, 0)


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_dir"])  # GQA + untied, q/k/v bias + tied
def test_packed_equals_padded(fixture, request):
    """packed_logprobs (the rows end to end in one row, the head only on response tokens) == the padded
    path (sequence_logprobs on the left/right-padded batch, a dense mask): per-token log-probs and
    entropies at T 0.7, and every parameter's gradient of a loss that reads the response tokens, on
    ragged lengths (prompts 3-70, responses 1-40; 70 passes the llama3 scaling's original context)."""
    model = M.from_pretrained(request.getfixturevalue(fixture)).train()
    b = _rollout_like(model.config.vocab_size, [12, 70, 3, 25, 40], [9, 1, 40, 17, 30])
    mask = b["response_mask"]
    coef = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask  # a loss on response tokens
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        if packed:
            logp, ent = packed_logprobs(model, b, mask, 0.7, with_entropy=True)
        else:
            logp, ent = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"], 0.7,
                                          with_entropy=True, start=b["prompt_len"])
        ((logp * coef).sum() + (ent * coef).sum() * 0.5).backward()
        results.append((logp, ent, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp, ent, grads), (logp_p, ent_p, grads_p) = results
    m = mask.bool()
    assert logp_p.shape == ent_p.shape == mask.shape and logp_p[~m].abs().sum() == 0 and ent_p[~m].abs().sum() == 0
    # the same math over other shapes (attention per sequence, the head over fewer rows): summation order
    # only, measured ~5e-7 of each tensor's scale; a token that saw another sequence is off by 1e-2 or more
    assert_close_to_scale(logp_p[m], logp[m], 1e-5, "log-probs")
    assert_close_to_scale(ent_p[m], ent[m], 1e-5, "entropy")
    assert grads.keys() == grads_p.keys()
    for n in grads:
        assert_close_to_scale(grads_p[n], grads[n], 1e-5, n)


def test_one_packed_sequence_does_not_reach_the_others(llama_dir):
    """Changing every token of one sequence changes its own log-probs and no other's."""
    model = M.from_pretrained(llama_dir)
    b = _rollout_like(model.config.vocab_size, [5, 9, 7], [8, 6, 10])
    changed = {**b, "input_ids": b["input_ids"].clone()}
    row = changed["input_ids"][1]
    row[b["attention_mask"][1].bool()] = (row[b["attention_mask"][1].bool()] + 1) % model.config.vocab_size
    with torch.no_grad():
        logp, _ = packed_logprobs(model, b, b["response_mask"])
        logp_changed, _ = packed_logprobs(model, changed, b["response_mask"])
    assert torch.equal(logp[[0, 2]], logp_changed[[0, 2]])  # bit for bit: per-sequence attention, same shapes
    assert (logp[1] - logp_changed[1]).abs().max() > 1e-2


def test_packed_values_equal_sequence_values(llama_dir):
    critic = M.from_pretrained(llama_dir, head="score")
    b = _rollout_like(critic.config.vocab_size, [4, 11, 6], [7, 2, 12])
    m = b["response_mask"].bool()
    with torch.no_grad():
        want = sequence_values(critic, b["input_ids"], b["attention_mask"], b["position_ids"])
        got = packed_values(critic, b, b["response_mask"])
    assert got.dtype == torch.float32 and got[~m].abs().sum() == 0
    assert_close_to_scale(got[m], want[m], 1e-5, "values")


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_dir"])
def test_an_empty_micro_batch_still_runs_forward_and_backward(fixture, request):
    """No rows (a lighter rank's extra micro-batch): [0, T] results, a loss of 0, and a backward that
    reaches every parameter (zero gradients, not None), as FSDP's reduce-scatter needs on every rank."""
    model = M.from_pretrained(request.getfixturevalue(fixture)).train()
    critic = M.from_pretrained(request.getfixturevalue(fixture), head="score").train()
    b = _rollout_like(model.config.vocab_size, [4, 6], [3, 5])
    empty = {k: v[[]] for k, v in b.items() if torch.is_tensor(v)}
    logp, ent = packed_logprobs(model, empty, empty["response_mask"], 0.7, with_entropy=True)
    values = packed_values(critic, empty, empty["response_mask"])
    assert logp.shape == ent.shape == values.shape == (0, b["input_ids"].shape[1])
    (logp.sum() + ent.sum() + values.sum()).backward()
    for net in (model, critic):
        for n, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() == 0, n
