"""Sample from a model with the thinking templates: a JSONL file of samples, or a terminal chat.

  python sample.py --model DIR_OR_ALIAS --prompts FILE.jsonl --out OUT.jsonl [--n 4] [--template think]
  torchrun --nproc_per_node 8 -- sample.py ...   each rank samples its share of the prompts; rank 0 writes
  python sample.py --model DIR_OR_ALIAS --interactive
  python sample.py --model DIR_OR_ALIAS --serve [--host 127.0.0.1] [--port 8000] [--template think]

(Under torchrun the `--` matters: torchrun's own parser reads `--n` as an ambiguous abbreviation of its
`--nnodes` / `--nproc-per-node` flags otherwise.)

Each output line is one sample, in prompt order: id, sample (index within the prompt), text (the decoded
response without its stop token), thought and response (rlmt.chat.split_answer under the template),
format_ok, token_ids (the response tokens, ending with the stop token when finish_reason is "stop"),
num_tokens, finish_reason ("stop" or "length").

--serve answers OpenAI chat-completions requests (`/v1/models`, `/v1/models/{id}`, `/v1/chat/completions`)
as vLLM's server does, so that official harnesses, and eval.py's judge, can query an rlmt checkpoint: the
answer is the message's `content`, the thought its `reasoning_content` (under a thinking template the text
is thought until `</think>`). `stream: true` sends server-sent chat.completion.chunk events as tokens are
decoded (`stream_options.include_usage` adds a usage chunk); `logprobs` / `top_logprobs` (0..20) cover the
answer tokens. A prompt whose tokens + max_tokens exceed --max-model-len is refused (400, never truncated);
max_tokens defaults to what the context leaves. Fields it does not implement (tools, response_format,
penalties other than 0, ...) get a 400 naming them. Samples decode in rounds of --chunk-tokens tokens, each
round one sampler.generate call per set of sampling fields that new requests join, so a long request does
not starve short ones. No auth: it binds 127.0.0.1 unless --host says otherwise.
"""

import argparse
import hashlib
import http.server
import json
import os
import queue
import random
import sys
import threading
import time
import uuid

import torch

from rlmt import chat, data, dist, sampler
from rlmt.model import from_pretrained


def fail(message):
    """One line on stderr and exit status 2, before any model is loaded where possible."""
    print(f"sample.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- flags ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, hub id or alias (rlmt.model.ALIASES)")
    p.add_argument("--prompts", help='prompt file: JSONL (or a JSON array) of {"id", "messages"} or '
                                     '{"id", "prompt"} rows')
    p.add_argument("--out", help="output JSONL, one line per sample")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--template", choices=chat.TEMPLATES, default="chat-think",
                   help="chat-think (default): the model's chat template, a thinking model opens <think> itself and "
                        "the answer follows </think>; chat: no thinking expected; think: the turn opened with <think>; "
                        "zero / zero-nothink: the paper's instruction for base models")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="response length limit")
    p.add_argument("--max-prompt-len", type=int, default=None,
                   help="left-truncate prompts to this many tokens (default: keep them whole)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="also stop when the response contains TEXT (repeatable)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each prompt's samples draw from (seed, prompt index), so the output "
                        "does not depend on --batch-size or the number of ranks")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sequences decoded together; a finished one's slot goes to the next sample")
    p.add_argument("--ignore-eos", action="store_true",
                   help="never stop early: every sample gets exactly --max-new-tokens tokens (benchmarks)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weight dtype; auto = bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPUs)")
    p.add_argument("--interactive", action="store_true",
                   help="chat in the terminal, the thought shown apart from the answer")
    p.add_argument("--serve", action="store_true",
                   help="serve OpenAI-compatible /v1/models and /v1/chat/completions over HTTP; request "
                        "fields override --temperature / --top-p; prompt + max_tokens must fit --max-model-len")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="--serve: TCP port")
    p.add_argument("--served-model-name", default=None,
                   help="--serve: the model id clients ask for; unset: the --model folder's name")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="--serve: how long the first request of a batch waits for others to join it")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="--serve: the context, prompt + max_tokens; unset: the config's max_position_embeddings")
    p.add_argument("--chunk-tokens", type=int, default=256,
                   help="--serve: tokens a sample decodes per round before the next requests join (fairness)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="--serve: larger request bodies get a 413")
    args = p.parse_args(argv)
    if not args.interactive and not args.serve and not (args.prompts and args.out):
        fail("--prompts and --out are required (or use --interactive or --serve)")
    for bad, message in [
        (args.n < 1, f"--n must be at least 1, got {args.n}"),
        (args.temperature < 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.top_k < 0, f"--top-k must be >= 0 (0 = off), got {args.top_k}"),
        (args.max_new_tokens < 1, f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"),
        (args.max_prompt_len is not None and args.max_prompt_len < 2,
         f"--max-prompt-len must be at least 2, got {args.max_prompt_len}"),
        (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (not 0 <= args.port < 65536, f"--port must be in [0, 65535], got {args.port}"),
        (args.batch_wait_ms < 0, f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}"),
        (args.interactive and args.serve, "--interactive and --serve exclude each other"),
        (args.max_model_len is not None and args.max_model_len < 2,
         f"--max-model-len must be at least 2, got {args.max_model_len}"),
        (args.chunk_tokens < 1, f"--chunk-tokens must be at least 1, got {args.chunk_tokens}"),
        (args.max_body_mb <= 0, f"--max-body-mb must be > 0, got {args.max_body_mb}"),
        (args.serve and args.max_prompt_len is not None,
         "--max-prompt-len does not apply to --serve: a prompt over the context is refused, as vLLM does"),
    ]:
        if bad:
            fail(message)
    return args


# --- sampling ------------------------------------------------------------------------------------------

def sample_kwargs(args, tokenizer, prompt_indices):
    """generate()'s arguments; one seed per prompt from (--seed, the prompt's index in the whole file)."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, stop_ids=chat.stop_ids(tokenizer), stop_strings=args.stop,
                tokenizer=tokenizer, seed=[(args.seed << 32) + i for i in prompt_indices],
                batch_size=args.batch_size, ignore_eos=args.ignore_eos, compile=args.compile)


def response_text(tokenizer, s, stop_ids):
    """The decoded response, without the stop token that ended it."""
    ids = s["tokens"]
    if s["finish_reason"] == "stop" and ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def to_row(tokenizer, template, prompt_row, s, stop_ids):
    text = response_text(tokenizer, s, stop_ids)
    thought, response, ok = chat.split_answer(text, template)
    return {"id": prompt_row["id"], "sample": s["sample_index"], "text": text, "thought": thought,
            "response": response, "format_ok": ok, "token_ids": s["tokens"], "num_tokens": len(s["tokens"]),
            "finish_reason": s["finish_reason"]}


def gather_rows(rows, world):
    """Every rank's rows on rank 0, in rank order (= prompt order: ranks hold consecutive prompt blocks)."""
    if world == 1:
        return rows
    parts = [None] * world if dist.is_main() else None
    torch.distributed.gather_object(rows, parts, dst=0)
    return [r for part in parts for r in part] if dist.is_main() else None


def write_jsonl(path, rows):
    """Written to a temporary name and renamed, so a crash leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --- interactive chat ----------------------------------------------------------------------------------

def chat_loop(model, tokenizer, args):
    dim, bold, plain = ("\033[2m", "\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
    stops = set(chat.stop_ids(tokenizer))
    print(f"rlmt chat ({args.template} template). /reset starts over, /exit or Ctrl-D quits.")
    messages, turn = [], 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = []
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = chat.encode_prompt(tokenizer, messages, args.template)
        (s,) = sampler.generate(model, [ids], **sample_kwargs(args, tokenizer, [turn]))
        thought, answer, _ = chat.split_answer(response_text(tokenizer, s, stops), args.template)
        if thought:
            print(f"{dim}[thinking]\n{thought}{plain}")
        cut = "  [cut at --max-new-tokens]" if s["finish_reason"] == "length" else ""
        print(f"{bold}assistant>{plain} {answer}{cut}")
        messages.append({"role": "assistant", "content": answer})  # later turns see the answer, not the thought
        turn += 1


# --- OpenAI-compatible server --------------------------------------------------------------------------

# Fields a request may carry; any other is refused by name (vLLM and OpenAI 400 on what they cannot honor,
# and a silently dropped `tools` or `response_format` would look like a model failure).
FIELDS = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
          "max_completion_tokens", "n", "seed", "stop", "logprobs", "top_logprobs",
          "user", "metadata", "store"}
DELIMITERS = (chat.THINK_OPEN, chat.THINK_CLOSE, chat.RESPONSE_OPEN, chat.RESPONSE_CLOSE)


def parse_chat_request(body, tokenizer, args, names, context, longest_token):
    """A /v1/chat/completions body -> (job, None), or (None, (status, message)) for a bad request.

    The job holds the prompt ids and the sampling fields; requests with equal fields share a batch.
    context: the model's length limit (prompt + max_tokens); longest_token: the most characters one token
    holds, so a prompt surely over the context is refused before it is tokenized."""
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
            "top_logprobs": top_logprobs, "samples": [None] * n, "live": [[] for _ in range(n)],
            "base": [[] for _ in range(n)], "lps": [[] for _ in range(n)],
            "error": None, "cancelled": False, "done": threading.Event(), "changed": threading.Event()}, None


def round_seed(seed, k, r):
    """The seed of round r of sample k of a request: a sample does not depend on what it was batched with."""
    return int.from_bytes(hashlib.blake2b(repr((seed, k, r)).encode(), digest_size=8).digest(), "little") >> 2


def batch_worker(model, tokenizer, args, jobs):
    """The one thread that runs the model. Samples advance in rounds of at most --chunk-tokens tokens: each
    round decodes every unfinished sample of a group with equal sampling fields in one sampler.generate
    call, prompt + tokens so far as its prompt (a re-prefill, cheap next to decoding the round), so a
    16,000-token request does not hold a 50-token one behind it; new requests join at each round."""
    stops = chat.stop_ids(tokenizer)
    active = []  # [job, sample index, round] of each unfinished sample
    while True:
        arrived = []
        if not active:  # idle: the first request waits --batch-wait-ms for others to join it
            arrived.append(jobs.get())
            deadline = time.monotonic() + args.batch_wait_ms / 1000
            while (left := deadline - time.monotonic()) > 0:
                try:
                    arrived.append(jobs.get(timeout=left))
                except queue.Empty:
                    break
        while not jobs.empty():
            arrived.append(jobs.get_nowait())
        active += [[job, k, 0] for job in arrived for k in range(job["n"])]
        active = [a for a in active if not a[0]["cancelled"]]  # a stream whose client went away
        groups = {}
        for a in active:
            groups.setdefault(a[0]["key"], []).append(a)
        for (temperature, top_p, stop), group in groups.items():
            done = {}

            def on_tokens(j, tokens, group=group):  # streams read base + tokens of this round
                job, k, _ = group[j]
                if job["stream"]:
                    job["live"][k] = job["base"][k] + tokens
                    job["changed"].set()
            try:
                samples = sampler.generate(
                    model, [job["ids"] + job["base"][k] for job, k, _ in group], 1, temperature=temperature,
                    max_new_tokens=[min(args.chunk_tokens, job["max_tokens"] - len(job["base"][k]))
                                    for job, k, _ in group],
                    top_p=top_p, stop_ids=stops, stop_strings=list(stop), tokenizer=tokenizer,
                    seed=[round_seed(job["seed"], k, r) for job, k, r in group], batch_size=args.batch_size,
                    compile=args.compile, on_tokens=on_tokens)
            except Exception as e:  # answer these requests with a 500 and keep serving the next ones
                for job, _, _ in group:
                    job["error"] = (500, f"generation failed: {type(e).__name__}: {e}")
                    done[id(job)] = job
                samples = []
            for a, s in zip(group, samples):
                job, k, _ = a
                job["base"][k] = job["base"][k] + s["tokens"]  # the prompt of the next round
                job["lps"][k] = job["lps"][k] + s["logprobs"].tolist()
                a[2] += 1
                # a stop string across two rounds is seen here, on the whole text, not by the sampler
                hit = stop and any(x in tokenizer.decode(job["base"][k]) for x in stop)
                if s["finish_reason"] == "stop" or hit or len(job["base"][k]) >= job["max_tokens"]:
                    job["samples"][k] = {"tokens": job["base"][k], "logprobs": job["lps"][k],
                                         "finish_reason": "stop" if s["finish_reason"] == "stop" or hit else "length"}
                    job["changed"].set()
                    if all(x is not None for x in job["samples"]):
                        done[id(job)] = job
            for job in done.values():
                if job["logprobs"] and job["top_logprobs"] and not job["error"]:
                    job["top"] = top_logprobs(model, job, temperature)
                job["done"].set()
                job["changed"].set()
        rounds = len(active)
        active = [a for a in active if a[0]["samples"][a[1]] is None and not a[0]["error"]]
        print(f"decoded {rounds} sample(s) in {len(groups)} batch(es), {len(active)} unfinished", file=sys.stderr,
              flush=True)


def top_logprobs(model, job, temperature):
    """Per sample, [L, k] (logprobs, ids) of the k most likely tokens at each response position: one
    teacher-forced forward of prompt + response, log_softmax(logits / T) (T = 1 when greedy), as the sampler."""
    out, P, k = [], len(job["ids"]), job["top_logprobs"]
    with torch.no_grad():
        for s in job["samples"]:
            ids = torch.tensor([job["ids"] + s["tokens"]], device=model.inv_freq.device)
            logits = model(ids)[0, P - 1:P - 1 + len(s["tokens"])].float() / (temperature or 1.0)
            top = torch.log_softmax(logits, -1).topk(k, -1)
            out.append((top.values.tolist(), top.indices.tolist()))
    return out


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
    """The slice of `tokens` that spells the answer: from the first token whose prefix reaches the answer's
    start to the one that reaches the end of the (stop-cut) text, found by binary search over decoded
    prefixes (monotone in length), so a 16,000-token response costs ~30 decodes."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    text, _ = cut_stop(tokenizer.decode(tokens), stop)
    _, answer = api_split(text, template)
    start = text.rfind(answer) if answer else len(text)

    def first(n_chars):  # the fewest tokens whose decoded text holds n_chars characters
        lo, hi = 0, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if len(tokenizer.decode(tokens[:mid])) < n_chars else (lo, mid)
        return lo
    a = first(start + 1) - 1 if answer else len(tokens)  # the token holding the answer's first character
    return max(a, 0), first(len(text)) if answer else len(tokens)


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


def stream_events(job, tokenizer, args, name):
    """The server-sent events of a streamed completion (chat.completion.chunk objects): as the worker books
    tokens, each choice's new thought and answer text; then its finish_reason (and logprobs), the usage
    when asked for, and [DONE]. Only text that no later token can change is sent (see held)."""
    stops = set(chat.stop_ids(tokenizer))
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": name}
    extra = {"usage": None} if job["usage_chunk"] else {}

    def event(choices, **more):
        return f"data: {json.dumps({**head, 'choices': choices, **extra, **more}, ensure_ascii=False)}\n\n"
    yield event([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for k in range(job["n"])])
    sent, ended = [["", ""] for _ in range(job["n"])], [False] * job["n"]
    deadline = time.monotonic() + 24 * 3600
    while not all(ended) and time.monotonic() < deadline:
        job["changed"].wait(timeout=1.0)
        job["changed"].clear()
        if job["error"]:
            yield f"data: {json.dumps({'error': {'message': job['error'][1], 'code': job['error'][0]}})}\n\n"
            break
        choices = []
        for k in range(job["n"]):
            if ended[k]:
                continue
            s = job["samples"][k]
            if s is not None:
                text, finish = sample_text(tokenizer, s, job["stop"], stops)
                parts = api_split(text, args.template)
            else:
                text, _ = cut_stop(tokenizer.decode([t for t in job["live"][k] if t not in stops]), job["stop"])
                parts = api_split(text[:len(text) - held(text, job["stop"])], args.template, final=False)
            delta = {}
            for i, key in enumerate(("reasoning_content", "content")):
                if parts[i].startswith(sent[k][i]) and len(parts[i]) > len(sent[k][i]):
                    delta[key], sent[k][i] = parts[i][len(sent[k][i]):], parts[i]
            if delta:
                choices.append({"index": k, "delta": delta, "logprobs": None, "finish_reason": None})
            if s is not None:
                ended[k] = True
                lp = choice_logprobs(job, k, tokenizer, args) if job["logprobs"] else None
                choices.append({"index": k, "delta": {}, "logprobs": lp, "finish_reason": finish})
        if choices:
            yield event(choices)
    if job["usage_chunk"] and all(ended):
        yield event([], usage=usage(job))
    yield "data: [DONE]\n\n"


def serve(model, tokenizer, args):
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    names, started = (name, args.model), int(time.time())
    context = args.max_model_len or model.hf_config.get("max_position_embeddings")
    if not context:
        fail("the model's config.json names no max_position_embeddings; give --max-model-len")
    max_body = int(args.max_body_mb * (1 << 20))
    longest_token = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    card = {"id": name, "object": "model", "created": started, "owned_by": "rlmt", "max_model_len": context}
    jobs = queue.Queue()
    threading.Thread(target=batch_worker, args=(model, tokenizer, args, jobs), daemon=True).start()

    class Handler(http.server.BaseHTTPRequestHandler):
        """One thread per connection (ThreadingHTTPServer); it parses, queues and waits for the worker.
        The default access log prints the request line only, never the headers (API keys stay out)."""

        def reply(self, status, body):
            raw = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def error(self, status, message):
            kind = "invalid_request_error" if status < 500 else "server_error"
            self.reply(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                return self.reply(200, {"object": "list", "data": [card]})
            if path.startswith(("/v1/models/", "/models/")):
                wanted = path.split("/models/", 1)[1]
                if wanted in names:
                    return self.reply(200, card)
                return self.error(404, f"model {wanted!r} is not served here; ask for {name!r}")
            self.error(404, f"no route GET {self.path}; this server has GET /v1/models and "
                            "POST /v1/chat/completions")

        def do_POST(self):
            if self.path.split("?")[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self.error(404, f"no route POST {self.path}; use /v1/chat/completions")
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                return self.error(411, "a Content-Length header is required")
            if int(length) > max_body:
                self.close_connection = True  # the unread body must not be parsed as the next request
                return self.error(413, f"the body is larger than {max_body} bytes (--max-body-mb)")
            job, problem = parse_chat_request(self.rfile.read(int(length)), tokenizer, args, names, context,
                                              longest_token)
            if problem:
                return self.error(*problem)
            jobs.put(job)
            if job["stream"]:
                return self.stream(job)
            job["done"].wait()
            if job["error"]:
                return self.error(*job["error"])
            try:
                body = completion_body(job, tokenizer, args, name)
            except Exception as e:  # one clear line, not a dropped connection
                return self.error(500, f"cannot build the reply: {type(e).__name__}: {e}")
            self.reply(200, body)

        def stream(self, job):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # HTTP/1.0: the stream ends when the connection does
            self.end_headers()
            self.close_connection = True
            try:
                for chunk in stream_events(job, tokenizer, args, name):
                    self.wfile.write(chunk.encode())
                    self.wfile.flush()
            except OSError:  # the client went away: the worker drops the request at its next round
                job["cancelled"] = True

    try:
        server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = server.server_address[:2]
    print(f"serving {name!r} ({args.template} template, context {context}) on http://{host}:{port}/v1",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --- main ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rows = None
    if not args.interactive and not args.serve:
        try:
            rows = data.load_prompts(args.prompts)
        except data.DataError as e:
            fail(e)
    rank, world, device = dist.init()
    if (args.interactive or args.serve) and world > 1:
        fail("--interactive and --serve run in one process, not under torchrun")
    try:
        tokenizer = chat.load_tokenizer(args.model)
        prompt_ids = data.encode_prompts(tokenizer, rows, args.template, args.max_prompt_len)[0] if rows else None
        if args.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, args.dtype)
        model = from_pretrained(args.model, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if args.interactive:
        return chat_loop(model, tokenizer, args)
    if args.serve:
        return serve(model, tokenizer, args)

    lo, hi = rank * len(rows) // world, (rank + 1) * len(rows) // world  # this rank's prompts
    samples = sampler.generate(model, prompt_ids[lo:hi], args.n, progress=dist.is_main(),
                               **sample_kwargs(args, tokenizer, range(lo, hi)))
    stops = set(chat.stop_ids(tokenizer))
    mine = [to_row(tokenizer, args.template, rows[lo + s["prompt_index"]], s, stops) for s in samples]
    merged = gather_rows(mine, world)
    if dist.is_main():
        write_jsonl(args.out, merged)
        done = sum(r["finish_reason"] == "stop" for r in merged)
        print(f"wrote {len(merged)} samples ({done} stopped, {len(merged) - done} hit --max-new-tokens) "
              f"to {args.out}", file=sys.stderr)
    dist.cleanup()


if __name__ == "__main__":
    main()
