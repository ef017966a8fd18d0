"""eval.py: the judge statistics against direct computations, the verdict parser, and the script end to end
on tiny checkpoints (generate, reuse on a rerun, reward-model judge, exports, report), with its errors.
The HTTP judge runs against a real `sample.py --serve` in test_serve.py."""

import importlib
import json
import os
import socket
import sys

import numpy as np
import pytest
import torch

from rlmt import chat
from rlmt import exports as X
from rlmt import judge as J

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ev = importlib.import_module("eval")  # eval.py; the name `eval` is left to the builtin

PROMPTS = [{"id": "a", "messages": [{"role": "user", "content": "Why is the sky blue?"}], "dataset": "helpful_base"},
           {"id": "b", "prompt": "Name three colors.", "uid": "q-17", "session_id": "s-17"},
           {"id": "c", "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Write a short poem about a river."}]},
           {"id": "d", "prompt": "Tell me a story about a cat and a dog."},
           {"id": "e", "prompt": "What is one plus one?"},
           {"id": "f", "prompt": "Explain how a tree grows, step by step."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- statistics ----------------------------------------------------------------------------------------

def direct_lc(wins, diffs, steps=20000):
    """The length-controlled win rate computed another way: plain gradient ascent on the unpenalized
    Bernoulli log-likelihood of σ(a + b·Δ/sd) (concave, so it converges to the same maximum), then σ(a)."""
    y = np.asarray(wins, dtype=np.float64)
    z = np.asarray(diffs, dtype=np.float64) / np.std(diffs)
    a = b = 0.0
    lr = 4.0 / (len(y) * (1 + np.mean(z ** 2)))  # below 2 / (largest curvature), so every step climbs
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(a + b * z)))
        a, b = a + lr * np.sum(y - p), b + lr * np.sum((y - p) * z)
    return 1 / (1 + np.exp(-a))


def test_lc_when_length_alone_decides_the_win():
    """The model is usually longer and wins exactly as often as length predicts: the raw win rate is
    high, the length-controlled one is 0.5 (soft wins: exactly; hard wins: within sampling error)."""
    rng = np.random.default_rng(0)
    d = rng.normal(60, 50, 400)  # model − reference words
    p = J.sigmoid(1.5 * d / d.std())
    assert p.mean() > 0.7
    assert J.lc_win_rate(p, d) == pytest.approx(0.5, abs=1e-4)
    hard = (rng.random(400) < p).astype(float)
    assert hard.mean() > 0.7
    lc = J.lc_win_rate(hard, d)
    assert abs(lc - 0.5) < 0.1 and lc == pytest.approx(direct_lc(hard, d), abs=1e-3)


def test_lc_when_quality_alone_decides_the_win():
    """Wins that do not depend on length: every (win, Δ) also appears as (win, −Δ), so the fitted slope
    is 0 and the LC win rate is exactly the raw win rate."""
    rng = np.random.default_rng(1)
    y = (rng.random(150) < 0.7).astype(float)
    d = rng.normal(0, 60, 150)
    y, d = np.concatenate([y, y]), np.concatenate([d, -d])
    a, b = J.lc_fit(y, d)
    assert abs(b) < 1e-8
    assert J.lc_win_rate(y, d) == pytest.approx(y.mean(), abs=1e-6) == pytest.approx(direct_lc(y, d), abs=1e-4)


def test_lc_is_finite_on_degenerate_tables():
    assert J.lc_win_rate([0.5, 0.5, 0.5], [0, 0, 0]) == pytest.approx(0.5)  # a model against itself
    assert J.lc_win_rate([1, 1, 1, 1], [3, -2, 5, 0]) > 0.99  # always wins
    assert 0.4 < J.lc_win_rate([0, 0, 1, 1], [-5, -1, 1, 5]) < 0.6  # separated by length


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(2)
    y = rng.random(60)
    ci = J.bootstrap_ci(lambda i: y[i].mean(), len(y), 500, seed=3)
    assert ci == J.bootstrap_ci(lambda i: y[i].mean(), len(y), 500, seed=3)
    assert ci[0] < y.mean() < ci[1] and ci[1] - ci[0] < 0.3
    s = J.summarize([0.5] * 5, [0] * 5, 200)
    assert s["win_rate"] == s["lc_win_rate"] == 0.5 and s["win_rate_ci95"] == (0.5, 0.5)
    assert J.summarize([], [])["win_rate"] is None


def test_rm_win_probability_is_sigma_of_the_score_difference():
    class FakeRM:
        def score(self, prompts, answers):
            return torch.tensor([float(len(a)) for a in answers])

    p, r_model, r_ref = J.rm_win_probs(FakeRM(), ["q", "q"], ["aaa", "a"], ["a", "a"])
    assert p.tolist() == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item(), 0.5])
    assert r_model.tolist() == [3, 1] and r_ref.tolist() == [1, 1]


# --- LLM judge: prompt and verdicts --------------------------------------------------------------------

@pytest.mark.parametrize("text, verdict", [
    ("Answer A covers the question. [[A]]", "A"),
    ("Both are fine, B is clearer.\n\nFinal verdict: [[b]]", "B"),
    ("They are equally good. [[tie]]", "tie"),
    ("[[ C ]]", "tie"),
    ("I must answer [[A]], [[B]] or [[tie]]. A misses the point. [[B]]", "B"),  # the last verdict counts
    ("B", "B"),
    (" tie. ", "tie"),
    ("Answer A is better.", None),
    ("[[A>B]]", None),
    ("\ufffd <M\ufffde\x0e\ufffd4", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, verdict):
    assert J.parse_verdict(text) == verdict


def test_both_orders_cancel_a_position_bias():
    # a judge that always prefers the first answer shown: a win as A, a loss as B, 0.5 overall
    assert J.game_score("A", model_is_a=True) + J.game_score("A", model_is_a=False) == 1.0
    assert J.game_score("B", model_is_a=False) == 1.0 and J.game_score("tie", True) == 0.5
    assert J.game_score(None, True) is None
    msgs = J.judge_messages([{"role": "user", "content": "Hi?"}], "first", "second")
    assert msgs[0]["role"] == "system" and "[[A]]" in msgs[0]["content"]
    assert msgs[1]["content"].index("first") < msgs[1]["content"].index("second")


# --- AlpacaEval 2's ranking judge ------------------------------------------------------------------------

def test_alpaca_eval_prompt_and_truncation():
    long = " ".join(f"w{i}" for i in range(1, 2501))
    msgs = J.alpaca_eval_messages("Say  hi\nplease", "first {output_2}", long)
    assert msgs[0] == {"role": "system", "content": J.ALPACA_EVAL_SYSTEM}
    user = msgs[1]["content"]
    assert user.startswith("I want you to create a leaderboard of different of large-language models.")
    assert '"instruction": """Say  hi\nplease""",' in user  # the instruction's own spacing is kept
    assert '"answer": """first {output_2}"""' in user  # filled in one pass: a placeholder in an answer stays
    assert user.index('"model_1"') < user.index("first {output_2}") < user.index('"model_2"') < user.index("w1 ")
    assert " w2000\"\"\"" in user and "w2001" not in user  # cut at 2,000 words
    assert J.truncate_words("a  b\n c d", 3) == "a  b\n c" and J.truncate_words("a b", 3) == "a b"
    assert J.truncate_words("", 2000) == ""


@pytest.mark.parametrize("text, verdict", [
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]", "A"),
    ("[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]", "B"),
    ("```python\n[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]\n```", "B"),
    ("Ranking: [{'model': 'model_1', 'rank': 1}]", "A"),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 1}]", None),  # no tie in this protocol
    ("[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]", None),
    ("[{'model': 'model_1', 'rank': True}]", None),
    ("[{'model': 'model_1', 'rank': __import__('os').getpid()}]", None),  # literal_eval, never eval
    ("model_1 is better", None),
    ("[[A]]", None),
    (None, None),
])
def test_parse_ranking(text, verdict):
    assert J.parse_ranking(text) == verdict


def test_alpaca_eval_order_is_seeded_per_prompt():
    ids = [f"p{i}" for i in range(64)]
    first = [J.model_shown_first(0, i) for i in ids]
    assert first == [J.model_shown_first(0, i) for i in ids]  # seeded
    assert 16 < sum(first) < 48  # both orders occur
    assert first != [J.model_shown_first(1, i) for i in ids]  # another seed, other orders
    assert J.model_shown_first(0, "p7") == first[7]  # a prompt's order does not depend on the others


def fake_rows(n, long_answer=None):
    model = [{"id": f"p{i}", "messages": [{"role": "system", "content": "Be kind."},
                                          {"role": "user", "content": f"question {i}"}], "answer": f"model answer {i}"}
             for i in range(n)]
    ref = [{"id": f"p{i}", "messages": model[i]["messages"], "answer": f"reference answer {i}"} for i in range(n)]
    if long_answer:
        model[0]["answer"] = long_answer
    return model, ref


def http_args(tmp_path, *extra):
    return ev.parse_args(["--model", "m", "--prompts", "p", "--out", str(tmp_path), "--baseline", "b",
                          "--judge", "http://127.0.0.1:1/v1", "--judge-model", "judge-x", *extra])


def test_alpaca_eval_protocol_one_seeded_game_a_prompt_binary_wins(tmp_path, monkeypatch):
    sent = []

    def first_wins(url, payload, *a, **kw):  # a judge that always ranks the answer shown first on top
        sent.append(payload)
        return "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]", None

    monkeypatch.setattr(ev.judge, "chat_completion", first_wins)
    long = " ".join(["word"] * 2100) + " TAIL"
    model, ref = fake_rows(40, long_answer=long)
    args = http_args(tmp_path, "--judge-protocol", "alpaca-eval", "--seed", "5")
    records, extra = ev.judge_http(args, model, ref)
    assert len(sent) == 40 and extra["games"] == 40 and extra["protocol"] == "alpaca-eval"
    first = [J.model_shown_first(5, m["id"]) for m in model]
    assert [r["model_shown_first"] for r in records] == [[f] for f in first]
    assert [r["win"] for r in records] == [1.0 if f else 0.0 for f in first]  # binary, the bias not averaged
    for payload, m, r, f in zip(sent, model, ref, first):
        user = payload["messages"][1]["content"]
        assert payload["messages"][0]["content"] == J.ALPACA_EVAL_SYSTEM and payload["temperature"] == 0.0
        assert f'"instruction": """question {m["id"][1:]}"""' in user  # the user turn, not the system prompt
        if m["id"] != "p0":
            assert (user.index(m["answer"]) < user.index(r["answer"])) == f
    assert "TAIL" not in sent[0]["messages"][1]["content"]  # cut to 2,000 words
    again, extra = ev.judge_http(args, model, ref)  # every reply cached: nothing sent
    assert extra["requests_sent"] == 0 and len(sent) == 40 and again == records


def test_alpaca_eval_protocol_maps_ranks_to_the_right_answer(tmp_path, monkeypatch):
    def prefers_the_model(url, payload, *a, **kw):  # a judge that finds the model's answer wherever it is
        user = payload["messages"][1]["content"]
        model_is_1 = user.index("model answer") < user.index("reference answer")
        if "question 3\"" in user:
            return "I cannot decide.", None
        return f"[{{'model': 'model_1', 'rank': {1 if model_is_1 else 2}}}, " \
               f"{{'model': 'model_2', 'rank': {2 if model_is_1 else 1}}}]", None

    monkeypatch.setattr(ev.judge, "chat_completion", prefers_the_model)
    model, ref = fake_rows(10)
    records, extra = ev.judge_http(http_args(tmp_path, "--judge-protocol", "alpaca-eval"), model, ref)
    assert [r["win"] for r in records] == [1.0, 1.0, 1.0, None] + [1.0] * 6
    assert extra["unparsable_games"] == 1 and extra["prompts_without_verdict"] == ["p3"]
    assert records[3]["verdicts"] == ["unparsable"]


def test_both_orders_protocol_is_still_the_default(tmp_path, monkeypatch):
    sent = []

    def first_wins(url, payload, *a, **kw):
        sent.append(payload)
        return "[[A]]", None

    monkeypatch.setattr(ev.judge, "chat_completion", first_wins)
    model, ref = fake_rows(3)
    records, extra = ev.judge_http(http_args(tmp_path), model, ref)
    assert len(sent) == 6 and extra["protocol"] == "both-orders" and [r["win"] for r in records] == [0.5] * 3
    assert all(r["model_shown_first"] == [True, False] for r in records)
    assert sent[0]["messages"][0]["content"] == J.JUDGE_SYSTEM


# --- generation settings per template ------------------------------------------------------------------

def test_generation_defaults_follow_the_template():
    args = ev.parse_args(["--model", "m", "--prompts", "p", "--out", "o"])
    assert args.template == "chat-think"  # the paper evaluates warm-started models on the plain template
    expect = {"chat": (4096, []), "chat-think": (8192, []), "think": (8192, []),
              "zero": (8192, ["</response>"]), "zero-nothink": (4096, ["</response>"])}
    assert {t: ev.generation_settings(args, t) for t in chat.TEMPLATES} == expect
    args = ev.parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--max-new-tokens", "100",
                          "--stop", "END", "--stop", "###"])
    assert ev.generation_settings(args, "zero") == ev.generation_settings(args, "chat") == (100, ["END", "###"])
    args = ev.parse_args(["--model", "m", "--prompts", "p", "--out", "o", "--stop", ""])
    assert ev.generation_settings(args, "zero") == (8192, [])  # --stop '' turns the default off


def test_zero_generation_stops_at_response_close(llama_dir, tmp_path, monkeypatch):
    calls = []
    real = ev.sampler.generate

    def spy(model, prompts, *a, **kw):
        calls.append(kw)
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(ev.sampler, "generate", spy)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    argv = ["--model", llama_dir, "--prompts", prompts, "--out", str(tmp_path / "o"), "--template", "zero",
            "--max-new-tokens", "6"]
    res = ev.main(argv)
    assert calls[0]["stop_strings"] == ["</response>"] and calls[0]["tokenizer"] is not None
    assert calls[0]["max_new_tokens"] == 6
    assert res["generation"]["llama"] == {"template": "zero", "max_new_tokens": 6, "stop": ["</response>"]}
    for r in read_jsonl(os.path.join(tmp_path / "o", "model.jsonl")):
        assert (r["thought"], r["answer"], r["format_ok"]) == chat.split_answer(r["text"], "zero")
    assert "stop at `</response>`" in open(tmp_path / "o" / "report.md").read()
    ev.main(argv)
    assert len(calls) == 1  # same settings: reused
    ev.main(argv + ["--stop", ""])
    assert len(calls) == 2 and calls[1]["stop_strings"] == []  # another stop: generated again


# --- the script end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run1(llama_dir, llama_rm_dir, tmp_path_factory):
    """The model against itself as a generated baseline (same seeds: the same answers), judged by the tiny
    reward model, exported for AlpacaEval and Arena-Hard (WildBench needs its full question file)."""
    tmp = tmp_path_factory.mktemp("eval")
    prompts = write_jsonl(tmp / "prompts.jsonl", PROMPTS)
    out = str(tmp / "run1")
    argv = ["--model", llama_dir, "--baseline", llama_dir, "--prompts", prompts, "--out", out, "--template", "think",
            "--max-new-tokens", "12", "--judge", f"rm:{llama_rm_dir}", "--bootstrap", "200",
            "--export", "alpaca_eval,arena_hard"]
    return ev.main(argv), out, argv, tmp


def test_generates_judges_and_reports(run1):
    res, out, _, _ = run1
    rows = read_jsonl(os.path.join(out, "model.jsonl"))
    assert [r["id"] for r in rows] == list("abcdef")
    for r in rows:
        assert r["num_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
        assert (r["thought"], r["answer"], r["format_ok"]) == chat.split_answer(r["text"], "think", last=True)
    assert read_jsonl(os.path.join(out, "baseline.jsonl"))[0]["answer"] == rows[0]["answer"]
    j = res["judge"]
    # identical answers; their scores (~1) differ only by batch-padding float noise, ~1e-6 at most, so the
    # wins σ(Δr) by a quarter of that: within 1e-6 of 0.5, and so is the LC win rate fitted to them
    assert j["n"] == 6 and j["win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert j["win_rate_ci95"][0] - 1e-6 <= 0.5 <= j["win_rate_ci95"][1] + 1e-6
    assert j["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert res["reference"] == "llama-baseline" and set(res["thinking"]) == {"llama", "llama-baseline"}
    t = res["thinking"]["llama"]
    assert 0 <= t["format_rate"] <= 1 and t["answer_tokens"]["mean"] > 0 and t["thought_words"] is not None
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["judge"]["win_rate"] == j["win_rate"]
    report = open(os.path.join(out, "report.md")).read()
    assert "| win rate |" in report and "LC win rate" in report and "format rate" in report
    judged = read_jsonl(os.path.join(out, "judgments.jsonl"))
    assert [r["win"] for r in judged] == pytest.approx([0.5] * 6, abs=1e-6)
    assert all(r["r_model"] == pytest.approx(r["r_ref"], abs=1e-5) and r["word_diff"] == 0 for r in judged)


def test_exports_in_the_harness_formats(run1):
    res, out, _, _ = run1
    rows = {r["id"]: r for r in read_jsonl(os.path.join(out, "model.jsonl"))}
    # 12 tokens of a random model: most thoughts never close; those export as "" and are counted and listed
    unparsed = [i for i, r in rows.items() if not chat.parseable(r["text"], "think")]
    answer = {i: "" if i in unparsed else r["answer"] for i, r in rows.items()}
    assert res["unparsable"]["llama"] == {"n": len(unparsed), "ids": unparsed}
    assert f"llama: {len(unparsed)} answers did not parse" in open(os.path.join(out, "report.md")).read()
    assert set(res["exports"]) == {f"{f}/{n}" for f in ("alpaca_eval", "arena_hard") for n in ("llama", "llama-baseline")}
    alpaca = json.load(open(res["exports"]["alpaca_eval/llama"]))
    assert alpaca[0] == {"instruction": "Why is the sky blue?", "output": answer["a"], "generator": "llama",
                         "dataset": "helpful_base"}
    assert alpaca[2]["instruction"] == "Write a short poem about a river." and "dataset" not in alpaca[1]
    assert [a["output"] for a in alpaca] == list(answer.values())
    arena = read_jsonl(res["exports"]["arena_hard/llama"])
    assert arena[0]["uid"] == "a" and arena[1]["uid"] == "q-17" and arena[0]["model"] == "llama"
    assert arena[0]["messages"] == [{"role": "user", "content": "Why is the sky blue?"},
                                    {"role": "assistant", "content": {"answer": answer["a"]}}]
    assert isinstance(arena[0]["metadata"]["token_len"], int) and "bold_count" in arena[0]["metadata"]
    assert res["exports"]["arena_hard/llama"].endswith(os.path.join("model_answer", "llama.jsonl"))


class WordTok:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def export(fmt, rows, raw, args):
    """rlmt.exports.export as eval.py calls it for generator "m" under --template."""
    gen = {"temperature": args.temperature, "top_p": args.top_p,
           "max_tokens": ev.generation_settings(args, args.template)[0]}
    return X.export(fmt, "m", rows, raw, WordTok(), args.out, args.template, gen)


def wildbench_rows(n):
    """n WildBench questions (session ids out of sorted order) as load_prompts reads them, with their raw rows."""
    raw = [{"session_id": f"s{(7 * i) % n}", "conversation_input": [{"role": "user", "content": f"q{i}",
                                                                      "language": "English"}], "primary_tag": "Math"}
           for i in range(n)]
    rows = [{"id": r["session_id"], "messages": [{"role": "user", "content": r["conversation_input"][0]["content"]}]}
            for r in raw]
    return rows, {r["session_id"]: r for r in raw}


def test_wildbench_export_keeps_the_question_order_and_blanks_unparsed_answers(tmp_path):
    rows, raw = wildbench_rows(5)
    for i, r in enumerate(rows):  # row 2 was cut off while thinking: its "answer" is the whole text
        r["text"] = "<think>\nstill planning" if i == 2 else f"<think>\nplan\n</think>\nanswer {i}"
        r["thought"], r["answer"], r["format_ok"] = chat.split_answer(r["text"], "think", last=True)
    args = ev.parse_args(["--model", "m", "--prompts", "p", "--out", str(tmp_path), "--template", "think"])
    wb = json.load(open(export("wildbench", rows, raw, args)))
    assert [w["session_id"] for w in wb] == [r["id"] for r in rows] == ["s0", "s2", "s4", "s1", "s3"]
    assert [w["output"] for w in wb] == [["answer 0"], ["answer 1"], [""], ["answer 3"], ["answer 4"]]
    assert wb[1]["chat_history"] == ["q1"] and wb[0]["primary_tag"] == "Math" and wb[0]["generator"] == "m"
    for fmt in ("alpaca_eval", "arena_hard"):
        body = open(export(fmt, rows, raw, args)).read()
        assert "still planning" not in body and "answer 4" in body


def test_wildbench_needs_its_full_question_file():
    rows, raw = wildbench_rows(X.WILDBENCH_QUESTIONS)
    assert X.WILDBENCH_QUESTIONS == 1024 and X.check_wildbench(rows, raw, "wb.json") is None
    message = X.check_wildbench(rows[:10], raw, "wb.json")
    assert "needs the full WildBench question file (1024 rows" in message and "wb.json has 10 rows, 0 without" in message
    raw = {**raw, "s5": {k: v for k, v in raw["s5"].items() if k != "session_id"}}
    assert "has 1024 rows, 1 without session_id" in X.check_wildbench(rows, raw, "wb.json")


def test_wildbench_question_file_end_to_end(llama_dir, tmp_path, monkeypatch):
    """A WildBench-format question file (smaller limit for speed): exported in its order, unparsed answers
    blank, counted and listed in results.json and report.md."""
    monkeypatch.setattr(X, "WILDBENCH_QUESTIONS", 3)
    _, raw = wildbench_rows(3)
    prompts = tmp_path / "wb.json"
    prompts.write_text(json.dumps(list(raw.values())))
    res = ev.main(["--model", llama_dir, "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--template",
                   "think", "--max-new-tokens", "4", "--export", "wildbench"])
    rows = read_jsonl(tmp_path / "o" / "model.jsonl")
    unparsed = [r["id"] for r in rows if not chat.parseable(r["text"], "think")]
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"] and unparsed  # 4 tokens: no `</think>`
    assert res["unparsable"] == {"llama": {"n": len(unparsed), "ids": unparsed}}
    assert json.load(open(tmp_path / "o" / "results.json"))["unparsable"] == res["unparsable"]
    assert f"llama: {len(unparsed)} answers did not parse" in open(tmp_path / "o" / "report.md").read()
    wb = json.load(open(res["exports"]["wildbench/llama"]))
    assert [w["session_id"] for w in wb] == ["s0", "s1", "s2"]
    assert [w["output"] for w in wb] == [["" if r["id"] in unparsed else r["answer"]] for r in rows]


def test_exports_strip_the_thought(tmp_path):
    text = "<think>\nplan A\n</think>\nmaybe\n</think>\n\nThe answer."  # evaluation splits on the last </think>
    thought, answer, ok = chat.split_answer(text, "think", last=True)
    rows = [{"id": "x", "messages": [{"role": "user", "content": "q"}], "thought": thought, "answer": answer}]
    args = ev.parse_args(["--model", "m", "--prompts", "p", "--out", str(tmp_path)])
    for fmt in X.FORMATS:
        path = export(fmt, rows, {"x": {}}, args)
        body = open(path).read()
        assert "The answer." in body and "plan A" not in body and "</think>" not in body


def test_rerun_reuses_answers_and_generates_only_new_prompts(run1, monkeypatch):
    res, out, argv, tmp = run1
    calls = []
    real = ev.sampler.generate

    def spy(model, prompts, *a, **kw):
        calls.append(len(prompts))
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(ev.sampler, "generate", spy)
    again = ev.main(argv[:argv.index("--judge")])  # no judge, no export: generation and statistics only
    assert calls == [] and again["thinking"]["llama"] == res["thinking"]["llama"]
    more = write_jsonl(tmp / "more.jsonl", PROMPTS + [{"id": "g", "prompt": "Say hello."}])
    argv2 = list(argv)
    argv2[argv2.index("--prompts") + 1] = more
    ev.main(argv2[:argv2.index("--judge")])
    assert calls == [1, 1]  # only "g", for the model and for the baseline
    assert [r["id"] for r in read_jsonl(os.path.join(out, "model.jsonl"))] == list("abcdefg")


def test_model_against_its_own_other_samples(run1, llama_dir, llama_rm_dir):
    """Other samples of the same model (another seed) as a --reference file: win rate 0.5 within the
    bootstrap interval."""
    _, out, _, tmp = run1
    res = ev.main(["--model", llama_dir, "--prompts", str(tmp / "prompts.jsonl"), "--out", str(tmp / "run2"),
                   "--template", "think", "--max-new-tokens", "12", "--seed", "1",
                   "--reference", os.path.join(out, "model.jsonl"), "--baseline-name", "llama-seed0", "--judge", f"rm:{llama_rm_dir}", "--bootstrap", "200"])
    j = res["judge"]
    assert res["reference"] == "llama-seed0" and j["n"] == 6 and j["win_rate"] != pytest.approx(0.5, abs=1e-4)
    assert j["win_rate_ci95"][0] <= 0.5 <= j["win_rate_ci95"][1]


def test_alpaca_eval_judge_end_to_end(run1, llama_dir, monkeypatch):
    """The script with an HTTP judge (faked) under the AlpacaEval protocol: one request a prompt, results,
    judgments and report say which protocol ran."""
    _, out, _, tmp = run1
    sent = []

    def judge_reply(url, payload, *a, **kw):
        sent.append(payload)
        return "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]", None

    monkeypatch.setattr(ev.judge, "check_endpoint", lambda *a, **kw: None)
    monkeypatch.setattr(ev.judge, "chat_completion", judge_reply)
    res = ev.main(["--model", llama_dir, "--prompts", str(tmp / "prompts.jsonl"), "--out", str(tmp / "run3"),
                   "--template", "think", "--max-new-tokens", "12", "--reference", os.path.join(out, "model.jsonl"),
                   "--judge", "http://127.0.0.1:1/v1", "--judge-model", "judge-x", "--judge-protocol", "alpaca-eval",
                   "--bootstrap", "50"])
    j = res["judge"]
    assert len(sent) == 6 and j["protocol"] == "alpaca-eval" and j["games"] == 6 and j["n"] == 6
    judged = read_jsonl(str(tmp / "run3" / "judgments.jsonl"))
    assert [r["win"] for r in judged] == [0.0 if r["model_shown_first"][0] else 1.0 for r in judged]
    assert j["win_rate"] == pytest.approx(np.mean([r["win"] for r in judged]))
    assert "AlpacaEval's ranking prompt" in open(tmp / "run3" / "report.md").read()


def test_reference_file_matched_by_instruction(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    ref = tmp_path / "ref.json"  # AlpacaEval style: no ids, output may hold a thought
    ref.write_text(json.dumps([{"instruction": "Name three colors.", "output": "<think>hm</think> red",
                                "generator": "g"},
                               {"instruction": "Why is the sky blue?", "output": ["Rayleigh."]}]))
    rows = X.load_reference(str(ref), ev.data.load_prompts(prompts))
    assert [(r["id"], r["answer"], r["thought"]) for r in rows] == [("a", "Rayleigh.", ""), ("b", "red", "hm")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "MISSING"], "MISSING: no such file"),
    (["--judge", "gpt4"], "--judge must be rm:PATH_OR_ALIAS or http(s)://HOST:PORT/v1"),
    (["--judge", "rm:RM"], "--judge compares the model with a baseline"),
    (["--baseline", "MODEL", "--judge", "http://127.0.0.1:1/v1"], "needs --judge-model"),
    (["--baseline", "MODEL", "--judge", "http://127.0.0.1:PORT/v1", "--judge-model", "x"], "unreachable"),
    (["--baseline", "MODEL", "--reference", "REF"], "not both"),
    (["--baseline", "MODEL", "--judge", "rm:RM", "--judge-protocol", "alpaca-eval"], "an LLM judge's protocol"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--export", "alpaca_eval,mtbench"], "unknown --export ['mtbench']"),
    (["--baseline", "/no/such/model"], "--baseline: model '/no/such/model': no such folder"),
    (["--reference", "REF"], "no answer for 1 of 2 prompts (e.g. id 'b')"),
    (["--prompts", "DUP"], "ids must be unique; 'a' appears 2 times"),
    (["--export", "wildbench"], "needs the full WildBench question file (1024 rows with session_id, in the "
                                "benchmark's order); PROMPTS has 2 rows, 1 without session_id"),
    (["--out", "REF"], "--out REF: exists and is not a folder"),
])
def test_clear_one_line_errors(extra, message, llama_dir, llama_rm_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    write_jsonl(tmp_path / "ref.jsonl", [{"id": "a", "answer": "x"}])
    write_jsonl(tmp_path / "dup.jsonl", [PROMPTS[0], PROMPTS[0]])
    subs = {"MISSING": str(tmp_path / "missing.jsonl"), "MODEL": llama_dir, "RM": llama_rm_dir,
            "REF": str(tmp_path / "ref.jsonl"), "DUP": str(tmp_path / "dup.jsonl"), "PORT": str(free_port()),
            "PROMPTS": prompts}
    argv = ["--model", llama_dir, "--prompts", prompts, "--out", str(tmp_path / "o")] + extra
    argv = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("eval.py: error: ")
    for k in ("MISSING", "PROMPTS", "REF"):
        message = message.replace(k, subs[k])
    assert message in err
    assert not os.path.exists(tmp_path / "o" / "model.jsonl")  # failed before generating anything
