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

--serve answers OpenAI chat-completions requests (`/v1/models`, `/v1/chat/completions`) so that official
harnesses, and eval.py's judge, can query an rlmt checkpoint: the answer is the message's `content`, the
thought its `reasoning_content`. Requests that arrive within --batch-wait-ms of each other are decoded
together in one sampler.generate call (one per distinct set of sampling fields). No streaming, no auth:
it binds 127.0.0.1 unless --host says otherwise.
"""

import argparse
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
                        "fields override --temperature / --top-p; --max-new-tokens caps max_tokens")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="--serve: TCP port")
    p.add_argument("--served-model-name", default=None,
                   help="--serve: the model id clients ask for; unset: the --model folder's name")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="--serve: how long the first request of a batch waits for others to join it")
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

MAX_BODY = 32 << 20  # bytes; a larger request body is refused with 413


def parse_chat_request(body, tokenizer, args, names):
    """A /v1/chat/completions body -> (job, None), or (None, (status, message)) for a bad request.

    The job holds the prompt ids and the sampling fields; requests with equal fields share a batch."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, (400, f"the body is not valid JSON ({e})")
    if not isinstance(req, dict):
        return None, (400, "the body must be a JSON object")
    if req.get("model") is not None and req["model"] not in names:
        return None, (404, f"model {req['model']!r} is not served here; ask for {names[0]!r}")
    if req.get("stream"):
        return None, (400, "stream=true is not supported; send stream=false")
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

    def field(name, default, ok, rule, kind=(int, float)):
        value = req.get(name)
        value = default if value is None else value
        good = isinstance(value, kind) and not isinstance(value, bool) and ok(value)
        return value, None if good else f"{name} must be {rule}, got {value!r}"

    if req.get("max_completion_tokens") is not None:  # the newer name of max_tokens
        req["max_tokens"] = req["max_completion_tokens"]
    checks = [field("temperature", args.temperature, lambda v: v >= 0, "a number >= 0"),
              field("top_p", args.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"),
              field("max_tokens", args.max_new_tokens, lambda v: 1 <= v <= args.max_new_tokens,
                    f"an integer in [1, {args.max_new_tokens}] (the server's --max-new-tokens)", int),
              field("n", 1, lambda v: 1 <= v <= 64, "an integer in [1, 64]", int),
              field("seed", random.getrandbits(62), lambda v: True, "an integer", int)]
    for _, problem in checks:
        if problem:
            return None, (400, problem)
    (temperature, _), (top_p, _), (max_tokens, _), (n, _), (seed, _) = checks
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        return None, (400, "stop must be a non-empty string or a list of at most 4 of them")
    try:
        ids = data.encode_prompts(tokenizer, [{"messages": messages}], args.template, args.max_prompt_len)[0][0]
    except ValueError as e:
        return None, (400, f"cannot render the messages with the {args.template} template: {e}")
    return {"ids": ids, "seed": seed, "stop": stop, "key": (float(temperature), float(top_p), max_tokens, n,
                                                            tuple(stop)),
            "samples": [], "error": None, "done": threading.Event()}, None


def batch_worker(model, tokenizer, args, jobs):
    """The one thread that runs the model: take a request, let others join it for --batch-wait-ms, then
    decode each group of requests with equal sampling fields in one sampler.generate call."""
    stops = chat.stop_ids(tokenizer)
    while True:
        batch = [jobs.get()]
        deadline = time.monotonic() + args.batch_wait_ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(jobs.get(timeout=left))
            except queue.Empty:
                break
        groups = {}
        for job in batch:
            groups.setdefault(job["key"], []).append(job)
        for (temperature, top_p, max_tokens, n, stop), group in groups.items():
            try:
                samples = sampler.generate(
                    model, [j["ids"] for j in group], n, max_new_tokens=max_tokens, temperature=temperature,
                    top_p=top_p, stop_ids=stops, stop_strings=list(stop), tokenizer=tokenizer,
                    seed=[j["seed"] for j in group], batch_size=args.batch_size, compile=args.compile)
                for s in samples:
                    group[s["prompt_index"]]["samples"].append(s)
            except Exception as e:  # answer these requests with a 500 and keep serving the next ones
                for j in group:
                    j["error"] = (500, f"generation failed: {type(e).__name__}: {e}")
            for j in group:
                j["done"].set()
        print(f"decoded {len(batch)} request(s) in {len(groups)} batch(es)", file=sys.stderr, flush=True)


def completion_body(job, tokenizer, args, name):
    """The chat.completion object: per sample the answer as content, the thought as reasoning_content."""
    stops = set(chat.stop_ids(tokenizer))
    choices, completion_tokens = [], 0
    for k, s in enumerate(job["samples"]):
        text = response_text(tokenizer, s, stops)
        cut = min((text.find(x) for x in job["stop"] if x in text), default=-1)
        text = text[:cut] if cut >= 0 else text  # OpenAI leaves the stop sequence out of the text
        thought, answer, _ = chat.split_answer(text, args.template, last=True)
        choices.append({"index": k, "message": {"role": "assistant", "content": answer,
                                                "reasoning_content": thought or None},
                        "finish_reason": s["finish_reason"]})
        completion_tokens += len(s["tokens"])
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": choices,
            "usage": {"prompt_tokens": len(job["ids"]), "completion_tokens": completion_tokens,
                      "total_tokens": len(job["ids"]) + completion_tokens}}


def serve(model, tokenizer, args):
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    names, started = (name, args.model), int(time.time())
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
            if self.path.split("?")[0].rstrip("/") in ("/v1/models", "/models"):
                return self.reply(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": started, "owned_by": "rlmt"}]})
            self.error(404, f"no route GET {self.path}; this server has GET /v1/models and "
                            "POST /v1/chat/completions")

        def do_POST(self):
            if self.path.split("?")[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self.error(404, f"no route POST {self.path}; use /v1/chat/completions")
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                return self.error(411, "a Content-Length header is required")
            if int(length) > MAX_BODY:
                self.close_connection = True  # the unread body must not be parsed as the next request
                return self.error(413, f"the body is larger than {MAX_BODY} bytes")
            job, problem = parse_chat_request(self.rfile.read(int(length)), tokenizer, args, names)
            if problem:
                return self.error(*problem)
            jobs.put(job)
            job["done"].wait()
            if job["error"]:
                return self.error(*job["error"])
            self.reply(200, completion_body(job, tokenizer, args, name))

    try:
        server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = server.server_address[:2]
    print(f"serving {name!r} ({args.template} template) on http://{host}:{port}/v1", file=sys.stderr, flush=True)
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
