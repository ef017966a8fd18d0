"""Prompt, preference and SFT files; left-truncation; padding and the loss masks.

Files are JSONL (one object a line), one JSON array, or Parquet (verl's format; needs pyarrow). Every
row is checked before any model is loaded, and a bad row gets one message naming the file, the line
(or array index, or Parquet row) and the problem.

Rows:
  prompts      {"id", "messages": [{"role", "content"}, ...]}   or "prompt": str | message list; the
               benchmarks' own question files load as they are: AlpacaEval {"instruction": str},
               Arena-Hard v2 {"uid", "prompt": str}, WildBench {"session_id", "conversation_input": messages},
               verl Parquet {"prompt": messages, ...}; other fields are ignored here
  preferences  {"id", "prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
  sft          {"id", "messages": [..., {"role": "assistant", "content"}]}

Masks (the one convention, DESIGN.md): 1 on response tokens up to and including the first EOS, 0 on
prompt and padding. They are built from lengths, never from `ids != pad_id` (pad is often EOS).
"""

import codecs
import json
import os

import torch

from rlmt import chat

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad data file or row; the message says which file, which line and what is wrong."""


# ----------------------------------------------------------------------------- reading and validation

def _read_parquet(path):
    """[(where, record)] of a Parquet file, one per table row in file order; pyarrow is imported only here."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        items = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return [(f"{path}[row {i}]", x) for i, x in enumerate(items)]


def _decode(path, raw):
    """UTF-8 text of a file's bytes (a byte-order mark dropped); a bad byte is reported by line and column."""
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno, column = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None


def read_records(path):
    """[(where, record dict)] from a JSONL file, a JSON array or a Parquet file (by its `.parquet` name or
    its PAR1 magic bytes), in file order; `where` is "file:line", "file[index]" or "file[row i]"."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    text = None if path.endswith(".parquet") or raw.startswith(b"PAR1") else _decode(path, raw)
    if text is None:
        records = _read_parquet(path)
    elif text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        records = [(f"{path}[{i}]", x) for i, x in enumerate(items)]
    else:
        records = []
        # split on "\n" only: str.splitlines() also breaks at U+2028 / U+0085, which JSON strings may hold
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    for where, x in records:
        if not isinstance(x, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(x).__name__}")
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return records


def _messages(where, field, value, last_role):
    """Validate a message list and return it as clean [{"role", "content"}] dicts."""
    if not isinstance(value, list) or not value:
        raise DataError(f'{where}: "{field}" must be a non-empty list of messages')
    out = []
    for j, m in enumerate(value):
        at = f'{where}: "{field}"[{j}]'
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f'{at}: a message must be an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise DataError(f'{at}: unknown role {m["role"]!r} (expected one of {", ".join(ROLES)})')
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"{at}: content must be a non-empty string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != last_role:
        raise DataError(f'{where}: the last message of "{field}" must be a {last_role} turn, '
                        f'not {out[-1]["role"]}')
    return out


def _require(where, rec, *fields):
    for name in fields:
        if name not in rec:
            raise DataError(f'{where}: missing field "{name}"')


def _prompt(where, rec, field):
    """A message list ending with a user turn; "prompt" or "instruction" may also be a string (one user turn)."""
    value = rec[field]
    if field in ("prompt", "instruction") and isinstance(value, str):
        value = [{"role": "user", "content": value}]
    return _messages(where, field, value, "user")


def _completion(where, rec, field):
    """A completion given as a string or a message list (the final assistant turn is the completion;
    the list may also repeat the prompt turns, as some hub datasets do)."""
    value = rec[field]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f'{where}: "{field}" must be a non-empty string')
        return value
    return _messages(where, field, value, "assistant")[-1]["content"]


def _id(rec, path, index, keys=("id",)):
    """The first of `keys` the row has, else "{file name}-{index}"."""
    key = next((k for k in keys if rec.get(k) is not None), None)
    return str(rec[key]) if key else f"{os.path.splitext(os.path.basename(path))[0]}-{index}"


# ours (and verl's, Arena-Hard's "prompt"), WildBench's, AlpacaEval's
PROMPT_FIELDS = ("messages", "prompt", "conversation_input", "instruction")


def load_prompts(path):
    """[{"id", "messages"}] in file order, from the first of PROMPT_FIELDS a row has ("prompt" and
    "instruction" may be a string); the last turn is a user turn. The id is "id", else the benchmarks'
    "uid" (Arena-Hard) or "session_id" (WildBench), else the file name and row index."""
    rows = []
    for i, (where, rec) in enumerate(read_records(path)):
        field = next((f for f in PROMPT_FIELDS if f in rec), None)
        if field is None:
            raise DataError(f'{where}: missing field "messages" (or "prompt", "conversation_input", "instruction")')
        rows.append({"id": _id(rec, str(path), i, ("id", "uid", "session_id")), "messages": _prompt(where, rec, field)})
    return rows


def load_preferences(path):
    """[{"id", "prompt": messages, "chosen": str, "rejected": str}]."""
    rows = []
    for i, (where, rec) in enumerate(read_records(path)):
        _require(where, rec, "prompt", "chosen", "rejected")
        rows.append({"id": _id(rec, str(path), i), "prompt": _prompt(where, rec, "prompt"),
                     "chosen": _completion(where, rec, "chosen"),
                     "rejected": _completion(where, rec, "rejected")})
    return rows


def load_sft(path):
    """[{"id", "messages"}] where the conversation holds a user turn and ends with an assistant turn."""
    rows = []
    for i, (where, rec) in enumerate(read_records(path)):
        _require(where, rec, "messages")
        messages = _messages(where, "messages", rec["messages"], "assistant")
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f'{where}: "messages" has no user turn')
        rows.append({"id": _id(rec, str(path), i), "messages": messages})
    return rows


# ----------------------------------------------------------------------------- tokenizing

def encode_prompts(tokenizer, rows, template, max_prompt_len=None):
    """Prompt ids for each row, left-truncated to max_prompt_len tokens -> (list[list[int]], n_truncated).

    Left truncation keeps the end of the prompt (the last user turn and the opened assistant turn) and
    keeps a leading BOS at position 0, so a cut prompt still starts with exactly one BOS.
    """
    if max_prompt_len is not None and max_prompt_len < 2:
        raise ValueError(f"max_prompt_len must be at least 2, got {max_prompt_len}")
    bos = tokenizer.bos_token_id
    out, n_truncated = [], 0
    for row in rows:
        ids = chat.encode_prompt(tokenizer, row["messages"], template)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            n_truncated += 1
            head = [bos] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - (max_prompt_len - len(head)):]
        out.append(ids)
    return out, n_truncated


# ----------------------------------------------------------------------------- padding and masks

def _pad(seqs, pad_id, left):
    B, T = len(seqs), max((len(s) for s in seqs), default=0)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(T - len(s), T) if left else slice(0, len(s))
            ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def left_pad(seqs, pad_id):
    """B lists of ids -> (ids [B, T], mask [B, T]) padded on the left (prompts); mask 1 on real tokens."""
    return _pad(seqs, pad_id, left=True)


def right_pad(seqs, pad_id):
    """B lists of ids -> (ids [B, T], mask [B, T]) padded on the right (responses); mask 1 on real tokens."""
    return _pad(seqs, pad_id, left=False)


def position_ids(attention_mask):
    """attention_mask [B, T] -> positions [B, T]: 0 at each row's first real token, counting real tokens.

    Left padding gets position 0 (masked out anyway); right padding repeats the last position.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def join(prompts, responses, pad_id):
    """Prompts (left-padded to width P) followed by responses (right-padded to width R).

    prompts, responses: B lists of ids each; a response ends at (and includes) its first EOS, or is cut
    at the length limit without one. Returns a dict of LongTensors [B, P + R]: input_ids, attention_mask,
    position_ids, response_mask (1 exactly on response tokens, from lengths), and prompt_len = P (int).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    p_ids, p_mask = left_pad(prompts, pad_id)
    r_ids, r_mask = right_pad(responses, pad_id)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)
    return {"input_ids": torch.cat([p_ids, r_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids(attention_mask),
            "response_mask": torch.cat([torch.zeros_like(p_mask), r_mask], dim=1), "prompt_len": p_ids.shape[1]}


# ----------------------------------------------------------------------------- SFT: the assistant-token mask

def encode_sft(tokenizer, messages, max_len=None):
    """Token ids and loss mask of one conversation, the mask read off the rendered chat template.

    The template renders the conversation prefix by prefix: assistant turn i is the text between
    render(messages[:i], add_generation_prompt=True) and render(messages[:i + 1]). Each piece of text is
    tokenized on its own (add_special_tokens=False: the template holds the BOS), as at sampling time,
    when the prompt is tokenized and the model writes the rest. An assistant span is marked 1 up to and
    including its last end-of-turn token (chat.stop_ids), so the model learns to stop; the template's
    text after it (Qwen's "\\n") and every system, user and header token are 0. No marker string is ever
    searched for in decoded text.

    messages: [{"role", "content"}] with at least one assistant turn, not the first message.
    Returns (ids list[int], mask list[int]) right-truncated to max_len tokens (the start of a
    conversation is the context of everything after it); the mask may come back all 0 when the cut
    removes every assistant token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("SFT renders conversations with the model's chat template, and this tokenizer has none "
                         "(a base model?); give a tokenizer that ships a chat template")
    if messages and messages[0]["role"] == "assistant":
        raise ValueError("the conversation opens with an assistant turn; a chat template cannot render the "
                         "prompt before it (put a user turn first)")

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def tokens(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    full = render(messages, False)
    stops = set(chat.stop_ids(tokenizer))
    ids, mask, done = [], [], 0  # done: characters of `full` already tokenized
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, turn = render(messages[:i], True), render(messages[:i + 1], False)
        if not (turn.startswith(head) and full.startswith(turn)):
            raise ValueError(f"the chat template does not render assistant turn {i} as an extension of the turns "
                             "before it (does it rewrite earlier turns?), so its tokens cannot be located")
        before, span = tokens(full[done:len(head)]), tokens(full[len(head):len(turn)])
        last = max((j for j, t in enumerate(span) if t in stops), default=len(span) - 1)
        ids += before + span
        mask += [0] * len(before) + [1] * (last + 1) + [0] * (len(span) - last - 1)
        done = len(turn)
    if done == 0:
        raise ValueError("the conversation has no assistant turn to train on")
    tail = tokens(full[done:])
    ids, mask = ids + tail, mask + [0] * len(tail)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


# ----------------------------------------------------------------------------- SFT: batches

def sft_batch(examples, pad_id):
    """SFT examples [(ids, mask)] -> LongTensors [B, T] input_ids, attention_mask, loss_mask, position_ids,
    one example a row, right-padded. loss_mask[b, t] = 1 where input_ids[b, t] is an assistant token to
    learn (the alignment of rlmt.logprobs.sequence_logprobs). Training packs the rows end to end
    (rlmt.logprobs.packed_logprobs), so the padding is never computed."""
    ids, attention_mask = right_pad([e[0] for e in examples], pad_id)
    loss_mask, _ = right_pad([e[1] for e in examples], 0)
    return {"input_ids": ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "position_ids": position_ids(attention_mask)}


# ----------------------------------------------------------------------------- DPO pairs

def _token_ids(where, rec, field):
    value = rec[field]
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           and t >= 0 for t in value):
        raise DataError(f'{where}: "{field}" must be a non-empty list of token ids (non-negative integers)')
    return value


def load_pairs(path):
    """DPO pairs: preference rows (see load_preferences) that may also carry the sampled token ids.

    Pairs built by rlmt.pairs hold "prompt_ids", "chosen_ids" and "rejected_ids" (all three or none):
    training on them uses exactly the sampled tokens, never decoded and re-encoded text.
    Returns [{"id", "prompt": messages, "chosen": str, "rejected": str, "ids": (prompt, chosen, rejected)
    lists of ids, or None}].
    """
    rows = []
    for i, (where, rec) in enumerate(read_records(path)):
        if "prompt" not in rec and "messages" in rec:
            raise DataError(f'{where}: a prompt row ("messages", no "chosen"/"rejected"), not a preference pair; '
                            "build pairs from a prompts file first (train_dpo.py --build-pairs)")
        _require(where, rec, "prompt", "chosen", "rejected")
        fields = ("prompt_ids", "chosen_ids", "rejected_ids")
        have = [f for f in fields if f in rec]
        if have and len(have) != 3:
            raise DataError(f'{where}: has {", ".join(have)} but not {", ".join(f for f in fields if f not in have)}; '
                            "give all three token-id fields or none")
        rows.append({"id": _id(rec, str(path), i), "prompt": _prompt(where, rec, "prompt"),
                     "chosen": _completion(where, rec, "chosen"), "rejected": _completion(where, rec, "rejected"),
                     "ids": tuple(_token_ids(where, rec, f) for f in fields) if have else None})
    return rows


def end_of_turn_id(tokenizer):
    """The token that ends an assistant turn: <|eot_id|> (Llama 3) or <|im_end|> (Qwen2) when the vocabulary
    has it, even for a base model whose EOS is end-of-text (the Zero convention, DESIGN.md); else EOS."""
    vocab = tokenizer.get_vocab()
    for t in ("<|eot_id|>", "<|im_end|>"):
        if t in vocab:
            return vocab[t]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS and no end-of-turn token")
    return tokenizer.eos_token_id


def encode_pair(tokenizer, row, template):
    """(prompt, chosen, rejected) token ids of a load_pairs row: its own ids when it has them, else the
    prompt rendered with `template` (chat.encode_prompt) and each completion's text tokenized with the
    end-of-turn token appended, as a sampled completion ends."""
    if row["ids"] is not None:
        return tuple(list(x) for x in row["ids"])
    prompt = chat.encode_prompt(tokenizer, row["prompt"], template)
    eot = end_of_turn_id(tokenizer)
    return (prompt, *[list(tokenizer(row[k], add_special_tokens=False)["input_ids"]) + [eot]
                      for k in ("chosen", "rejected")])


def truncate_pair(prompt, chosen, rejected, max_len, bos_id=None):
    """Fit a pair into max_len tokens per sequence (prompt + completion), the prompt cut first.

    The prompt is left-truncated (a leading BOS kept) to no fewer than max_len // 2 tokens (or its own
    length); each completion is then right-truncated to the room left, so no completion is cut to empty
    (PITFALLS: an empty completion gives NaN). Both sequences share the cut prompt.
    Returns (prompt, chosen, rejected, truncated: bool)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_len:
        return prompt, chosen, rejected, False
    keep = min(len(prompt), max(max_len - longest, max_len // 2))
    if keep < len(prompt):
        head = [bos_id] if bos_id is not None and prompt[:1] == [bos_id] else []
        prompt = head + prompt[len(prompt) - (keep - len(head)):]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room], True
