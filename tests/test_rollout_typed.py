"""The typed rollout (rollout.Rollout) and its token-level answer mask: chat.answer_tokens against a
naive reference that decodes every prefix, on the tiny tokenizers and the real Llama 3 / Qwen3 ones, with
multi-byte characters split over tokens at the boundaries; and the fields of a real tiny rollout."""

import os
import random

import pytest
import torch

from rlmt import chat, model as M, rollout, sampler

TOKENIZERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                          "tokenizers")


def real(name):
    path = os.path.join(TOKENIZERS, name)
    if not os.path.isdir(path):
        pytest.skip(f"no real tokenizer in {path}")
    return chat.load_tokenizer(path)


@pytest.fixture(params=["tiny-llama", "tiny-qwen", "llama-3.2-base", "qwen3"])
def tok(request):
    if request.param.startswith("tiny"):
        return request.getfixturevalue("llama_tokenizer" if request.param == "tiny-llama" else "qwen_tokenizer")
    return real(request.param)


@pytest.fixture(params=["bytes", "bisect"])
def path(request, monkeypatch):
    """Both ways answer_tokens finds the tokens: per-id byte counts, and the prefix-decode binary search."""
    if request.param == "bisect":
        monkeypatch.setattr(chat, "_byte_counts", lambda tokenizer: None)
    return request.param


def naive(tokenizer, tokens, text, span):
    """[T] bools: token j holds a character of text[start:end]. Token j holds characters
    [lo, hi): hi = len(decode(tokens[:j + 1])), lo = len(decode(tokens[:j])), minus one when that prefix
    ends inside a character (it decodes to U+FFFD, not to a prefix of the text): token j holds the rest."""
    start, end = span
    dec = [tokenizer.decode(tokens[:k], skip_special_tokens=False) for k in range(len(tokens) + 1)]
    out = []
    for j in range(len(tokens)):
        lo = len(dec[j]) - (dec[j] != text[:len(dec[j])])
        hi = len(dec[j + 1])
        out.append(start < end and hi > lo and lo < end and hi > start)
    return out


def check(tokenizer, tokens, text, span):
    first, end = chat.answer_tokens(tokenizer, tokens, text, span)
    want = naive(tokenizer, tokens, text, span)
    got = [first <= j < end for j in range(len(tokens))]
    assert got == want, (text, span, first, end)
    if any(want):
        assert first == want.index(True)
    return first, end


# thoughts ending in characters that take several tokens (CJK extension B, emoji, a ZWJ sequence) right
# before the delimiter, answers starting and ending in them, and straddles (">Hello", ".</")
TEXTS = [
    ("chat-think", "<think>思考一下 𠜎🦩</think>\n\n答案是🦩。𠜎"),
    ("chat-think", "<think>plan 🧑‍🚀</think>Hello 世界𠜎!"),
    ("think", "ok 😀😀𠜎</think>𠜎 answer."),
    ("think", "ok</think>   "),  # an empty answer after its delimiter
    ("chat", "just 🦩 text, no delimiter 𠜎 "),
    ("chat", "<think>a 𠜎</think>Hi"),  # chat splits off a thought it wrote anyway
    ("zero", "<think> 😀𠜎 </think> <response>答🦩𠜎</response>"),
    ("zero", "<think>x</think><response>ok.</response> trailing"),
    ("zero-nothink", "<response>cut at the length 𠜎"),
]


@pytest.mark.parametrize("template,text", TEXTS)
def test_answer_tokens_against_naive(tok, path, template, text):
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tokens, skip_special_tokens=False) == text
    span = chat.answer_span(text, template)
    assert text[span[0]:span[1]] == chat.split_answer(text, template)[1]
    first, end = check(tok, tokens, text, span)
    if span[0] < span[1]:  # the answer's tokens decode to the answer, plus at most a straddled piece
        assert chat.split_answer(text, template)[1] in tok.decode(tokens[first:end], skip_special_tokens=False)
    else:
        assert first == end


def test_random_spans_and_split_characters(tok, path):
    """Random token sequences (partial UTF-8 pieces included) and random spans of their text."""
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(30):
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
        text = tok.decode(tokens, skip_special_tokens=False)
        if "\ufffd" in text and path == "bytes":
            continue  # invalid UTF-8 always takes the prefix-decode path; tested there
        a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
        check(tok, tokens, text, (a, b))


def test_straddling_token_belongs_to_the_answer():
    """Llama 3 writes "</think>Hello" with one token ">Hello": it holds the answer's first characters, so
    it is the answer's first token and the thought ends before it."""
    t = real("llama-3.2-base")
    text = "plan</think>Hello"
    tokens = t(text, add_special_tokens=False)["input_ids"]
    pieces = [t.decode([i]) for i in tokens]
    assert ">Hello" in pieces
    first, end = chat.answer_tokens(t, tokens, text, chat.answer_span(text, "think"))
    assert (first, end) == (pieces.index(">Hello"), len(tokens))


def test_byte_counts_sum_to_the_text(tok):
    """The fast path's premise on every tokenizer: an id's byte count is what it adds to the decode."""
    counts = chat._byte_counts(tok)
    assert counts is not None
    text = "a 😀 𠜎 <think> 思考 </think> ok" + "".join(chat.END_TOKENS[:2])
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    assert int(counts[tokens].sum()) == len(tok.decode(tokens, skip_special_tokens=False).encode())


# ----------------------------------------------------------------------------- through rollout()

FIELDS = {"batch", "prompt_len", "rewards", "format_ok", "parseable", "response_len", "thought_len", "finish",
          "prompt_ids", "ids", "prompts", "texts", "thoughts", "answers", "n_truncated", "t_sample", "t_reward"}
ROWS = [{"id": "a", "messages": [{"role": "user", "content": "why is the sky blue"}]},
        {"id": "b", "messages": [{"role": "user", "content": "name three colors"}]}]


def words(prompts, answers):
    return [len(a.split()) for a in answers]


def test_fields_of_a_real_tiny_rollout(llama_dir, llama_tokenizer):
    policy = M.from_pretrained(llama_dir).eval()
    ro = rollout.rollout(policy, llama_tokenizer, ROWS, template="chat", group_size=3, reward_fn=words,
                         max_prompt_len=64, max_new_tokens=10, temperature=1.0, seed=1)
    assert isinstance(ro, rollout.Rollout) and {f for f in vars(ro)} == FIELDS
    N, P = 6, ro.prompt_len
    assert isinstance(P, int) and P == max(map(len, ro.prompt_ids))
    assert set(ro.batch) == {"input_ids", "attention_mask", "position_ids", "response_mask", "sampler_logp",
                             "answer_mask"}
    T = P + int(ro.response_len.max())
    for k, v in ro.batch.items():
        assert torch.is_tensor(v) and v.shape == (N, T), k
        assert v.dtype == (torch.float32 if k == "sampler_logp" else torch.long), k
    for k, dtype in (("rewards", torch.float32), ("format_ok", torch.bool), ("parseable", torch.bool),
                     ("response_len", torch.float32), ("thought_len", torch.float32)):
        v = getattr(ro, k)
        assert v.shape == (N,) and v.dtype == dtype, k
    assert all(len(getattr(ro, k)) == N for k in ("finish", "ids", "prompts", "texts", "thoughts", "answers"))
    assert ro.rewards.tolist() == words(None, ro.answers)
    m, a = ro.batch["response_mask"], ro.batch["answer_mask"]
    assert ((a == 1) <= (m == 1)).all()  # the answer lies in the response
    assert torch.equal(ro.response_len, m.sum(1).float())
    stops = set(chat.stop_ids(llama_tokenizer))
    for b in range(N):
        tokens = ro.batch["input_ids"][b, P:P + int(ro.response_len[b])].tolist()
        toks = tokens[:-1] if tokens[-1] in stops else tokens
        assert llama_tokenizer.decode(toks, skip_special_tokens=False) == ro.texts[b]
        want = naive(llama_tokenizer, toks, ro.texts[b], chat.answer_span(ro.texts[b], "chat"))
        if ro.answers[b]:
            want += [True] * (len(tokens) - len(toks))  # the stop token, with the answer
        assert a[b, P:P + len(tokens)].bool().tolist() == want, ro.texts[b]
        assert ro.thought_len[b] == (want.index(True) if any(want) else len(toks))
    met = rollout.metrics(ro)
    assert met["answer_len"] == a.sum(1).float().mean() and met["thought_len"] == ro.thought_len.mean()
    assert rollout.sample_rows(ro, 2)[0]["text"] == ro.texts[0]


def scripted(monkeypatch, tokenizer, texts, stop=True):
    """sampler.generate replaced by one that writes `texts` (one per sample, prompt-major), each ending with
    the end-of-turn token when `stop`, so rollout() runs on known responses."""
    eot = chat.stop_ids(tokenizer)[0]
    def generate(model, prompts, n=1, **kw):
        out = []
        for j, text in enumerate(texts):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eot] if stop else [])
            out.append({"prompt_index": j // n, "sample_index": j % n, "tokens": tokens,
                        "logprobs": torch.full((len(tokens),), -0.5), "finish_reason": "stop" if stop else "length"})
        return out
    monkeypatch.setattr(sampler, "generate", generate)


def run(llama_dir, tokenizer, template, strict=False, group_size=2):
    return rollout.rollout(M.from_pretrained(llama_dir).eval(), tokenizer, ROWS, template=template,
                           group_size=group_size, reward_fn=words, max_prompt_len=64, max_new_tokens=64,
                           strict=strict)


def response(ro, b, key="answer_mask"):
    return ro.batch[key][b, ro.prompt_len:ro.prompt_len + int(ro.response_len[b])].tolist()


@pytest.mark.parametrize("tokenizer", ["llama-3.2-base", "qwen3"])
def test_rollout_masks_on_known_responses(monkeypatch, llama_dir, tokenizer):
    """On the real tokenizers (the tiny model's embedding never sees these ids: generate is scripted):
    strict [NULL] -> zeros and the whole response as thought; </think> splits; the stop token is the
    answer's; thought_len counts the tokens before the answer's first."""
    t = real(tokenizer)
    if not getattr(t, "chat_template", None):
        t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    texts = ["<think>思考 𠜎🦩</think>\n\n答案🦩 yes", "<think>never closed 𠜎", "<think>a</think>",
             "<think>b 😀</think>Hello there"]
    scripted(monkeypatch, t, texts)
    ro = run(llama_dir, t, "chat-think", strict=True)
    n = [len(t(x, add_special_tokens=False)["input_ids"]) for x in texts]
    for b in (0, 3):  # the tokens after </think> (whitespace after it excluded), then the stop token
        tokens = t(texts[b], add_special_tokens=False)["input_ids"]
        want = [int(x) for x in naive(t, tokens, texts[b], chat.answer_span(texts[b], "chat-think"))] + [1]
        assert response(ro, b) == want and 0 < want.index(1) < n[b]
        assert ro.thought_len[b] == want.index(1) and want[want.index(1):] == [1] * (len(want) - want.index(1))
    # strict, no </think>: "[NULL]", no answer token, every token before the (absent) answer
    assert ro.answers[1] == chat.NULL_ANSWER and response(ro, 1) == [0] * (n[1] + 1)
    assert ro.thought_len[1] == n[1] + 1
    # an empty answer after its delimiter: only the stop token
    assert ro.answers[2] == "" and response(ro, 2) == [0] * n[2] + [1] and ro.thought_len[2] == n[2]
    assert ro.batch["sampler_logp"][0, ro.prompt_len] == -0.5
    assert ro.parseable.tolist() == [True, False, True, True]


def test_chat_without_delimiter_is_all_answer(monkeypatch, llama_dir, llama_tokenizer):
    scripted(monkeypatch, llama_tokenizer, ["plain answer here", "the cat", "a dog", "why"])
    ro = run(llama_dir, llama_tokenizer, "chat", strict=True)
    assert torch.equal(ro.batch["answer_mask"], ro.batch["response_mask"])
    assert (ro.thought_len == 0).all()


def test_zero_answer_between_response_tags(monkeypatch, llama_dir, llama_base_tokenizer):
    """Zero: the tokens between <response> and </response>; the tags are not the answer, the stop token is;
    strict without </response> scores [NULL] (zeros), non-strict keeps what was written (no stop token
    when the sample hit the length limit)."""
    t = llama_base_tokenizer
    texts = ["<think> plan </think> <response> the answer </response>", "<think> x </think> <response> cut",
             "<response> one </response>", "no tags"]
    enc = lambda s: t(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for strict in (False, True):
        scripted(monkeypatch, t, texts, stop=not strict)
        ro = run(llama_dir, t, "zero", strict=strict)
        for b, text in enumerate(texts):
            tokens = enc(text)
            span = chat.answer_span(text, "zero", strict=strict)
            got = response(ro, b)
            if span is None:
                assert got == [0] * len(got) and ro.thought_len[b] == len(got), text
                continue
            want = naive(t, tokens, text, span) + ([] if strict else [True])
            assert got == [int(x) for x in want], text
            assert t.decode([x for x, m in zip(tokens, got) if m]).strip() == ro.answers[b]
        if not strict:
            assert "</response>" not in t.decode([x for x, m in zip(enc(texts[0]), response(ro, 0)) if m])
        else:
            assert [chat.answer_span(x, "zero", strict=True) is None for x in texts] == [False, True, False, True]
