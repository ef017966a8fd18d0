"""eval.py's files: atomic JSON / JSONL writers, reference answers read from another run or a harness's
outputs file, the thinking statistics and their plot, the answer files of the official harnesses
(AlpacaEval 2, Arena-Hard v2, WildBench) and report.md.

The exports hold the answers only, the thought stripped; an answer that did not parse (e.g. cut off while
thinking) is exported as "", since its whole-text fallback would be the thought.
"""

import json
import os
import re
import time
import uuid

import numpy as np

from rlmt import chat, data, judge

FORMATS = ("alpaca_eval", "arena_hard", "wildbench")
WILDBENCH_QUESTIONS = 1024  # WildBench v2: its evaluation pairs answers with these questions by position
ANSWER_RULE = {"chat": "the whole text (after the last `</think>` when there is one)",
               "chat-think": "the text after the last `</think>`", "think": "the text after the last `</think>`",
               "zero": "the text after the first `<response>`, up to `</response>`",
               "zero-nothink": "the text after the first `<response>`, up to `</response>`"}


# --- files ---------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    """Written to a temporary name and renamed, so a crash leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path, obj):
    """Written to a temporary name and renamed, so a crash leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    """The rows of a JSONL file ([] when there is none); a line cut short by a crash is skipped, so its
    answer is generated (or its judge request sent) again."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


# --- reference answers ---------------------------------------------------------------------------------

def load_reference(path, rows):
    """Answers from an existing outputs file, matched to the prompts by id (or uid, session_id,
    question_id), else by the last user turn (AlpacaEval's "instruction"). A `</think>` in an answer
    without a separate thought is split off on the last one, as for generated answers. A file that cannot
    be read, a record without an answer or a prompt without a record raises ValueError naming it."""
    try:
        records = [rec for _, rec in data.read_records(path)]
    except data.DataError as e:
        raise ValueError(f"--reference {e}") from None
    by_id, by_text = {}, {}
    for n, rec in enumerate(records):
        answer = next((rec[k] for k in ("answer", "response", "output") if k in rec), None)
        answer = answer[0] if isinstance(answer, list) and answer else answer
        if not isinstance(answer, str):
            raise ValueError(f'--reference {path}: record {n} has no "answer", "response" or "output" string')
        thought, ok = rec.get("thought", ""), rec.get("format_ok")
        if "thought" not in rec and chat.THINK_CLOSE in answer:
            thought, answer, ok = chat.split_answer(answer, "chat", last=True)
        file_name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        row = {"generator": rec.get("generator") or rec.get("model") or file_name,
               "thought": thought or "", "answer": answer, "format_ok": ok,
               "num_tokens": rec.get("num_tokens"), "finish_reason": rec.get("finish_reason")}
        for k in ("id", "uid", "session_id", "question_id"):
            if rec.get(k) is not None:
                by_id.setdefault(str(rec[k]), row)
        if isinstance(rec.get("instruction"), str):
            by_text.setdefault(rec["instruction"].strip(), row)
    out, missing = [], []
    for r in rows:
        hit = by_id.get(r["id"]) or by_text.get(chat.user_turn(r["messages"]).strip())
        if hit is None:
            missing.append(r["id"])
        out.append({"id": r["id"], "messages": r["messages"], **(hit or {})})
    if missing:
        raise ValueError(f"--reference {path}: no answer for {len(missing)} of {len(rows)} prompts (e.g. id "
                         f"{missing[0]!r}); records are matched by id, uid, session_id or question_id, else by the "
                         "instruction text")
    return out


# --- thinking statistics -------------------------------------------------------------------------------

def thinking_stats(rows, tokenizer):
    """Format rate, share cut at the length limit, thought and answer lengths in tokens (all counted with
    the evaluated model's tokenizer, one ruler for every generator) and in words."""
    def spread(values):
        v = np.asarray(values, dtype=np.float64)
        return {"mean": float(v.mean()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                "max": float(v.max())} if len(v) else None

    def tokens(texts):
        return [len(t) for t in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    counts = {f: tokens([r[f] for r in rows]) for f in ("thought", "answer")}
    fmt = [bool(r["format_ok"]) for r in rows if r.get("format_ok") is not None]
    cut = [r["finish_reason"] == "length" for r in rows if r.get("finish_reason")]
    stats = {"n": len(rows), "format_rate": float(np.mean(fmt)) if fmt else None,
             "cut_at_max_tokens": float(np.mean(cut)) if cut else None,
             "thought_tokens": spread(counts["thought"]), "answer_tokens": spread(counts["answer"]),
             "thought_words": spread([judge.word_count(r["thought"]) for r in rows]),
             "answer_words": spread([judge.word_count(r["answer"]) for r in rows])}
    return stats, counts


def plot_lengths(counts_by_name, path):
    """Histograms of thought and answer lengths per generator, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, field in zip(axes, ("thought", "answer")):
        for name, counts in counts_by_name.items():
            ax.hist(counts[field], bins=30, alpha=0.5, label=name)
        ax.set_xlabel(f"{field} tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- harness exports -----------------------------------------------------------------------------------

def markdown_counts(text):
    """Arena-Hard's style features (headers, list items, bold spans), code blocks removed first."""
    text = re.sub(r"```[^`]*```", "", text)
    return {"header_count": {f"h{k}": len(re.findall(rf"^#{{{k}}}\s", text, re.M)) for k in range(1, 7)},
            "list_count": {"ordered": len(re.findall(r"^\s*\d+\.\s", text, re.M)),
                           "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.M))},
            "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)),
                           "__": len(re.findall(r"__[^_\n]+__", text))}}


def parsed(row, template):
    """False when a generated row's answer is the whole-text fallback (rlmt.chat.parseable: e.g. cut off while
    thinking, no `</think>`), so that "answer" holds the thought; True for rows without a text (--reference)."""
    return "text" not in row or chat.parseable(row["text"], template)


def check_wildbench(rows, raw, path):
    """Why `path` cannot be exported for WildBench (None when it can): WildBench pairs answers with its
    questions by position and stops at any session_id mismatch, so only its full question file, in its order,
    gives a usable export."""
    missing = sum(raw[r["id"]].get("session_id") is None for r in rows)
    if missing or len(rows) < WILDBENCH_QUESTIONS:
        return (f"--export wildbench needs the full WildBench question file ({WILDBENCH_QUESTIONS} rows with "
                f"session_id, in the benchmark's order); {path} has {len(rows)} rows, {missing} without session_id")
    return None


def export(fmt, name, rows, raw, tokenizer, out_dir, template, gen):
    """Write the answers (thought stripped) in a harness's own format -> the file's path. A row whose answer did
    not parse (`parsed` False) is exported as "" rather than as its text, which would be the thought.

    alpaca_eval  AlpacaEval 2 (github.com/tatsu-lab/alpaca_eval): `alpaca_eval --model_outputs FILE` reads a
                 JSON list of {"instruction", "output", "generator"} (+ "dataset" when the prompt row has
                 one) and pairs outputs with the reference outputs by instruction.
    arena_hard   Arena-Hard-Auto v2.0 (github.com/lmarena/arena-hard-auto): copy to
                 data/arena-hard-v2.0/model_answer/{name}.jsonl. One line a question: {"uid", "ans_id",
                 "model", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content":
                 {"answer": text}}], "tstamp", "metadata": {"token_len", header/list/bold counts}};
                 gen_judgment.py keys answers by uid and reads messages[-1]["content"]["answer"]. token_len is
                 counted with the model's tokenizer, not tiktoken; the project's utils/add_markdown_info.py
                 recomputes it. (v0.1 used {"question_id", "model_id", "choices"}; not written.)
    wildbench    WildBench (github.com/allenai/WildBench): copy to result_dirs/wild_bench_v2/{name}.json,
                 a JSON list of {"session_id", "chat_history", "model_input", "output": [text], "generator",
                 "configs", "dataset"}, one per question in the question file's order: its evaluation pairs
                 them with the questions by position, stops at a session_id mismatch, and reads output[0]
                 (main checks the prompt file with check_wildbench before generating).
    The question ids are the prompt rows' uid / session_id when present, else their id. raw: id -> the prompt
    file's own record; template: the generator's (what parses); gen: its {"temperature", "top_p",
    "max_tokens"}, recorded in WildBench's configs."""
    safe = re.sub(r"[^\w.-]+", "_", name)
    rows = [r if parsed(r, template) else {**r, "answer": ""} for r in rows]
    if fmt == "alpaca_eval":
        path = os.path.join(out_dir, "export", "alpaca_eval", f"{safe}.json")
        items = [{"instruction": chat.user_turn(r["messages"]), "output": r["answer"], "generator": name,
                  **({"dataset": raw[r["id"]]["dataset"]} if "dataset" in raw[r["id"]] else {})} for r in rows]
    elif fmt == "arena_hard":
        path = os.path.join(out_dir, "export", "arena_hard", "model_answer", f"{safe}.jsonl")
        lengths = [len(t) for t in tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]]
        items = [{"uid": str(raw[r["id"]].get("uid", r["id"])), "ans_id": uuid.uuid4().hex[:22], "model": name,
                  "messages": [{"role": "user", "content": chat.user_turn(r["messages"])},
                               {"role": "assistant", "content": {"answer": r["answer"]}}],
                  "tstamp": time.time(), "metadata": {"token_len": n, **markdown_counts(r["answer"])}}
                 for r, n in zip(rows, lengths)]
    else:
        path = os.path.join(out_dir, "export", "wildbench", f"{safe}.json")
        items = [{"session_id": str(raw[r["id"]].get("session_id", r["id"])),
                  "chat_history": [m["content"] for m in r["messages"] if m["role"] != "system"],
                  "model_input": "n/a", "output": [r["answer"]], "generator": name, "configs": gen,
                  "dataset": "wild_bench_v2", **{k: raw[r["id"]][k] for k in ("primary_tag",) if k in raw[r["id"]]}}
                 for r in rows]
    (write_jsonl if path.endswith(".jsonl") else write_json)(path, items)
    return path


# --- report --------------------------------------------------------------------------------------------

def show(x, pct=False):
    return "n/a" if x is None else f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def write_report(path, res):
    st, j = res["settings"], res["judge"]
    ci = lambda c: f"[{show(c[0], True)}, {show(c[1], True)}]" if c else "n/a"  # noqa: E731
    mm = lambda d: f"{show(d['mean'])} / {show(d['median'])}" if d else "n/a"  # noqa: E731
    lines = [f"# Evaluation: {res['model']}", "", f"{res['n_prompts']} prompts from `{st['prompts']}`; T "
             f"{st['temperature']}, top-p {st['top_p']}.", ""]
    lines += [f"- {n}: template `{g['template']}`, up to {g['max_new_tokens']} new tokens"
              + (f", stop at {', '.join(f'`{x}`' for x in g['stop'])}" if g["stop"] else "")
              + f"; the answer is {ANSWER_RULE[g['template']]}." for n, g in res["generation"].items()] + [""]
    if j:
        lines += ["## Pairwise judgement", "",
                  "| judge | against | prompts judged | win rate | 95% CI | LC win rate | 95% CI |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| {j['judge']} | {res['reference']} | {j['n']} | {show(j['win_rate'], True)} | "
                  f"{ci(j['win_rate_ci95'])} | {show(j['lc_win_rate'], True)} | {ci(j['lc_win_rate_ci95'])} |", "",
                  "LC: a logistic regression of the win on the word-count difference (model − reference), read "
                  "at a difference of zero."
                  + (" Reward model: P(win) = σ(r_model − r_ref)." if j["kind"] == "rm" else ""), ""]
        if j["kind"] == "http":
            how = "each prompt judged in both orders" if j["protocol"] == "both-orders" else \
                "AlpacaEval's ranking prompt, one order a prompt drawn from the seed, binary wins, inputs cut to " \
                f"{judge.ALPACA_EVAL_MAX_WORDS} words"
            lines += [f"{j['games']} games ({how}); {j['requests_sent']} requests sent "
                      f"this run; **unparsable verdicts: {j['unparsable_games']}**; failed requests: "
                      f"{j['failed_games']}" + (f" (e.g. {j['example_error']})" if j["example_error"] else "")
                      + f"; prompts without any verdict, left out of the win rate: "
                        f"{len(j['prompts_without_verdict'])}.", ""]
    lines += ["## Thinking", "", "| generator | format rate | cut at max tokens | thought tokens (mean / median) "
              "| answer tokens (mean / median) | thought words (mean / median) | answer words (mean / median) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in res["thinking"].items():
        lines.append(f"| {name} | {show(t['format_rate'], True)} | {show(t['cut_at_max_tokens'], True)} | "
                     + " | ".join(mm(t[k]) for k in ("thought_tokens", "answer_tokens", "thought_words",
                                                     "answer_words")) + " |")
    for name, u in res["unparsable"].items():
        lines += ["", f"**{name}: {u['n']} answers did not parse** (no template delimiter, e.g. cut off while "
                     f"thinking), exported as empty answers" + (f": {', '.join(u['ids'])}" if u["ids"] else "") + "."]
    if res["plot"]:
        lines += ["", f"![thought and answer lengths]({os.path.basename(res['plot'])})"]
    if res["exports"]:
        lines += ["", "## Exports (thought stripped)", ""] + [f"- {k}: `{v}`" for k, v in res["exports"].items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
