"""An OpenAI-compatible chat-completions server for an rlmt model (`sample.py --serve`).

It answers `/v1/models`, `/v1/models/{id}` and `/v1/chat/completions` as vLLM's server does, so that official
harnesses, and eval.py's judge, can query an rlmt checkpoint; rlmt/api.py holds the protocol (what a request
may ask, what a reply and a stream look like), this module runs it. One thread runs the model: samples decode
in rounds of --chunk-tokens tokens, each round one sampler.generate call per set of sampling fields that new
requests join, so a long request does not starve short ones. `stream: true` sends each round's tokens as they
are decoded. Bodies over --max-body-mb get a 413 unread. No auth: it binds 127.0.0.1 unless --host says
otherwise.

A request's life: api.parse_chat_request (validate, tokenize) -> new_job on the queue -> batch_worker (the one
thread that runs the model) -> api.completion_body, or stream_events while it decodes.
"""

import hashlib
import http.server
import json
import os
import queue
import sys
import threading
import time

import torch

from rlmt import api, chat, sampler


def new_job(request):
    """A validated request (api.parse_chat_request) plus what the model thread and the reply share: per
    sample k, samples[k] (None until finished), live[k] (the tokens so far, for streams), base[k] and lps[k]
    (tokens and log-probs of the rounds done); error (status, message) and cancelled; done (all samples
    finished) and changed (a token or sample was booked) events."""
    n = request["n"]
    return {**request, "samples": [None] * n, "live": [[] for _ in range(n)],
            "base": [[] for _ in range(n)], "lps": [[] for _ in range(n)],
            "error": None, "cancelled": False, "done": threading.Event(), "changed": threading.Event()}


# --- the model thread ----------------------------------------------------------------------------------

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


# --- streams -------------------------------------------------------------------------------------------

def stream_events(job, tokenizer, args, name):
    """The server-sent events of a streamed completion (chat.completion.chunk objects): as the worker books
    tokens, each choice's new thought and answer text; then its finish_reason (and logprobs), the usage
    when asked for, and [DONE]. Only text that no later token can change is sent (see api.held)."""
    stops = set(chat.stop_ids(tokenizer))
    head = api.stream_head(name)
    yield api.event(head, job, api.first_choices(job))
    sent, ended = [("", "")] * job["n"], [False] * job["n"]
    deadline = time.monotonic() + 24 * 3600
    while not all(ended) and time.monotonic() < deadline:
        job["changed"].wait(timeout=1.0)
        job["changed"].clear()
        if job["error"]:
            yield api.error_event(job["error"])
            break
        choices = []
        for k in range(job["n"]):
            if not ended[k]:
                new, sent[k], ended[k] = api.stream_delta(job, k, sent[k], tokenizer, args, stops)
                choices += new
        if choices:
            yield api.event(head, job, choices)
    if job["usage_chunk"] and all(ended):
        yield api.event(head, job, [], usage=api.usage(job))
    yield api.DONE


# --- the HTTP server -----------------------------------------------------------------------------------

def serve(model, tokenizer, args):
    """Serve until Ctrl-C. args: sample.py's flags (--serve and the sampling ones). A missing context
    length or a port that cannot be bound raises ValueError, before any request is taken."""
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    names, started = (name, args.model), int(time.time())
    context = args.max_model_len or model.hf_config.get("max_position_embeddings")
    if not context:
        raise ValueError("the model's config.json names no max_position_embeddings; give --max-model-len")
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
            self.reply(status, api.error_body(status, message))

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
            request, problem = api.parse_chat_request(self.rfile.read(int(length)), tokenizer, args, names,
                                                      context, longest_token)
            if problem:
                return self.error(*problem)
            job = new_job(request)
            jobs.put(job)
            if job["stream"]:
                return self.stream(job)
            job["done"].wait()
            if job["error"]:
                return self.error(*job["error"])
            try:
                body = api.completion_body(job, tokenizer, args, name)
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
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"serving {name!r} ({args.template} template, context {context}) on http://{host}:{port}/v1",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
