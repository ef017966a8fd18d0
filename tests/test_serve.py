"""`sample.py --serve` as a real OpenAI-compatible server on 127.0.0.1 (a subprocess, one for the module):
its two routes, 4xx answers to bad requests without going down, batching of concurrent requests, and
eval.py judging through it over HTTP (the tiny model's garbage verdicts count as unparsable; a rerun
sends nothing)."""

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

from rlmt import judge as J

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


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # a long batch window: requests sent together by the tests surely land in one batch
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", llama_dir, "--serve", "--port", str(port),
           "--template", "think", "--max-new-tokens", "32", "--served-model-name", NAME, "--batch-wait-ms", "300"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(base + "/models")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            time.sleep(0.3)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    ("/chat/completions", ask("x", max_tokens=10_000), None, 400, "max_tokens must be an integer in [1, 32]"),
    ("/chat/completions", ask("x", n="2"), None, 400, "n must be"),
    ("/chat/completions", ask("x", stop=[""]), None, 400, "stop must be"),
    ("/chat/completions", ask("x", stream=True), None, 400, "stream"),
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
