"""`sample.py --serve` (rlmt/serve.py, rlmt/api.py) as a real OpenAI-compatible server on 127.0.0.1 (a subprocess, one
for the module): its two routes, 4xx answers to bad requests without going down, batching of concurrent
requests, and eval.py judging through it over HTTP (the tiny model's garbage verdicts count as unparsable;
a rerun sends nothing)."""

import http.client
import http.server
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlmt import api as A
from rlmt import judge as J
from rlmt import serve as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ev = importlib.import_module("eval")

NAME = "tiny-judge"


def call(url, body=None, raw=None):
    """-> (status, parsed JSON reply). `raw` bytes are sent as they are (malformed bodies)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_server(llama_dir, log, *flags):
    """A `sample.py --serve` subprocess on a free port -> (proc, base URL), once /v1/models answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a long batch window: requests sent together by the tests surely land in one batch; short rounds
    # (--chunk-tokens 16) so that requests of a few dozen tokens cross rounds
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", llama_dir, "--serve", "--port", str(port),
           "--served-model-name", NAME, "--batch-wait-ms", "300", "--chunk-tokens", "16", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            if call(base + "/models")[0] == 200:
                return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise AssertionError(f"the server did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.3)


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def running_server(llama_dir, tmp_path_factory, template):
    """A module's server under `template` -> yields (base URL, its log), stopped after the module."""
    log = tmp_path_factory.mktemp(f"serve-{template}") / "server.log"
    proc, base = start_server(llama_dir, log, "--template", template)
    try:
        yield base, log
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    yield from running_server(llama_dir, tmp_path_factory, "think")


@pytest.fixture(scope="module")
def chat_server(llama_dir, tmp_path_factory):
    """The chat template: no thinking expected, so the tiny model's whole text is the answer."""
    yield from running_server(llama_dir, tmp_path_factory, "chat")


def posts(log):
    return log.read_text().count('"POST /v1/chat/completions')


def ask(content, **fields):
    return {"model": NAME, "messages": [{"role": "user", "content": content}], **fields}


def test_models_route_names_the_served_model(server):
    status, body = call(server[0] + "/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [NAME] and body["object"] == "list"


def test_chat_completion_fields_and_seeded_samples(server):
    status, body = call(server[0] + "/chat/completions", ask("Hi", max_tokens=8, n=2, seed=7, temperature=1.0))
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == NAME
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert "reasoning_content" in c["message"] and c["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 16
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    again = call(server[0] + "/chat/completions", ask("Hi", max_tokens=8, n=2, seed=7, temperature=1.0))[1]
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]


@pytest.mark.parametrize("path, body, raw, status, words", [
    ("/chat/completions", None, b"{not json", 400, "not valid JSON"),
    ("/chat/completions", None, b"[1, 2]", 400, "JSON object"),
    ("/chat/completions", {"messages": []}, None, 400, "messages must be"),
    ("/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None, 400, "messages[0] needs a role"),
    ("/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, None, 400, "last message"),
    ("/chat/completions", ask("x", temperature=-1), None, 400, "temperature must be"),
    ("/chat/completions", ask("x", top_p=0), None, 400, "top_p must be"),
    ("/chat/completions", ask("x", max_tokens=10_000), None, 400, "max_tokens is 10000"),
    ("/chat/completions", ask("x" * 3_000_000), None, 400, "characters, more than the model's context of 2048"),
    ("/chat/completions", ask("x " * 2100), None, 400, "the model's context is 2048 tokens"),
    ("/chat/completions", ask("x", tools=[{"type": "function"}]), None, 400, "tools is not supported"),
    ("/chat/completions", ask("x", response_format={"type": "json_object"}), None, 400, "response_format is not"),
    ("/chat/completions", ask("x", frequency_penalty=0.5), None, 400, "frequency_penalty is not supported"),
    ("/chat/completions", ask("x", logit_bias={"1": 5}), None, 400, "logit_bias is not supported"),
    ("/chat/completions", ask("x", some_new_field=1), None, 400, "some_new_field is not supported"),
    ("/chat/completions", ask("x", n=65), None, 400, "n must be an integer in [1, 64]"),
    ("/chat/completions", ask("x", logprobs=True, top_logprobs=21), None, 400, "top_logprobs must be"),
    ("/chat/completions", ask("x", top_logprobs=2), None, 400, "top_logprobs needs logprobs=true"),
    ("/chat/completions", ask("x", stream="yes"), None, 400, "stream must be true or false"),
    ("/chat/completions", ask("x", n="2"), None, 400, "n must be"),
    ("/chat/completions", ask("x", stop=[""]), None, 400, "stop must be"),
    ("/chat/completions", {**ask("x"), "model": "gpt-4o"}, None, 404, "is not served here"),
    ("/completions", ask("x"), None, 404, "no route"),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, path, body, raw, status, words):
    got, reply = call(server[0] + path, body, raw)
    assert got == status and words in reply["error"]["message"] and reply["error"]["code"] == status
    assert call(server[0] + "/chat/completions", ask("Hi", max_tokens=2))[0] == 200


def test_oversized_body_is_refused_unread(server):
    host, port = server[0].split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 413 and "larger than" in json.loads(reply.read())["error"]["message"]
    conn.close()
    assert call(server[0] + "/chat/completions", ask("Hi", max_tokens=2))[0] == 200


def test_concurrent_requests_are_decoded_in_one_batch(server):
    """Four greedy requests sent at once share a batch and get what each gets alone."""
    base, log = server
    prompts = ["Why is the sky blue?", "Name three colors.", "Say hello.", "Tell me a story."]
    before = log.read_text().count("decoded")
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: call(base + "/chat/completions", ask(p, max_tokens=6, temperature=0)),
                                 prompts))
    batches = [line for line in log.read_text().splitlines() if line.startswith("decoded")][before:]
    assert max(int(line.split()[1]) for line in batches) >= 2
    alone = [call(base + "/chat/completions", ask(p, max_tokens=6, temperature=0)) for p in prompts]
    assert [s for s, _ in together] == [200] * 4
    assert [b["choices"][0]["message"] for _, b in together] == [b["choices"][0]["message"] for _, b in alone]


def test_eval_judges_through_the_server_and_caches(server, llama_dir, tmp_path, monkeypatch):
    base, log = server
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in
                               [("a", "Why is the sky blue?"), ("b", "Name three colors."), ("c", "Say hello.")]))
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"id": i, "answer": f"A short reference answer {i}."}) + "\n" for i in "abc"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-logged")
    argv = ["--model", llama_dir, "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--max-new-tokens", "8",
            "--reference", str(ref), "--judge", base, "--judge-model", NAME, "--judge-max-tokens", "8",
            "--judge-workers", "6", "--bootstrap", "100"]
    sent = posts(log)
    res = ev.main(argv)
    j = res["judge"]
    assert j["games"] == 6 and j["requests_sent"] == 6 and j["failed_games"] == 0
    assert posts(log) - sent == 6
    judged = [json.loads(line) for line in open(tmp_path / "out" / "judgments.jsonl")]
    verdicts = [v for r in judged for v in r["verdicts"]]
    assert len(verdicts) == 6 and j["unparsable_games"] == verdicts.count("unparsable") > 0  # garbage verdicts
    assert j["prompts_without_verdict"] == [r["id"] for r in judged if r["win"] is None]
    assert j["n"] == 3 - len(j["prompts_without_verdict"])
    assert f"unparsable verdicts: {j['unparsable_games']}" in (tmp_path / "out" / "report.md").read_text()
    assert len((tmp_path / "out" / "judge_cache.jsonl").read_text().splitlines()) == 6

    again = ev.main(argv)  # everything cached: no request reaches the server
    assert again["judge"]["requests_sent"] == 0 and posts(log) - sent == 6
    assert {k: v for k, v in again["judge"].items() if k != "requests_sent"} == \
        {k: v for k, v in j.items() if k != "requests_sent"}
    assert "sk-test-never-logged" not in log.read_text()


def test_judge_client_retries_transient_errors_and_stops_on_others():
    """rlmt.judge.chat_completion against a scripted server: 500 and 429 are retried with the key sent each
    time; a 400 stops at once, with the key masked in the message; /models answering 401 is reported."""
    replies, seen = [], []

    class Scripted(http.server.BaseHTTPRequestHandler):
        def answer(self):
            seen.append(self.headers.get("Authorization"))
            status, body = replies.pop(0)
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.answer()

        do_GET = answer

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        replies[:] = [(500, {}), (429, {}), (200, {"choices": [{"message": {"content": "[[B]]"}}]})]
        assert J.chat_completion(base + "/chat/completions", {}, "sk-x", 5, retries=3, backoff=0.01) == ("[[B]]", None)
        assert seen == ["Bearer sk-x"] * 3
        replies[:] = [(503, {}), (503, {})]
        content, error = J.chat_completion(base + "/chat/completions", {}, None, 5, retries=1, backoff=0.01)
        assert content is None and error.startswith("HTTP 503")
        replies[:] = [(400, {"error": {"message": "unknown model; your key sk-x"}})]
        with pytest.raises(RuntimeError, match="HTTP 400") as e:
            J.chat_completion(base + "/chat/completions", {}, "sk-x", 5, retries=3, backoff=0.01)
        assert "sk-x" not in str(e.value) and not replies
        replies[:] = [(401, {})]
        assert "API key was refused" in J.check_endpoint(base, "sk-x")
    finally:
        srv.shutdown()
        srv.server_close()


# --- vLLM parity: streaming, logprobs, limits, fairness, stop strings ------------------------------------

def read_events(base, body, timeout=60):
    """POST a stream=true request with http.client -> the parsed `data:` events, [DONE] last."""
    host, port = base.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("Content-Type") == "text/event-stream"
    events = []
    for _ in range(100_000):  # bounded: a stream that never ends fails the test
        line = reply.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    conn.close()
    return events


def reassemble(chunks, n):
    """Stream chunks -> per choice {reasoning_content, content, finish_reason}."""
    out = [{"reasoning_content": "", "content": "", "finish_reason": None} for _ in range(n)]
    for c in chunks:
        for ch in c["choices"]:
            for key in ("reasoning_content", "content"):
                out[ch["index"]][key] += ch["delta"].get(key) or ""
            out[ch["index"]]["finish_reason"] = ch["finish_reason"] or out[ch["index"]]["finish_reason"]
    return out


def as_stream(body):
    return [{"reasoning_content": c["message"]["reasoning_content"] or "", "content": c["message"]["content"],
             "finish_reason": c["finish_reason"]} for c in body["choices"]]


@pytest.mark.parametrize("which", ["server", "chat_server"])
def test_stream_events_reassemble_to_the_non_streamed_completion(which, request):
    """Raw SSE: a role chunk, incremental deltas (thought under think, answer under chat), one finish chunk
    per choice, a usage chunk, [DONE]; the same seed gives the non-streamed result (crossing rounds)."""
    base = request.getfixturevalue(which)[0]
    body = ask("Tell me a story.", max_tokens=40, n=2, seed=11, temperature=1.0)
    events = read_events(base, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and all(c["usage"] is None for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    key = "reasoning_content" if which == "server" else "content"
    assert sum(key in ch["delta"] for c in chunks for ch in c["choices"]) > 4  # incremental, not one blob
    finals = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(ch["index"] for ch in finals) == [0, 1]
    status, whole = call(base + "/chat/completions", body)
    assert status == 200 and reassemble(chunks, 2) == as_stream(whole)
    assert usage["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] > 16


def test_stream_through_the_openai_client(chat_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=chat_server[0], api_key="sk-none", timeout=60, max_retries=0)
    fields = dict(model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=24, seed=5,
                  temperature=1.0)
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **fields):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    whole = client.chat.completions.create(**fields)
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [NAME]


def test_logprobs_of_the_answer_tokens(chat_server):
    """The sampler's log-prob of each answer token equals that token's entry in the teacher-forced
    top_logprobs (greedy: it is the first of them), and the tokens spell the answer."""
    base = chat_server[0]
    for temperature, k in ((0, 5), (0.8, 20)):
        status, body = call(base + "/chat/completions", ask("Name three colors.", max_tokens=24, seed=3,
                                                            temperature=temperature, logprobs=True, top_logprobs=k))
        assert status == 200
        choice = body["choices"][0]
        content = choice["logprobs"]["content"]
        spelled = b"".join(bytes(e["bytes"]) for e in content).decode(errors="replace")
        assert content and choice["message"]["content"] in spelled
        matched = 0
        for e in content:
            assert len(e["top_logprobs"]) == k and e["logprob"] <= 0
            same = [t["logprob"] for t in e["top_logprobs"] if t["bytes"] == e["bytes"]]  # the same token
            if temperature == 0:
                best = e["top_logprobs"][0]  # greedy: the chosen token is the most likely one
                assert best["bytes"] == e["bytes"] and abs(best["logprob"] - e["logprob"]) < 1e-3
            if same:
                assert any(abs(x - e["logprob"]) < 1e-3 for x in same), (e, temperature)
                matched += 1
        assert matched == len(content) if temperature == 0 else matched > 0  # a random model: a flat distribution
    status, body = call(base + "/chat/completions", ask("Hi", max_tokens=4, logprobs=True))
    assert status == 200 and all(e["top_logprobs"] == [] for e in body["choices"][0]["logprobs"]["content"])


def test_model_route_by_id(server):
    status, body = call(server[0] + "/models/" + NAME)
    assert status == 200 and body["id"] == NAME and body["max_model_len"] == 2048
    status, body = call(server[0] + "/models/gpt-4o")
    assert status == 404 and "not served here" in body["error"]["message"]


def test_max_tokens_defaults_to_the_context_and_is_capped_by_it_only(server):
    base = server[0]
    prompt = call(base + "/chat/completions", ask("Hi", max_tokens=1))[1]["usage"]["prompt_tokens"]
    assert call(base + "/chat/completions", ask("Hi", max_tokens=2048 - prompt, stop=["e"]))[0] == 200
    status, body = call(base + "/chat/completions", ask("Hi", max_tokens=2049 - prompt))
    assert status == 400 and f"the prompt has {prompt} tokens and max_tokens is {2049 - prompt}" in \
        body["error"]["message"] and "context of 2048" in body["error"]["message"]


def test_a_long_request_does_not_starve_short_ones(chat_server):
    """One request of ~1,400 tokens of prompt and 600 of response, then, once it is decoding, three short
    ones: they join the long one's rounds (--chunk-tokens 16) and finish first."""
    (base, log), ends, took = chat_server, {}, {}
    seen = log.read_text().count("\ndecoded")
    start = time.monotonic()

    def send(name, body):
        t = time.monotonic()
        status, reply = call(base + "/chat/completions", body)
        ends[name], took[name] = time.monotonic(), time.monotonic() - t
        assert status == 200, reply
        return reply

    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(send, "long", ask("word " * 1400, max_tokens=600, temperature=0))
        for _ in range(600):  # until the worker has booked a round of it
            if log.read_text().count("\ndecoded") > seen:
                break
            time.sleep(0.05)
        shorts = [pool.submit(send, f"short{i}", ask(f"Say hello {i}.", max_tokens=8, temperature=0))
                  for i in range(3)]
        for f in shorts:
            f.result(timeout=120)
        tokens = long.result(timeout=120)["usage"]["completion_tokens"]
    print("\nlatencies (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(took.items())) +
          f"; long request: {tokens} tokens, done at {ends['long'] - start:.2f} s")
    assert tokens > 64  # it decoded several rounds
    assert all(ends[f"short{i}"] < ends["long"] for i in range(3))


def fake_job(tokenizer, text, stop, n=1):
    ids = tokenizer.encode(text, add_special_tokens=False)
    return {"ids": [1, 2], "stop": stop, "n": n, "logprobs": True, "top_logprobs": 0, "usage_chunk": True,
            "samples": [{"tokens": ids, "logprobs": [-0.5] * len(ids), "finish_reason": "length"}] * n,
            "live": [[] for _ in range(n)], "error": None, "changed": threading.Event()}, ids


@pytest.mark.parametrize("stop, thought, answer", [
    (["END"], "plan one STOP plan two", "the answer"),      # in the answer: the thought intact, the answer cut
    (["STOP"], "plan one", ""),                              # in the thought: no </think> left, all thought
    ([], "plan one STOP plan two", "the answer END tail"),
])
def test_stop_strings_are_cut_before_the_split(llama_tokenizer, stop, thought, answer):
    from types import SimpleNamespace
    args = SimpleNamespace(template="chat-think")
    job, ids = fake_job(llama_tokenizer, "<think>plan one STOP plan two</think> the answer END tail", stop)
    body = A.completion_body(job, llama_tokenizer, args, NAME)
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": answer, "reasoning_content": thought or None}
    assert choice["finish_reason"] == ("stop" if stop else "length")
    spelled = b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"]).decode()
    assert answer in spelled and "think>" not in spelled and (not stop or stop[0] not in spelled)

    # the same text streamed a token at a time reassembles to the same message: a half-written </think>,
    # <think> or stop string is held back until it is known
    final, job["samples"] = job["samples"], [None]

    def feed():  # the worker's part: one token booked at a time, then the finished sample
        for i in range(1, len(ids) + 1):
            job["live"][0] = ids[:i]
            job["changed"].set()
            time.sleep(0.002)
        job["samples"] = final
        job["changed"].set()
    feeder = threading.Thread(target=feed)
    feeder.start()
    live = list(S.stream_events(job, llama_tokenizer, args, NAME))
    feeder.join()
    assert live[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in live[:-2]]
    assert reassemble(chunks, 1) == as_stream(body)
