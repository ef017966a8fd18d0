r"""Prompt templates and the thought / answer split.

Four ways to turn a conversation (a list of {"role", "content"} messages) into a prompt:

  chat          the model's own chat template, assistant turn opened (plain RLHF, or a warm-started
                model that writes <think> itself)
  think         the same, with the assistant turn opened by "<think>\n" (the warm-start SFT target is
                "<think>\n{thought}\n</think>\n\n{answer}")
  zero          the paper's instruction for a base model (R1-Zero style); needs no chat template
  zero-nothink  the same without the thinking part (the paper's no-think Zero baseline)

The reward model scores only the answer (`split_answer`) against the original user turn (`user_turn`),
never the thought and never the Zero instruction.
"""

import os

TEMPLATES = ("chat", "think", "zero", "zero-nothink")

# The paper's Zero instruction (appendix C of arXiv 2509.20357), verbatim.
ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. Following the User's query, the Assistant first plans a "
    "response, and then provides the response. The internal reasoning process is enclosed within <think> "
    "</think> tags and the response is enclosed within <response> </response> tags, i.e., in the format "
    "<think> reasoning process here </think> <response> response here </response>."
)
# The no-think baseline. DESIGN.md only quotes a fragment ("...The user asks a question, and the assistant
# provides a response. The response is enclosed within <response> </response> tags..."); this is that
# fragment completed with the think instruction's opening sentence and its "i.e., ... here" ending. The
# paper's appendix says "provides the user with a response", the authors' released template "provides a
# response" (as DESIGN does) and "<response> response </response>"; reconstructed, not verbatim.
ZERO_NOTHINK_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the assistant provides a "
    "response. The response is enclosed within <response> </response> tags, i.e., <response> response "
    "here </response>."
)
ZERO_QUERY = "User: <query>{prompt}</query>\nAssistant:"  # after the instruction and a blank line

# End-of-turn / end-of-text tokens of the Llama 3 and Qwen2 families. A Zero run on a base model ends its
# turn with the family's end-of-turn token while the tokenizer's EOS is end-of-text, so stop on any.
END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"
NULL_ANSWER = "[NULL]"  # what strict mode scores when the format is broken (the paper's choice)


def load_tokenizer(path_or_alias, trust_remote_code=False):
    """An HF tokenizer from a local folder, a model alias or a hub id (resolved by rlmt.model)."""
    from transformers import AutoTokenizer

    from rlmt.model import resolve_path  # lazy: keeps `import rlmt.chat` free of the model code
    folder = resolve_path(path_or_alias)
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

    chat / think use the tokenizer's chat template (which holds the BOS, if any); zero / zero-nothink
    use only the last user turn, stripped like the paper's released template does (system and earlier
    turns are dropped: Zero prompts are single-turn) and need no chat template and hold no BOS.
    """
    if template in ("chat", "think"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--template {template} needs a chat template, and this tokenizer has none "
                             "(a base model?); use --template zero (or zero-nothink)")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + THINK_OPEN + "\n" if template == "think" else text
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


def split_answer(text, template, strict=False, last=False):
    """Split a sampled response into (thought: str, answer: str, ok: bool).

    think / chat: the answer follows the first `</think>` (the last one when last=True, as evaluation
      does); the thought is what precedes it, without a leading "<think>".
    zero: thought between `<think>` and `</think>`, answer between the first `<response>` after that
      `</think>` and the next `</response>`.
    zero-nothink: answer between `<response>` (the last one when last=True) and the next `</response>`.

    ok (the per-sample format flag) is True only when the expected delimiters are present in order and
    the answer is non-empty. When it is False, strict mode scores the literal "[NULL]"; non-strict mode
    scores the whole text (stripped) when a delimiter is missing, the empty answer when it is empty.

    `chat` is the one template where thinking is optional: a text with neither `<think>` nor `</think>`
    is a plain answer (ok=True, the whole text) unless strict=True, which demands the thinking format.
    A `<think>` that is never closed is a broken format under every template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    thought, answer = None, None  # stay None when a delimiter is missing
    if template in ("think", "chat"):
        i = _find(text, THINK_CLOSE, last)
        if i >= 0:
            thought = text[:i].strip().removeprefix(THINK_OPEN).strip()
            answer = text[i + len(THINK_CLOSE):].strip()
        elif template == "chat" and not strict and THINK_OPEN not in text:
            thought, answer = "", text.strip()  # a plain, non-thinking chat answer
    else:
        start = 0
        if template == "zero":
            close = _find(text, THINK_CLOSE, last)
            open_ = text.find(THINK_OPEN)
            if 0 <= open_ < close:
                thought, start = text[open_ + len(THINK_OPEN):close].strip(), close + len(THINK_CLOSE)
            else:
                start = -1
        else:
            thought = ""
        if start >= 0:
            a = _find(text, RESPONSE_OPEN, last and template == "zero-nothink", start)
            b = text.find(RESPONSE_CLOSE, a + len(RESPONSE_OPEN)) if a >= 0 else -1
            answer = text[a + len(RESPONSE_OPEN):b].strip() if b >= 0 else None
    ok = answer is not None and thought is not None and answer != ""
    if ok:
        return thought, answer, True
    if strict:
        return thought or "", NULL_ANSWER, False
    if answer is None or thought is None:
        return "", text.strip(), False
    return thought, answer, False
