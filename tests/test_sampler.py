"""rlmt.sampler against independent references: transformers' greedy generate, a naive no-cache loop, and
the trainer's chunked log-probs on the same tokens; rlmt.dist.full_copy under two FSDP2 processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from rlmt import chat, data, decode, dist, logprobs, sampler
from rlmt import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = ["Hi", "Tell me a story about a cat and a dog who live in the city, please",
            "why is the sky blue? explain short", "list three colors"]


def encode(tokenizer, k=3):
    """k chat prompts of different lengths (Qwen's hold <|im_end|> already: only responses are checked)."""
    return [chat.encode_prompt(tokenizer, [{"role": "user", "content": c}], "chat") for c in MESSAGES[:k]]


def naive_greedy(model, prompt, max_new_tokens, stop_ids=()):
    """The oracle: no cache; the whole sequence goes through the model for every new token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t in stop_ids:
                break
    return out


def frequent_token(model, prompts, skip=()):
    """A token that greedy decoding emits early in some rows: as an extra stop id it gives ragged lengths."""
    first = naive_greedy(model, prompts[1], 6)
    return next(t for t in first[3:] if t not in skip)


def common_tokens(model, prompts, k=1, temperature=1.0):
    """The k tokens drawn most often at `temperature`: as stop ids they end sampled rows early and raggedly."""
    out = sampler.generate(model, prompts, n=4, max_new_tokens=16, temperature=temperature, seed=123)
    counts = torch.bincount(torch.tensor([t for s in out for t in s["tokens"]]))
    return counts.topk(k).indices.tolist()


@pytest.fixture(scope="module")
def llama(llama_dir):
    return M.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return M.from_pretrained(qwen_dir)


def family(request, name):
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    return request.getfixturevalue(name), tokenizer, request.getfixturevalue(f"{name}_dir")


# ----------------------------------------------------------------------------- greedy against references

# The decode paths of generate that run on the CPU: exact live shapes (the CPU default), the GPU's bucketed
# shapes (rows on the 1, 2, 3, 4, 6, 8 ladder, widths in multiples of `bucket`; a CUDA graph each there),
# and the full-width static shape (every slot over the whole cache, the path before live shapes).
PATHS = {"exact": {}, "buckets": {"bucket": 8}, "full-width": {"full_width": True}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_greedy_equals_transformers_generate(name, path, request):
    model, tok, path_ = family(request, name)
    prompts = encode(tok)
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding on the HF side
    stops = chat.stop_ids(tok) + [frequent_token(model, prompts, chat.stop_ids(tok))]
    got = sampler.generate(model, prompts, max_new_tokens=16, temperature=0, stop_ids=stops, batch_size=3,
                           **PATHS[path])

    ref = transformers.AutoModelForCausalLM.from_pretrained(path_, dtype=torch.float32).eval()
    ids, am = data.left_pad(prompts, chat.pad_id(tok))
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=stops,
                                           pad_token_id=chat.pad_id(tok))
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=am, generation_config=config)
    for s, row in zip(got, out[:, ids.shape[1]:].tolist()):
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        assert s["tokens"] == row[:cut]
        assert s["finish_reason"] == ("stop" if s["tokens"][-1] in stops else "length")
    assert {s["finish_reason"] for s in got} == {"stop", "length"}


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_continuous_batching_equals_one_at_a_time_and_naive(name, request):
    model, tok, _ = family(request, name)
    prompts = encode(tok, 4)
    stops = [frequent_token(model, prompts)]
    # 4 prompts x 3 samples through 5 slots: rows finish at different steps and slots are refilled
    batched = sampler.generate(model, prompts, n=3, max_new_tokens=12, temperature=0, stop_ids=stops, batch_size=5)
    assert [(s["prompt_index"], s["sample_index"]) for s in batched] == [(p, i) for p in range(4) for i in range(3)]
    for p, prompt in enumerate(prompts):
        alone = sampler.generate(model, [prompt], max_new_tokens=12, temperature=0, stop_ids=stops, batch_size=1)
        want = naive_greedy(model, prompt, 12, stops)
        assert alone[0]["tokens"] == want
        for s in batched[3 * p:3 * p + 3]:
            assert s["tokens"] == want
            assert torch.allclose(s["logprobs"], alone[0]["logprobs"], atol=1e-5)
    assert len({len(s["tokens"]) for s in batched}) > 1


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_decode_paths_draw_the_same_samples(name, request):
    """Sampled rows (top-p, ragged stops, refills, a packed tail) are the same tokens and log-probs on every
    path; the live shapes read fewer KV columns than the full width, and the buckets meet several row
    counts (several graphs on a GPU) as rows finish."""
    model, tok, _ = family(request, name)
    prompts = encode(tok, 4)
    kw = dict(n=3, max_new_tokens=14, temperature=0.7, top_p=0.9, stop_ids=common_tokens(model, prompts, k=8),
              batch_size=5, seed=11)
    runs = {}
    for path, extra in [*PATHS.items(), ("buckets, k=4", {"bucket": 16, "sync_every": 4})]:
        stats = {}
        runs[path] = (sampler.generate(model, prompts, stats=stats, **kw, **extra), stats)
    want, exact = runs["exact"]
    assert len({len(s["tokens"]) for s in want}) > 2
    for path, (got, stats) in runs.items():
        assert [s["tokens"] for s in got] == [s["tokens"] for s in want], path
        assert all(torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5) for a, b in zip(got, want)), path
    full, bucketed = runs["full-width"][1], runs["buckets"][1]
    S = max(map(len, prompts)) + 14
    assert full["shapes"] == [(5, S)] and full["rows"] == 5 * full["steps"]
    assert exact["columns"] < bucketed["columns"] < full["columns"]
    rows = {r for r, _ in bucketed["shapes"]}
    assert len(rows) >= 3 and rows <= {1, 2, 3, 4, 5} and all(w % 8 == 0 for _, w in bucketed["shapes"])
    assert exact["rows"] < full["rows"] and exact["steps"] == full["steps"]  # same steps, only live rows


def test_per_sample_budgets(llama, llama_tokenizer):
    """max_new_tokens may be one budget per sample: each gets exactly its own (ignore_eos), and its tokens
    are what the sample draws with a larger budget, cut there (its uniforms are its own)."""
    prompts = encode(llama_tokenizer)
    budgets = [3, 9, 1, 6, 2, 8]
    kw = dict(n=2, temperature=1.0, seed=4, ignore_eos=True, batch_size=4)
    got = sampler.generate(llama, prompts, max_new_tokens=budgets, **kw)
    longer = sampler.generate(llama, prompts, max_new_tokens=9, **kw)
    assert [len(s["tokens"]) for s in got] == budgets and {s["finish_reason"] for s in got} == {"length"}
    assert [s["tokens"] for s in got] == [s["tokens"][:m] for s, m in zip(longer, budgets)]
    with pytest.raises(ValueError, match="one per sample"):
        sampler.generate(llama, prompts, max_new_tokens=budgets[:5], **kw)


def test_continuous_batching_refills_slots(llama, llama_tokenizer):
    """Decode steps: with refills, about total tokens / slots; in static waves of `slots` samples, the sum
    of each wave's longest sample (first tokens come from the prefill)."""
    prompts = encode(llama_tokenizer, 4)
    stops = common_tokens(llama, prompts, k=20)  # ~8% of the draws: lengths spread over 1..24
    steps = []  # the rows of each decode forward
    hook = llama.register_forward_pre_hook(lambda m, a: steps.append(len(a[0])) if a[0].shape[1] == 1 else None)
    try:
        out = sampler.generate(llama, prompts, n=2, max_new_tokens=24, temperature=1.0, stop_ids=stops,
                               batch_size=2)
    finally:
        hook.remove()
    lengths = [len(s["tokens"]) for s in out]
    waves = sum(max(lengths[i:i + 2]) - 1 for i in range(0, len(lengths), 2))
    assert max(lengths) > min(lengths) and len(steps) < waves
    assert steps[0] == 2 and steps[-1] == 1  # once nothing is pending, only the live rows are decoded


# ----------------------------------------------------------------------------- log-probs, masks, batches

@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_logprobs_equal_training_logprobs(name, temperature, request):
    model, tok, _ = family(request, name)
    prompts = encode(tok)
    stops = common_tokens(model, prompts, temperature=temperature)
    out = sampler.generate(model, prompts, n=3, max_new_tokens=20, temperature=temperature, stop_ids=stops,
                           batch_size=4, seed=3)
    batch = sampler.to_batch(prompts, out, chat.pad_id(tok))
    with torch.no_grad():
        want, _ = logprobs.sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                             batch["position_ids"], temperature=temperature)
    mask = batch["response_mask"].bool()
    assert mask.sum() == sum(len(s["tokens"]) for s in out)
    assert (batch["sampler_logp"][~mask] == 0).all()
    assert (batch["sampler_logp"] - want)[mask].abs().max() < 1e-4
    assert all(s["logprobs"].dtype == torch.float32 and s["logprobs"].shape == (len(s["tokens"]),) for s in out)


def test_to_batch_alignment():
    prompts = [[1, 2, 3], [4]]
    samples = [{"prompt_index": 1, "sample_index": 0, "tokens": [7, 8], "logprobs": torch.tensor([-0.1, -0.2]),
                "finish_reason": "stop"},
               {"prompt_index": 0, "sample_index": 0, "tokens": [9], "logprobs": torch.tensor([-0.3]),
                "finish_reason": "length"}]
    b = sampler.to_batch(prompts, samples, pad_id=8)  # pad == the first sample's stop token 8
    # prompts left-padded to 3, responses right-padded to 2
    assert b["input_ids"].tolist() == [[8, 8, 4, 7, 8], [1, 2, 3, 9, 8]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert b["position_ids"][0, 2:4].tolist() == [0, 1] and b["position_ids"][1, :4].tolist() == [0, 1, 2, 3]
    # sampler_logp[b, t] is the log-prob of input_ids[b, t], as in rlmt.logprobs.sequence_logprobs
    assert torch.equal(b["sampler_logp"], torch.tensor([[0, 0, 0, -0.1, -0.2], [0, 0, 0, -0.3, 0]]))


def test_pad_equal_to_stop_and_length_rows(llama, llama_tokenizer):
    """The stop token is also the pad id (as when a tokenizer pads with EOS): the mask still holds it, and
    rows cut at max_new_tokens are "length" with no stop token in their mask."""
    prompts = encode(llama_tokenizer, 4)
    eos = frequent_token(llama, prompts)  # greedy prompt 1 emits it; some other prompts do not
    out = sampler.generate(llama, prompts, n=2, max_new_tokens=10, temperature=0, stop_ids=[eos])
    batch = sampler.to_batch(prompts, out, pad_id=eos)
    P = batch["prompt_len"]
    assert {s["finish_reason"] for s in out} == {"stop", "length"}
    for b, s in enumerate(out):
        L = len(s["tokens"])
        assert batch["response_mask"][b].sum() == L and batch["response_mask"][b, P:P + L].all()
        masked = batch["input_ids"][b][batch["response_mask"][b].bool()].tolist()
        if s["finish_reason"] == "stop":
            assert masked[-1] == eos and eos not in masked[:-1] and L <= 10
        else:
            assert L == 10 and eos not in masked


def test_ignore_eos_gives_exactly_max_new_tokens(llama, llama_tokenizer):
    prompts = encode(llama_tokenizer)
    eos = frequent_token(llama, prompts)
    out = sampler.generate(llama, prompts, n=2, max_new_tokens=9, temperature=0, stop_ids=[eos],
                           stop_strings=["the"], tokenizer=llama_tokenizer, ignore_eos=True)
    assert all(len(s["tokens"]) == 9 and s["finish_reason"] == "length" for s in out)
    assert eos in out[2]["tokens"][:8]  # prompt 1's stop id came and did not stop the row


def test_seed(llama, llama_tokenizer):
    prompts = encode(llama_tokenizer)
    run = lambda seed, **kw: sampler.generate(llama, prompts, n=2, max_new_tokens=8, temperature=0.7,  # noqa: E731
                                              seed=seed, **kw)
    a, b, c = run(0), run(0), run(1)
    assert [s["tokens"] for s in a] == [s["tokens"] for s in b]
    assert all(torch.equal(x["logprobs"], y["logprobs"]) for x, y in zip(a, b))
    assert [s["tokens"] for s in a] != [s["tokens"] for s in c]
    assert a[0]["tokens"] != a[1]["tokens"]  # the n samples of a prompt differ
    # each sample has its own stream: the slots, their number and the packed tail change nothing
    assert [s["tokens"] for s in run(0, batch_size=1)] == [s["tokens"] for s in a]


def test_per_prompt_seeds_make_a_split_equal_the_whole(llama, llama_tokenizer):
    """Prompts split over ranks, each rank passing the seeds of its prompts: the same samples as one call."""
    prompts = encode(llama_tokenizer, 4)
    seeds = [101, 102, 103, 104]
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, stop_ids=common_tokens(llama, prompts, k=20), batch_size=4)
    whole = sampler.generate(llama, prompts, seed=seeds, **kw)
    parts = sampler.generate(llama, prompts[:1], seed=seeds[:1], **kw) + \
        sampler.generate(llama, prompts[1:], seed=seeds[1:], **kw)
    assert [s["tokens"] for s in parts] == [s["tokens"] for s in whole]
    assert len({len(s["tokens"]) for s in whole}) > 1
    with pytest.raises(ValueError, match="seed: one per prompt"):
        sampler.generate(llama, prompts, seed=seeds[:2], **kw)


def test_stop_strings(llama, llama_tokenizer):
    prompts = encode(llama_tokenizer, 2)
    free = sampler.generate(llama, prompts, max_new_tokens=16, temperature=0)
    text = llama_tokenizer.decode(free[0]["tokens"][5:7])
    got = sampler.generate(llama, prompts, max_new_tokens=16, temperature=0, stop_strings=[text],
                           tokenizer=llama_tokenizer)
    for f, g in zip(free, got):
        # the first prefix whose text holds the stop string, found by decoding every prefix
        k = next((k for k in range(1, 17) if text in llama_tokenizer.decode(f["tokens"][:k])), None)
        assert g["tokens"] == f["tokens"][:k or 16]
        assert g["finish_reason"] == ("stop" if k else "length")
    assert got[0]["finish_reason"] == "stop" and len(got[0]["tokens"]) <= 7


def test_reading_tokens_back_every_k_steps_changes_nothing(llama, llama_tokenizer):
    """sync_every > 1 (the GPU default) decodes k steps before the host books them: rows that stop (ids,
    strings, length) inside a window draw a few tokens more, which must be dropped; refills come later."""
    prompts = encode(llama_tokenizer, 4)
    kw = dict(n=3, max_new_tokens=13, temperature=1.0, top_p=0.9, stop_ids=common_tokens(llama, prompts, k=6),
              batch_size=5, seed=7)
    free = sampler.generate(llama, prompts, **kw)
    kw.update(stop_strings=[llama_tokenizer.decode(free[4]["tokens"][5:7])], tokenizer=llama_tokenizer)
    every = sampler.generate(llama, prompts, sync_every=1, **kw)
    assert len(every[4]["tokens"]) <= 7 < len(free[4]["tokens"])  # a stop string ended it
    assert {s["finish_reason"] for s in every} == {"stop", "length"} and len({len(s["tokens"]) for s in every}) > 3
    for k in (4, 13, 50):
        got = sampler.generate(llama, prompts, sync_every=k, **kw)
        assert [s["tokens"] for s in got] == [s["tokens"] for s in every]
        assert [s["finish_reason"] for s in got] == [s["finish_reason"] for s in every]
        assert all(torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5) for a, b in zip(got, every))


def test_prefill_in_chunks_changes_nothing(llama, llama_tokenizer, monkeypatch):
    prompts = encode(llama_tokenizer, 4)
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, batch_size=7, seed=3)
    whole = sampler.generate(llama, prompts, **kw)
    forwards = []  # rows of each prefill forward
    hook = llama.register_forward_pre_hook(lambda m, a: forwards.append(len(a[0])) if a[0].shape[1] > 1 else None)
    monkeypatch.setattr(sampler, "PREFILL_TOKENS", max(map(len, prompts)) * 2)  # two prompts a forward
    try:
        chunked = sampler.generate(llama, prompts, **kw)
    finally:
        hook.remove()
    assert forwards == [2, 2]  # 7 slots: prompts 0-3 start at once (the last one's second sample later)
    assert [s["tokens"] for s in chunked] == [s["tokens"] for s in whole]
    assert all(torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5) for a, b in zip(chunked, whole))


def test_stop_on_first_token_and_one_new_token(llama, llama_tokenizer):
    prompts = encode(llama_tokenizer)
    first = [naive_greedy(llama, p, 1)[0] for p in prompts]
    out = sampler.generate(llama, prompts, n=3, max_new_tokens=5, temperature=0, stop_ids=[first[1]], batch_size=2)
    for s in out:
        if s["prompt_index"] == 1:
            assert s["tokens"] == [first[1]] and s["finish_reason"] == "stop"
        else:
            assert s["tokens"][0] == first[s["prompt_index"]]
    one = sampler.generate(llama, prompts, max_new_tokens=1, temperature=0)
    assert [s["tokens"] for s in one] == [[t] for t in first]
    assert [s["finish_reason"] for s in one] == ["length"] * 3
    assert sampler.generate(llama, [], n=4, max_new_tokens=3) == []


# ----------------------------------------------------------------------------- the draw itself

def test_sample_truncation_and_frequencies():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = p.log().expand(40_000, 5)  # one row per draw; the last token has probability 0 (-inf)

    def freq(**kw):
        tok, lp = sampler.sample(logits, torch.rand(len(logits), generator=g), **kw)
        untruncated = (logits / kw.get("temperature", 1.0)).log_softmax(-1)
        assert torch.allclose(lp, untruncated.gather(-1, tok[:, None]).squeeze(-1))
        return torch.bincount(tok, minlength=5).float() / len(tok)

    assert (freq() - p).abs().max() < 0.01
    q = p ** (1 / 0.7) / (p ** (1 / 0.7)).sum()  # softmax(log p / T)
    assert (freq(temperature=0.7) - q).abs().max() < 0.01
    assert (freq(top_k=2) - torch.tensor([0.625, 0.375, 0, 0, 0])).abs().max() < 0.01
    # nucleus 0.7: keep 0.5 (mass before 0), 0.3 (before 0.5 < 0.7); drop 0.15 (before 0.8)
    assert (freq(top_p=0.7) - torch.tensor([0.625, 0.375, 0, 0, 0])).abs().max() < 0.01
    assert freq(top_p=0.5)[0] == 1.0  # mass before the second token is 0.5, not below 0.5
    # top-k first, then the nucleus of what it kept: top_k 3 keeps .5/.3/.15 (mass .95); top_p .8 of .95 = .76
    assert (freq(top_k=3, top_p=0.8) - torch.tensor([0.625, 0.375, 0, 0, 0])).abs().max() < 0.01
    tok, lp = sampler.sample(torch.tensor([[1.0, 3.0, 2.0]]), temperature=0)
    assert tok.tolist() == [1] and torch.allclose(lp, 3.0 - torch.tensor([1.0, 3.0, 2.0]).logsumexp(0))


def test_generate_rejects_bad_arguments(llama):
    for kw, match in [({"n": 0}, "n must be"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                      ({"top_k": -1}, "top_k"), ({"batch_size": 0}, "batch_size"), ({"sync_every": 0}, "sync_every"),
                      ({"stop_strings": ["x"]}, "tokenizer"), ({"max_new_tokens": 0}, "max_new_tokens"),
                      ({"bucket": 0}, "bucket")]:
        with pytest.raises(ValueError, match=match):
            sampler.generate(llama, [[1, 2]], **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate(llama, [[1], []], max_new_tokens=4)


def test_cuda_graph_needs_cuda(llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="CUDA"):
        sampler.generate(llama, [[1, 2]], max_new_tokens=4, cuda_graph=True)


def test_kv_cache_writes_each_row_at_its_position():
    """update() puts row i's key/value at column pos[i] of that layer's tensor and nowhere else, and hands
    back the first `width` columns of rows [0, b); copy_rows copies a row's first columns."""
    cache = decode.KVCache(layers=2, slots=3, kv_heads=2, length=6, head_dim=4, dtype=torch.float32, device="cpu")
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    cache.pos, cache.width = torch.tensor([4, 1]), 5
    kc, vc = cache.update(1, k, v)
    assert kc.shape == (2, 2, 5, 4)
    want_k, want_v = torch.zeros(3, 2, 6, 4), torch.zeros(3, 2, 6, 4)
    for i, p in enumerate([4, 1]):  # the naive loop
        want_k[i, :, p], want_v[i, :, p] = k[i, :, 0], v[i, :, 0]
    assert torch.equal(cache.k[1], want_k) and torch.equal(cache.v[1], want_v)
    assert not cache.k[0].any() and not cache.v[0].any()  # the other layer untouched
    cache.copy_rows(2, 0, 5)
    assert torch.equal(cache.k[1][2, :, :5], want_k[0, :, :5]) and torch.equal(cache.v[1][2], want_v[0])


def test_progress_bar(llama, llama_tokenizer, capsys):
    sampler.generate(llama, encode(llama_tokenizer), n=2, max_new_tokens=4, progress=True)
    err = capsys.readouterr().err
    assert "6/6" in err and "tok/s" in err


def test_compiled_decode_equals_eager(llama, llama_tokenizer):
    """torch.compile of the step, over the bucketed shapes (a second shape recompiles with dynamic shapes)."""
    prompts = encode(llama_tokenizer)
    stops = common_tokens(llama, prompts, k=20, temperature=0.7)
    for temperature in (0, 0.7):  # one compiled step serves both: it returns logits
        kw = dict(n=2, max_new_tokens=12, temperature=temperature, stop_ids=stops, batch_size=4, seed=5, bucket=8)
        eager = sampler.generate(llama, prompts, **kw)
        compiled = sampler.generate(llama, prompts, compile=True, **kw)
        assert [s["tokens"] for s in eager] == [s["tokens"] for s in compiled]
        assert all(torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5) for a, b in zip(eager, compiled))


# ----------------------------------------------------------------------------- rlmt.dist

def test_dist_single_process(monkeypatch, llama_dir, llama_tokenizer):
    """No torchrun: rank 0 of a one-process group kept in memory, so a trained model is an FSDP2 module
    here as under torchrun. The sampler refuses it and decodes its full_copy, a plain module that gives the
    plain model's tokens; a plain model already in the asked dtype is its own copy."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    try:
        assert dist.init() == (0, 1, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        assert dist.is_main() and torch.distributed.get_world_size() == 1
        plain = M.from_pretrained(llama_dir)
        with dist.full_copy(plain) as m:
            assert m is plain
        trained = dist.shard(M.from_pretrained(llama_dir), torch.device("cpu"), torch.float32)
        prompts = [llama_tokenizer("the sky is")["input_ids"]]
        kw = dict(max_new_tokens=8, temperature=0.0)
        with pytest.raises(ValueError, match="full_copy"):
            sampler.generate(trained, prompts, **kw)
        with dist.full_copy(trained) as copy:
            assert not dist.is_sharded(copy)
            got = sampler.generate(copy, prompts, **kw)
        assert got[0]["tokens"] == sampler.generate(plain, prompts, **kw)[0]["tokens"]
    finally:
        dist.cleanup()
    assert not torch.distributed.is_initialized()


FSDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor
sys.path.insert(0, {root!r})
from rlmt import dist, sampler
from rlmt import model as M

rank, world, device = dist.init()
plain = M.from_pretrained({path!r})
sharded = dist.shard(M.from_pretrained({path!r}), device, torch.float32)  # trained: fp32, FSDP2
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, 300, (k,), generator=g).tolist() for k in (5, 17, 9)]
new = 6 + 5 * rank  # the ranks decode different numbers of steps: nothing may wait on the other
kw = dict(n=2, max_new_tokens=new, temperature=0, batch_size=3)
want = sampler.generate(plain, prompts, **kw)

calls = []  # every collective of torch.distributed (FSDP2's hooks use these), counted
names = [n for n in dir(tdist) if callable(getattr(tdist, n))
         and n.lstrip("_").startswith(("all_", "reduce", "broadcast", "gather", "scatter"))]
for n in names:
    setattr(tdist, n, lambda *a, _f=getattr(tdist, n), _n=n, **k: calls.append(_n) or _f(*a, **k))
sampled = dict(kw, temperature=0.8, top_p=0.9, seed=[7, 8, 9], bucket=4)  # the rollout's kind of call
want_sampled = sampler.generate(plain, prompts, **sampled)
with dist.full_copy(sharded) as copy:
    entry = len(calls)
    got = sampler.generate(copy, prompts, **kw)
    got_sampled = sampler.generate(copy, prompts, **sampled)
    in_loop = len(calls) - entry
    same = all(torch.equal(p, plain.state_dict()[k]) for k, p in copy.state_dict().items())
still_sharded = isinstance(sharded.model.layers[0].mlp.up_proj.weight, DTensor)
with dist.full_copy(sharded, torch.bfloat16) as copy:  # the rollout copy of a bf16-compute run
    bf16 = all(torch.equal(p, plain.state_dict()[k].bfloat16()) for k, p in copy.state_dict().items())
sharded(torch.tensor([prompts[0]])).logsumexp(-1).mean().backward()  # training still works afterwards
grads = all(p.grad is not None for p in sharded.parameters())
json.dump({{"equal": [s["tokens"] for s in got] == [s["tokens"] for s in want] and
           [s["tokens"] for s in got_sampled] == [s["tokens"] for s in want_sampled], "in_loop": in_loop, "same": same,
           "bf16": bf16, "sharded": still_sharded, "grads": grads}}, open({out!r} + str(rank), "w"))
dist.cleanup()
"""


def test_full_copy_of_an_fsdp2_model_two_processes(llama_dir, tmp_path):
    """dist.shard on 2 gloo processes, then dist.full_copy: the plain copy holds the full weights (in
    fp32, and cast to bf16 when asked), decodes the same greedy and sampled tokens as one process with no
    collective inside generate, and leaves the trained model sharded and trainable."""
    script = tmp_path / "fsdp_generate.py"
    script.write_text(FSDP_SCRIPT.format(root=ROOT, path=llama_dir, out=str(tmp_path / "rank")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}").read_text())
        assert res == {"equal": True, "in_loop": 0, "same": True, "bf16": True, "sharded": True, "grads": True}
