"""The OpenAI chat-completions protocol as vLLM's OpenAI server speaks it, as pure functions: a request body
-> a validated job description or an error, and finished (or growing) samples -> the reply objects.

What it mirrors of vLLM: the answer is the message's `content`, the thought its `reasoning_content` (a
reasoning parser: under a thinking template the text is thought until `</think>`); a prompt whose tokens +
max_tokens exceed the context is refused (400, never truncated) and max_tokens defaults to what the context
leaves; fields it does not implement (tools, response_format, penalties other than 0, ...) get a 400 naming
them; `null` means not given; `stop` strings are cut from the text (before the thought/answer split);
`logprobs` / `top_logprobs` (0..20) cover the answer tokens, with each token's own bytes; a stream is
chat.completion.chunk events (a role chunk, text deltas, a finish chunk per choice, the usage chunk when
`stream_options.include_usage`, then [DONE]), of which no delta is ever taken back.

A job is a dict: the request's fields (ids, n, stop, seed, max_tokens, key, stream, usage_chunk, logprobs,
top_logprobs) from parse_chat_request, plus what the server's model thread books as it decodes: samples[k]
(None until finished, then {tokens, logprobs, finish_reason}), live[k] (tokens so far, streams), top[k]
(top_logprobs, when asked for). rlmt/serve.py runs the model and the HTTP side.
"""

import json
import random
import time
import uuid

from rlmt import chat, data


def response_text(tokenizer, s, stop_ids):
    """The decoded response of a sampler.generate sample, without the stop token that ended it."""
    ids = s["tokens"]
    if s["finish_reason"] == "stop" and ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


# --- requests ------------------------------------------------------------------------------------------

# Fields a request may carry; any other is refused by name (vLLM and OpenAI 400 on what they cannot honor,
# and a silently dropped `tools` or `response_format` would look like a model failure).
FIELDS = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
          "max_completion_tokens", "n", "seed", "stop", "logprobs", "top_logprobs",
          "user", "metadata", "store"}
DELIMITERS = (chat.THINK_OPEN, chat.THINK_CLOSE, chat.RESPONSE_OPEN, chat.RESPONSE_CLOSE)


def parse_chat_request(body, tokenizer, args, names, context, longest_token):
    """A /v1/chat/completions body -> (request, None), or (None, (status, message)) for a bad request.

    The request holds the prompt ids and the sampling fields; requests with an equal key (temperature,
    top_p, stop) share a batch; the server adds the decoding state (serve.new_job). args: the server's
    flags (template, default temperature and top_p). context: the model's length limit (prompt +
    max_tokens); longest_token: the most characters one token holds, so a prompt surely over the context is
    refused before it is tokenized."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, (400, f"the body is not valid JSON ({e})")
    if not isinstance(req, dict):
        return None, (400, "the body must be a JSON object")
    req = {k: v for k, v in req.items() if v is not None}  # null = not given, as the OpenAI clients mean it
    for k in ("frequency_penalty", "presence_penalty"):  # 0 is what every sampler here does anyway
        if req.get(k) == 0:
            req.pop(k)
    unknown = sorted(set(req) - FIELDS)
    if unknown:
        return None, (400, f"{unknown[0]} is not supported by this server")
    if req.get("model") is not None and req["model"] not in names:
        return None, (404, f"model {req['model']!r} is not served here; ask for {names[0]!r}")
    if not isinstance(req.get("messages"), list) or not req["messages"]:
        return None, (400, "messages must be a non-empty list of {role, content} objects")
    messages = []
    for i, m in enumerate(req["messages"]):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str) or m.get("role") not in data.ROLES:
            return None, (400, f"messages[{i}] needs a role ({', '.join(data.ROLES)}) and string content")
        messages.append({"role": m["role"], "content": content})
    if messages[-1]["role"] != "user":
        return None, (400, f"the last message must be a user turn, not {messages[-1]['role']}")
    chars = sum(len(m["content"]) for m in messages)
    if chars > context * longest_token:  # no tokenization can bring it under the context
        return None, (400, f"the prompt has {chars} characters, more than the model's context of {context} tokens "
                           f"can hold")

    def field(name, default, ok, rule, kind=(int, float)):
        value = req.get(name, default)
        good = isinstance(value, kind) and not isinstance(value, bool) and ok(value)
        return value, None if good else f"{name} must be {rule}, got {value!r}"

    if "max_completion_tokens" in req:  # the newer name of max_tokens
        req["max_tokens"] = req["max_completion_tokens"]
    checks = [field("temperature", args.temperature, lambda v: v >= 0, "a number >= 0"),
              field("top_p", args.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"),
              field("max_tokens", 1, lambda v: v >= 1, "an integer >= 1", int),
              field("n", 1, lambda v: 1 <= v <= 64, "an integer in [1, 64]", int),
              field("seed", random.getrandbits(62), lambda v: True, "an integer", int),
              field("top_logprobs", 0, lambda v: 0 <= v <= 20, "an integer in [0, 20]", int)]
    for _, problem in checks:
        if problem:
            return None, (400, problem)
    (temperature, _), (top_p, _), _, (n, _), (seed, _), (top_logprobs, _) = checks
    for name in ("stream", "logprobs"):
        if not isinstance(req.get(name, False), bool):
            return None, (400, f"{name} must be true or false, got {req[name]!r}")
    if "top_logprobs" in req and not req.get("logprobs"):
        return None, (400, "top_logprobs needs logprobs=true")
    options = req.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        return None, (400, f"stream_options must be {{\"include_usage\": bool}}, got {options!r}")
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        return None, (400, "stop must be a non-empty string or a list of at most 4 of them")
    try:  # never truncated: vLLM refuses a prompt over the context, and so does this server
        ids = chat.encode_prompt(tokenizer, messages, args.template)
    except ValueError as e:
        return None, (400, f"cannot render the messages with the {args.template} template: {e}")
    if len(ids) >= context:
        return None, (400, f"the prompt has {len(ids)} tokens, the model's context is {context} tokens")
    max_tokens = req.get("max_tokens", context - len(ids))  # absent: whatever the context leaves
    if len(ids) + max_tokens > context:
        return None, (400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: {len(ids) + max_tokens} "
                           f"is more than the model's context of {context} tokens")
    return {"ids": ids, "seed": seed, "stop": stop, "n": n, "max_tokens": max_tokens,
            "key": (float(temperature), float(top_p), tuple(stop)), "stream": req.get("stream", False),
            "usage_chunk": bool(options.get("include_usage")), "logprobs": req.get("logprobs", False),
            "top_logprobs": top_logprobs}, None


# --- replies -------------------------------------------------------------------------------------------

def held(text, stops):
    """How many trailing characters may still turn into a delimiter or a stop string (or end a split
    character): a stream holds them back, so what it sent is never taken back."""
    if text.endswith("\ufffd"):
        return 1
    return max((m for x in (*DELIMITERS, *stops) for m in range(1, len(x)) if text.endswith(x[:m])), default=0)


def api_split(text, template, final=True):
    """(thought, answer) of a response, as vLLM's reasoning parsers read it: under a thinking template the
    text is thought until a `</think>` appears (then split_answer with last=True); a Zero answer starts
    at `<response>`. final=False: a response still growing, of which only what cannot change is split."""
    if template in ("chat-think", "think") and chat.THINK_CLOSE not in text:
        return text.strip().removeprefix(chat.THINK_OPEN).strip(), ""
    if template.startswith("zero") and not final and chat.RESPONSE_OPEN not in text:
        return "", ""  # still unknown: without a <response>, the whole text will be the answer
    return chat.split_answer(text, template, last=True)[:2]


def cut_stop(text, stop):
    """The text before the first stop string (OpenAI leaves it out) -> (text, whether one was cut)."""
    cut = min((text.find(x) for x in stop if x in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def answer_tokens(tokenizer, tokens, template, stop, stops):
    """The slice of `tokens` that spells the answer of the (stop-cut) response, as api_split reads it ->
    (first, end): chat.answer_tokens' rule, the training mask's (a token holding a byte of the answer is
    in it); under a thinking template with no `</think>` yet there is no answer."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    text, _ = cut_stop(tokenizer.decode(tokens), stop)
    if template in ("chat-think", "think") and chat.THINK_CLOSE not in text:
        return len(tokens), len(tokens)
    return chat.answer_tokens(tokenizer, tokens, text, chat.answer_span(text, template, last=True))


def _byte_table():
    """GPT-2's byte -> printable character table, inverted: character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(moved)}}


_BYTE_OF = _byte_table()


def token_bytes(tokenizer, token_id):
    """A token's own bytes: a byte-level BPE token (GPT-2's byte-to-character table, Llama-3 and Qwen) may
    hold half a UTF-8 character, which decode() would turn into U+FFFD."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece and all(c in _BYTE_OF for c in piece):
        return bytes(_BYTE_OF[c] for c in piece)
    return tokenizer.decode([token_id]).encode()  # sentencepiece and special tokens


def logprob_entry(tokenizer, token_id, logprob):
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}


def choice_logprobs(job, k, tokenizer, args):
    """OpenAI's choices[k].logprobs: one entry per answer token, the sampler's log-prob of it, and the
    top_logprobs of the teacher-forced forward."""
    s = job["samples"][k]
    a, b = answer_tokens(tokenizer, s["tokens"], args.template, job["stop"], set(chat.stop_ids(tokenizer)))
    content = []
    for i in range(a, b):
        entry = logprob_entry(tokenizer, s["tokens"][i], s["logprobs"][i])
        values, ids = job["top"][k] if job.get("top") else ([[]] * len(s["tokens"]), [[]] * len(s["tokens"]))
        entry["top_logprobs"] = [logprob_entry(tokenizer, t, v) for t, v in zip(ids[i], values[i])]
        content.append(entry)
    return {"content": content}


def sample_text(tokenizer, s, stop, stops):
    """A finished sample's text, stop token and stop string cut -> (text, finish_reason)."""
    text, hit = cut_stop(response_text(tokenizer, s, stops), stop)
    return text, "stop" if hit else s["finish_reason"]


def usage(job):
    completion = sum(len(s["tokens"]) for s in job["samples"])
    return {"prompt_tokens": len(job["ids"]), "completion_tokens": completion,
            "total_tokens": len(job["ids"]) + completion}


def completion_body(job, tokenizer, args, name):
    """The chat.completion object: per sample the answer as content, the thought as reasoning_content."""
    stops = set(chat.stop_ids(tokenizer))
    choices = []
    for k, s in enumerate(job["samples"]):
        text, finish = sample_text(tokenizer, s, job["stop"], stops)
        thought, answer = api_split(text, args.template)
        choices.append({"index": k, "message": {"role": "assistant", "content": answer,
                                                "reasoning_content": thought or None},
                        "logprobs": choice_logprobs(job, k, tokenizer, args) if job["logprobs"] else None,
                        "finish_reason": finish})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": choices, "usage": usage(job)}


def stream_head(name):
    """The fields every chunk of one streamed completion shares (one id for all of them)."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": name}


def event(head, job, choices, **more):
    """One server-sent event: a chat.completion.chunk of `choices`. With include_usage every chunk carries
    `usage: null` but the last, which carries the usage (more = {usage: ...}), as OpenAI sends them."""
    extra = {"usage": None} if job["usage_chunk"] else {}
    return f"data: {json.dumps({**head, 'choices': choices, **extra, **more}, ensure_ascii=False)}\n\n"


def first_choices(job):
    """The choices of a stream's first chunk: each announces the assistant role."""
    return [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for k in range(job["n"])]


def error_event(error):
    """The event that ends a stream whose generation failed; error: (status, message)."""
    return f"data: {json.dumps({'error': {'message': error[1], 'code': error[0]}})}\n\n"


DONE = "data: [DONE]\n\n"


def stream_delta(job, k, sent, tokenizer, args, stops):
    """Choice k's part of the next chunk -> (choices, sent, ended). sent: the (thought, answer) text sent so
    far; the delta is what was added since, of text that no later token can change (see held), read from
    live[k] while the sample grows, from samples[k] once it is finished; then ended, with a finish chunk
    (finish_reason, and logprobs when asked for). stops: the set of stop ids (computed once per stream)."""
    s = job["samples"][k]
    if s is not None:
        text, finish = sample_text(tokenizer, s, job["stop"], stops)
        parts = api_split(text, args.template)
    else:
        text, _ = cut_stop(tokenizer.decode([t for t in job["live"][k] if t not in stops]), job["stop"])
        parts = api_split(text[:len(text) - held(text, job["stop"])], args.template, final=False)
    delta, sent, choices = {}, list(sent), []
    for i, key in enumerate(("reasoning_content", "content")):
        if parts[i].startswith(sent[i]) and len(parts[i]) > len(sent[i]):
            delta[key], sent[i] = parts[i][len(sent[i]):], parts[i]
    if delta:
        choices.append({"index": k, "delta": delta, "logprobs": None, "finish_reason": None})
    if s is not None:
        lp = choice_logprobs(job, k, tokenizer, args) if job["logprobs"] else None
        choices.append({"index": k, "delta": {}, "logprobs": lp, "finish_reason": finish})
    return choices, tuple(sent), s is not None


def error_body(status, message):
    """OpenAI's error object: a 4xx is the client's invalid_request_error, a 5xx the server's."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}
