r"""Prompt templates and the thought / answer split.

Five ways to turn a conversation (a list of {"role", "content"} messages) into a prompt:

  chat          the model's own chat template, assistant turn opened: no thinking expected (plain RLHF,
                the paper's no-think baselines)
  chat-think    the same prompt, for a warm-started model that opens <think> itself: the paper's GRPO and
                PPO rollouts and its evaluation of warm-started models
  think         the same, with the assistant turn pre-filled with "<think>\n": the paper's DPO pair
                sampling (the warm-start SFT target is "<think>\n{thought}\n</think>\n\n{answer}")
  zero          the paper's instruction for a base model (R1-Zero style); needs no chat template
  zero-nothink  the same without the thinking part (the paper's no-think Zero baseline)

The reward model scores only the answer (`split_answer`) against the original user turn (`user_turn`),
never the thought and never the Zero instruction.
"""

import bisect
import os
import weakref

import numpy as np

from rlmt import hub

TEMPLATES = ("chat", "chat-think", "think", "zero", "zero-nothink")
THINKING = ("chat-think", "think", "zero")  # the model writes a thought before its answer

# The paper's Zero instruction (appendix C of arXiv 2509.20357), verbatim.
ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. Following the User's query, the Assistant first plans a "
    "response, and then provides the response. The internal reasoning process is enclosed within <think> "
    "</think> tags and the response is enclosed within <response> </response> tags, i.e., in the format "
    "<think> reasoning process here </think> <response> response here </response>."
)
# The no-think Zero baseline: the authors' released template, verbatim (DESIGN.md). The paper's appendix
# words it differently ("provides the user with a response"); the released code is what the runs used.
ZERO_NOTHINK_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the assistant provides a "
    "response. The response is enclosed within <response> </response> tags, i.e., <response> response "
    "</response>."
)
ZERO_QUERY = "User: <query>{prompt}</query>\nAssistant:"  # after the instruction and a blank line

# End-of-turn / end-of-text tokens of the Llama 3 and Qwen2 families. A Zero run on a base model ends its
# turn with the family's end-of-turn token while the tokenizer's EOS is end-of-text, so stop on any.
END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"
NULL_ANSWER = "[NULL]"  # what strict mode scores when the delimiter is missing (the authors' choice)


def load_tokenizer(path_or_alias, trust_remote_code=False):
    """An HF tokenizer from a local folder, a model alias or a hub id (resolved by rlmt.hub)."""
    from transformers import AutoTokenizer

    folder = hub.resolve_path(path_or_alias)
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(folder, f)) for f in files):
        raise FileNotFoundError(f"{path_or_alias}: no tokenizer in {folder} (expected one of {', '.join(files)})")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def pad_id(tokenizer):
    """The id used to fill padding: the pad token, else EOS. Masks never come from it, so any id works."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    return pid


def stop_ids(tokenizer):
    """Sorted unique ids that end a sample: EOS plus every END_TOKENS entry the vocabulary holds."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no EOS and none of the end-of-turn tokens " + ", ".join(END_TOKENS))
    return sorted(ids)


def user_turn(messages):
    """The content of the last user message: what the reward model sees as the prompt in Zero runs."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    raise ValueError("the conversation has no user message")


def render(tokenizer, messages, template):
    """Prompt text for `messages` under `template` (one of TEMPLATES), ending where the model writes.

    chat / chat-think / think use the tokenizer's chat template (which holds the BOS, if any); zero /
    zero-nothink use only the last user turn, stripped like the paper's released template does (system
    and earlier turns are dropped: Zero prompts are single-turn) and need no chat template and hold no BOS.
    """
    if template in ("chat", "chat-think", "think"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--template {template} needs a chat template, and this tokenizer has none "
                             "(a base model?); use --template zero (or zero-nothink)")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + THINK_OPEN + "\n" if template == "think" else text  # chat-think: the model opens it
    if template in ("zero", "zero-nothink"):
        instruction = ZERO_INSTRUCTION if template == "zero" else ZERO_NOTHINK_INSTRUCTION
        return instruction + "\n\n" + ZERO_QUERY.format(prompt=user_turn(messages).strip())
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer, messages, template):
    """Prompt token ids (list[int]) with exactly one BOS when the tokenizer has one, none otherwise.

    The rendered chat template already holds the BOS, so the text is tokenized with
    add_special_tokens=False; the Zero text has none, so it is prepended here.
    """
    ids = list(tokenizer(render(tokenizer, messages, template), add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if template.startswith("zero") and bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def _find(text, tag, last, start=0):
    return text.rfind(tag, start) if last else text.find(tag, start)


def answer_span(text, template, strict=False, last=False):
    """Where the answer that split_answer returns lies in `text`: (start, end) character offsets with
    text[start:end] == split_answer(text, template, strict, last)[1], or None when that answer is "[NULL]"
    (strict, delimiter missing). The one place the answer rule lives (split_answer documents it); the
    span leaves out the whitespace the answer is stripped of, so (end, end) is an empty answer."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    start, end = 0, len(text)  # the whole-text fallback
    if template.startswith("zero"):
        # The authors' rule: after the first <response>, cut at the first </response> that follows when
        # there is one (a response cut off at the length limit keeps what it wrote); <think> is never read.
        a = text.find(RESPONSE_OPEN)
        b = text.find(RESPONSE_CLOSE, a + len(RESPONSE_OPEN)) if a >= 0 else -1
        if a >= 0 and (b >= 0 or not strict):  # strict Zero also demands the </response>
            start, end = a + len(RESPONSE_OPEN), b if b >= 0 else len(text)
        elif strict:
            return None
    else:
        i = _find(text, THINK_CLOSE, last)
        if i >= 0:
            start = i + len(THINK_CLOSE)
        elif strict and template != "chat":
            return None
    piece = text[start:end]
    start += len(piece) - len(piece.lstrip())
    return start, max(start, end - (len(piece) - len(piece.rstrip())))


def _split(text, template, strict, last):
    """(thought, answer, format_ok, parseable): the one implementation behind split_answer and parseable."""
    span = answer_span(text, template, strict, last)
    thought = ""
    if template.startswith("zero"):
        a = text.find(RESPONSE_OPEN)
        b = text.find(RESPONSE_CLOSE, a + len(RESPONSE_OPEN)) if a >= 0 else -1
        parsed = span is not None and a >= 0
        form = a >= 0 and b >= 0
        if template == "zero":
            o = text.find(THINK_OPEN)
            c = text.find(THINK_CLOSE, o + len(THINK_OPEN)) if o >= 0 else -1
            # well formed: <think> first, closed before the first <response> (none mentioned in the plan)
            form = form and text.lstrip().startswith(THINK_OPEN) and 0 <= c < a
            if parsed and 0 <= c < a:  # the thought, when it is apart from the answer
                thought = text[o + len(THINK_OPEN):c].strip()
    else:
        i = _find(text, THINK_CLOSE, last)
        parsed = span is not None and (i >= 0 or template == "chat")
        if i >= 0:
            thought = text[:i].strip().removeprefix(THINK_OPEN).strip()
        form = {"chat": not (THINK_OPEN in text and i < 0),  # a thought opened and never closed
                "chat-think": i >= 0 and text.lstrip().startswith(THINK_OPEN),
                "think": i >= 0}[template]  # the prompt opened <think>
    answer = NULL_ANSWER if span is None else text[span[0]:span[1]]
    if not parsed:
        thought = ""
    return thought, answer, bool(form and parsed and answer != ""), parsed


def split_answer(text, template, strict=False, last=False):
    """Split a sampled response into (thought: str, answer: str, format_ok: bool).

    The answer is what the reward model scores, by the authors' rule (their reward worker; answer_span
    says where in `text` it lies):
      chat          no delimiter: the whole text, as the authors' no-think runs score it, except that a
                    `</think>` the model wrote anyway splits off a thought (the first one; the last when
                    last=True). strict changes nothing (the authors' no-think Instruct config sets strict
                    with no delimiter, where it does nothing), so the answer is never "[NULL]".
      chat-think,   the text after the first `</think>` (the last one when last=True, as evaluation does).
      think         Missing: the whole text, or "[NULL]" when strict (strict is for Instruct warm-starts).
      zero,         the text after the first `<response>`, cut at the first `</response>` after it when
      zero-nothink  there is one, else all of it (a response cut off at the length limit); `<think>` is
                    never looked at, so a `<response>` mentioned in the plan starts the answer there.
                    `<response>` missing: the whole text, or "[NULL]" when strict; strict also scores
                    "[NULL]" when `</response>` is missing (DESIGN.md). `last` is not used: Zero
                    evaluation stops generation at `</response>` and reads the answer by the same rule.
    An empty answer after its delimiter is scored as "" (not "[NULL]") in both modes.

    thought: the text before `</think>` without a leading `<think>` (zero: between `<think>` and
    `</think>`, only when they close before the answer's `<response>`); "" when there is none or the
    answer fell back to the whole text. For reading and logging only.

    format_ok, the stricter per-sample flag for logging; it never changes the answer:
      chat          the answer is non-empty and no `<think>` was left unclosed;
      chat-think    the text starts with `<think>`, has a `</think>` and a non-empty answer after it;
      think         a `</think>` (the prompt opened the thought) and a non-empty answer after it;
      zero          the text starts with `<think>`, the first `</think>` comes before the first `<response>`,
                    a `</response>` follows it and the answer between them is non-empty;
      zero-nothink  `<response>`, then `</response>`, with a non-empty answer between them.
    So a "[NULL]" answer always has format_ok False, and an empty answer too. Whether the delimiter was
    found (what DPO counts as parseable) is `parseable`, which can be True where format_ok is False.
    """
    thought, answer, ok, _ = _split(text, template, strict, last)
    return thought, answer, ok


def parseable(text, template, strict=False):
    """True when the answer came from the template's delimiter (the authors' worker found it), False when it
    is the whole-text or "[NULL]" fallback: `</think>` for chat-think / think, `<response>` (and, when
    strict, a `</response>` after it) for the Zero templates; always True for chat, which has none.
    The authors' DPO keeps a prompt when at least 4 of its samples parse."""
    return _split(text, template, strict, False)[3]


def answer_tokens(tokenizer, tokens, text, span):
    """The tokens that hold the answer text[start:end] -> (first, end): tokens[first:end] are exactly the
    tokens that hold at least one byte of it, so a token straddling a boundary (Llama 3 writes
    "</think>Hello" as "</", "think", ">Hello") belongs to the answer, and a character split over two
    tokens puts both in it. first is also the number of tokens before the answer; an empty answer
    (start == end) holds no token, first is then where it would start.

    tokens: the response ids without the stop token, text: their decode (skip_special_tokens=False),
    span: chat.answer_span(text, ...). Byte-level BPE (Llama 3, Qwen) decodes to the concatenation of its
    tokens' bytes: per-id byte counts (computed once per tokenizer) and two binary searches give the
    answer, checked against the text's byte count; any other decode (a non-byte-level tokenizer, a text
    with U+FFFD, i.e. invalid UTF-8 the decode replaced) takes a binary search on prefix decodes (~12
    decodes a boundary), where len(decode(tokens[:k])) > c says that tokens[:k] hold a byte of character
    c (an incomplete last character decodes to one U+FFFD). Cost at 512 samples x 4,096 tokens (Qwen3):
    0.3 s a rollout by byte counts, 11 s by prefix decodes alone."""
    start, end = span
    lengths = _byte_counts(tokenizer)
    if lengths is not None and (not tokens or max(tokens) < len(lengths)):
        own = lengths[np.asarray(tokens, dtype=np.int64)]
        ends = np.cumsum(own)
        if (int(ends[-1]) if tokens else 0) == len(text.encode()) and "\ufffd" not in text:  # valid UTF-8
            b0, b1 = len(text[:start].encode()), len(text[:end].encode())
            first = int(np.searchsorted(ends, b0, side="right"))  # the token holding byte b0
            if start == end:
                return first, first
            return first, int(np.searchsorted(ends - own, b1, side="left"))  # the tokens that begin before b1

    def decode(k):
        return tokenizer.decode(tokens[:k], skip_special_tokens=False)

    def holding(c):  # the first token k with a byte of character c (len(tokens) when there is none)
        return bisect.bisect_left(range(len(tokens)), True, key=lambda k: len(decode(k + 1)) > c)
    first = holding(start)
    if start == end:
        return first, first
    last = holding(end)  # the token holding character `end`; the answer ends before it unless it straddles
    return first, last + (last < len(tokens) and decode(last) != text[:end])


_BYTE_COUNTS = weakref.WeakKeyDictionary()


def _byte_counts(tokenizer):
    """[V] int64: the bytes each id decodes to, when the tokenizer is byte-level BPE (its vocabulary is
    written in the 256-character byte alphabet, one character a byte; an added token decodes to its
    content); None otherwise. Cached per tokenizer: one pass over the vocabulary (~0.1 s for Qwen's 151k)."""
    if tokenizer not in _BYTE_COUNTS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        counts = None
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
            added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            counts = np.array([len(added[i].encode()) if i in added else len(t or "") for i, t in enumerate(pieces)],
                              dtype=np.int64)
        _BYTE_COUNTS[tokenizer] = counts
    return _BYTE_COUNTS[tokenizer]
