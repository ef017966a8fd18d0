"""Evaluate a model as the paper does: generate with its template, judge it against a baseline, and
export its answers for the official harnesses (AlpacaEval 2, Arena-Hard v2, WildBench).

  python eval.py --model M --prompts FILE.jsonl --out DIR [--baseline B | --reference outputs.jsonl]
                 [--judge rm:PATH_OR_ALIAS | --judge http://HOST:PORT/v1 --judge-model NAME
                  [--judge-protocol both-orders | alpaca-eval]]
                 [--export alpaca_eval,arena_hard,wildbench]

Generation uses the paper's settings: T 0.7, top-p 0.95, the plain chat template (a warm-started model
opens <think> itself: --template chat-think), up to 8,192 new tokens for a thinking template and 4,096
for a no-think one, and for Zero models a stop at `</response>` (as the authors' evaluation). The
answer is read by rlmt.chat.split_answer: after the *last* `</think>`, or Zero's `<response>` rule.
DIR/model.jsonl and DIR/baseline.jsonl hold one row a prompt; a rerun reuses every row made from the
same prompt, model and settings, and generates only the rest.

Judges (the statistics live in rlmt.judge):
  rm:PATH       a reward model: P(win) = σ(r_model − r_ref) per prompt. Cheap; for research, not for
                numbers to compare with the paper's GPT-4o / GPT-4.1 judges.
  http://…/v1   an OpenAI-compatible chat-completions judge (OpenAI, vLLM, or `sample.py --serve`; the API
                key is read from OPENAI_API_KEY). --judge-protocol both-orders (default): asked once with
                each answer shown first, wins / ties averaged. alpaca-eval: the paper's AlpacaEval 2 judge,
                AlpacaEval's ranking prompt, one game a prompt in an order drawn from --seed, a binary
                win, inputs cut to 2,000 words. Replies are cached in DIR/judge_cache.jsonl: a rerun sends
                only the requests it has no reply for. Unparsable verdicts and failed requests are counted
                and listed, never dropped silently.
Both report the win rate and the paper's length-controlled win rate, each with a 95% bootstrap interval.

Written to DIR: results.json (every figure), report.md, judgments.jsonl (one line a prompt),
thinking_lengths.png (when matplotlib is installed) and export/ (the formats: rlmt.exports.export).
"""

import argparse
import hashlib
import json
import os
import re
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

from rlmt import chat, data, exports, judge, sampler
from rlmt.api import response_text
from rlmt.exports import FORMATS, read_jsonl, write_json, write_jsonl
from rlmt.hub import resolve_path
from rlmt.model import from_pretrained

PROTOCOLS = ("both-orders", "alpaca-eval")
# the paper's new-token budgets: a thought and its answer, or an answer alone
MAX_NEW_TOKENS = {"thinking": 8192, "no-think": 4096}


def fail(message):
    """One line on stderr and exit status 2, before any model is loaded where possible."""
    print(f"eval.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- flags ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, hub id or alias (rlmt.hub.ALIASES)")
    p.add_argument("--prompts", required=True,
                   help='benchmark prompts: JSONL, a JSON array or Parquet of {"id", "messages"} or {"id", "prompt"}, '
                        "or a benchmark's own question file (AlpacaEval, Arena-Hard v2, WildBench); extra fields "
                        "(uid, session_id, dataset, category) are carried into the exports")
    p.add_argument("--out", required=True, help="output folder; answers already in it are reused")
    p.add_argument("--baseline", help="a second checkpoint to generate with and judge against")
    p.add_argument("--reference", help="an existing outputs file to judge against instead (this script's "
                                       "model.jsonl, sample.py's output, or AlpacaEval / WildBench JSON)")
    p.add_argument("--name", help="the model's name in exports and the report; unset: its folder name")
    p.add_argument("--baseline-name", help="the baseline's name; unset: its folder name")
    p.add_argument("--template", choices=chat.TEMPLATES, default="chat-think",
                   help="prompt template of the model. chat-think (the paper's evaluation of warm-started "
                        "models): its chat template, the model opens <think> itself; think: the turn pre-filled "
                        "with <think>; chat: a no-think model; zero / zero-nothink: the Zero instruction")
    p.add_argument("--baseline-template", choices=chat.TEMPLATES, help="the baseline's; unset: --template")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="thought + answer length limit, for the model and the baseline; unset: the paper's, "
                        f"{MAX_NEW_TOKENS['thinking']} for a thinking template ({', '.join(chat.THINKING)}) and "
                        f"{MAX_NEW_TOKENS['no-think']} for a no-think one")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="also stop generating when the response contains TEXT (repeatable; for the model and "
                        "the baseline); unset: </response> for the zero templates, as the authors' Zero "
                        "evaluation, nothing for the others; --stop '' stops at end-of-turn only")
    p.add_argument("--max-prompt-len", type=int, default=None, help="left-truncate prompts to this many tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weight dtype; auto = bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--judge", help="rm:PATH_OR_ALIAS (a reward model) or http(s)://HOST:PORT/v1 "
                                   "(an OpenAI-compatible endpoint; needs --judge-model)")
    p.add_argument("--judge-model", help="the model name sent to an HTTP judge (e.g. gpt-4o-2024-08-06)")
    p.add_argument("--judge-protocol", choices=PROTOCOLS, default="both-orders",
                   help="HTTP judge: both-orders = each prompt judged with either answer first, win / tie / loss "
                        "averaged; alpaca-eval = the paper's AlpacaEval 2 judge: AlpacaEval's ranking prompt, one "
                        "game a prompt in an order drawn from --seed, binary win, inputs cut to 2,000 words")
    p.add_argument("--judge-max-tokens", type=int, default=1024, help="HTTP judge: reply length limit")
    p.add_argument("--judge-timeout", type=float, default=120.0, help="HTTP judge: seconds per request")
    p.add_argument("--judge-retries", type=int, default=3,
                   help="HTTP judge: retries after a timeout, connection error, 429 or 5xx (backoff 1, 2, 4 s…)")
    p.add_argument("--judge-workers", type=int, default=8, help="HTTP judge: requests in flight at once")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--export", default="", help=f"comma-separated answer files to write: {','.join(FORMATS)}")
    args = p.parse_args(argv)
    args.exports = [x.strip() for x in args.export.split(",") if x.strip()]
    args.judge_kind = None if not args.judge else "rm" if args.judge.startswith("rm:") and args.judge[3:] \
        else "http" if re.match(r"https?://[^/\s]+", args.judge) else "bad"
    for bad, message in [
        (args.judge_kind == "bad", f"--judge must be rm:PATH_OR_ALIAS or http(s)://HOST:PORT/v1, got {args.judge!r}"),
        (args.judge_kind == "http" and not args.judge_model, "--judge http://… needs --judge-model NAME"),
        (args.judge_protocol == "alpaca-eval" and args.judge_kind != "http",
         "--judge-protocol alpaca-eval is an LLM judge's protocol: give --judge http(s)://HOST:PORT/v1"),
        (bool(args.baseline and args.reference), "give --baseline or --reference, not both"),
        (bool(args.judge and not (args.baseline or args.reference)),
         "--judge compares the model with a baseline: give --baseline or --reference"),
        (bool(set(args.exports) - set(FORMATS)),
         f"unknown --export {sorted(set(args.exports) - set(FORMATS))}; choose from {','.join(FORMATS)}"),
        (args.temperature < 0, f"--temperature must be >= 0, got {args.temperature}"),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.max_new_tokens is not None and args.max_new_tokens < 1,
         f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"),
        (args.max_prompt_len is not None and args.max_prompt_len < 2, "--max-prompt-len must be at least 2"),
        (os.path.exists(args.out) and not os.path.isdir(args.out),
         f"--out {args.out}: exists and is not a folder (give a folder for the outputs)"),
        (args.batch_size < 1 or args.judge_workers < 1 or args.bootstrap < 1 or args.judge_retries < 0,
         "--batch-size, --judge-workers and --bootstrap must be positive, --judge-retries >= 0"),
    ]:
        if bad:
            fail(message)
    return args


def folder_name(path):
    return os.path.basename(os.path.normpath(path))


# --- generation ----------------------------------------------------------------------------------------

def generation_settings(args, template):
    """(max_new_tokens, stop strings) of a generator with `template`: the flags when given, else the
    paper's for the template (MAX_NEW_TOKENS; Zero stops at `</response>`)."""
    max_new = args.max_new_tokens or MAX_NEW_TOKENS["thinking" if template in chat.THINKING else "no-think"]
    stop = args.stop if args.stop is not None else [chat.RESPONSE_CLOSE] if template.startswith("zero") else []
    return max_new, [x for x in stop if x]


def settings_key(model, template, args):
    """What an answer depends on besides its prompt: rows with another key are generated again."""
    max_new, stop = generation_settings(args, template)
    blob = json.dumps([model, template, args.temperature, args.top_p, max_new, args.max_prompt_len, args.seed]
                      + ([stop] if stop else []))  # without stop strings, the keys of earlier runs still hold
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate(which, model_path, template, rows, args, device, dtype):
    """One answer per prompt row from `model_path` -> output rows, in prompt order. Rows already in
    DIR/{which}.jsonl with the same prompt and settings are reused; the rest are generated a few batches
    at a time, and the file is rewritten after each chunk, so an interrupted run loses little."""
    path = os.path.join(args.out, f"{which}.jsonl")
    key = settings_key(model_path, template, args)
    old = {r["id"]: r for r in read_jsonl(path) if r.get("settings") == key}
    done = {r["id"]: old[r["id"]] for r in rows if r["id"] in old and old[r["id"]]["messages"] == r["messages"]}
    todo = [i for i, r in enumerate(rows) if r["id"] not in done]
    print(f"{which}: {len(done)} answers reused from {path}, {len(todo)} to generate", file=sys.stderr)
    if todo:
        tokenizer = chat.load_tokenizer(model_path)
        model = from_pretrained(model_path, dtype=dtype, device=device)
        stops = chat.stop_ids(tokenizer)
        max_new, stop_strings = generation_settings(args, template)
        ids = data.encode_prompts(tokenizer, [rows[i] for i in todo], template, args.max_prompt_len)[0]
        chunk = 4 * args.batch_size
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            # each prompt's seed follows its index in the file: a resumed run draws what one run would
            samples = sampler.generate(model, ids[start:start + chunk], 1, max_new_tokens=max_new,
                                       temperature=args.temperature, top_p=args.top_p, stop_ids=stops,
                                       stop_strings=stop_strings, tokenizer=tokenizer,
                                       seed=[(args.seed << 32) + i for i in part], batch_size=args.batch_size,
                                       progress=True)
            for i, s in zip(part, samples):
                text = response_text(tokenizer, s, set(stops))
                thought, answer, ok = chat.split_answer(text, template, last=True)
                done[rows[i]["id"]] = {"id": rows[i]["id"], "generator": model_path, "settings": key,
                                       "messages": rows[i]["messages"], "text": text, "thought": thought,
                                       "answer": answer, "format_ok": ok, "num_tokens": len(s["tokens"]),
                                       "finish_reason": s["finish_reason"]}
            write_jsonl(path, [done[r["id"]] for r in rows if r["id"] in done])
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [done[r["id"]] for r in rows]


# --- judges --------------------------------------------------------------------------------------------

def judge_rm(spec, model_rows, ref_rows, device, dtype):
    """Reward-model judge -> per-prompt records with the model's P(win)."""
    from rlmt.reward import RewardModel
    try:
        rm = RewardModel(spec, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--judge rm:{spec}: {e}")
    prompts = [r["messages"] for r in model_rows]
    p, r_model, r_ref = judge.rm_win_probs(rm, prompts, [r["answer"] for r in model_rows],
                                           [r["answer"] for r in ref_rows])
    return [{"id": m["id"], "win": float(w), "r_model": float(a), "r_ref": float(b)}
            for m, w, a, b in zip(model_rows, p, r_model, r_ref)], {}


def judge_http(args, model_rows, ref_rows):
    """LLM judge over HTTP -> per-prompt records and the request accounting. both-orders: two games a prompt
    (the model's answer shown as A, then as B), the win the mean of the parsed games; alpaca-eval: one
    game a prompt in AlpacaEval's ranking prompt, the order drawn from (--seed, prompt id), a binary win."""
    api_key = os.environ.get("OPENAI_API_KEY") or None
    url = args.judge.rstrip("/") + "/chat/completions"
    cache_path = os.path.join(args.out, "judge_cache.jsonl")
    cache = {c["key"]: c["content"] for c in read_jsonl(cache_path)}
    alpaca = args.judge_protocol == "alpaca-eval"
    games = []  # per prompt: [(model shown as A, request key)]
    todo = {}
    for m, r in zip(model_rows, ref_rows):
        orders = (judge.model_shown_first(args.seed, m["id"]),) if alpaca else (True, False)
        games.append([])
        for model_is_a in orders:
            a, b = (m["answer"], r["answer"]) if model_is_a else (r["answer"], m["answer"])
            messages = judge.alpaca_eval_messages(chat.user_turn(m["messages"]), a, b) if alpaca else \
                judge.judge_messages(m["messages"], a, b)
            payload = {"model": args.judge_model, "messages": messages, "temperature": 0.0,
                       "max_tokens": args.judge_max_tokens}
            key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            games[-1].append((model_is_a, key))
            if key not in cache:
                todo[key] = payload  # a dict: identical requests (equal answers) are sent once
    errors, lock = {}, threading.Lock()

    def run(key, payload):
        content, error = judge.chat_completion(url, payload, api_key, args.judge_timeout, args.judge_retries)
        with lock:  # the cache file grows one reply at a time, so a crash keeps what was paid for
            if content is None:
                errors[key] = error
                return
            cache[key] = content
            with open(cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "judge": args.judge_model, "content": content},
                                   ensure_ascii=False) + "\n")

    n_games = sum(map(len, games))
    print(f"judge: {n_games} games, {len(todo)} requests to send to {url}", file=sys.stderr)
    with ThreadPoolExecutor(args.judge_workers) as pool:
        futures = [pool.submit(run, k, p) for k, p in todo.items()]
        try:
            for f in as_completed(futures):
                f.result()
        except RuntimeError as e:
            pool.shutdown(cancel_futures=True)
            fail(e)
    parse = judge.parse_ranking if alpaca else judge.parse_verdict  # both give "A", "B" (or "tie") or None
    records = []
    for m, mine in zip(model_rows, games):
        verdicts = ["failed" if key not in cache else parse(cache[key]) or "unparsable" for _, key in mine]
        scores = [judge.game_score(v, is_a) for v, (is_a, _) in zip(verdicts, mine)
                  if v not in ("failed", "unparsable")]
        records.append({"id": m["id"], "verdicts": verdicts, "model_shown_first": [is_a for is_a, _ in mine],
                        "win": sum(scores) / len(scores) if scores else None})
    every = [v for r in records for v in r["verdicts"]]
    return records, {"judge_model": args.judge_model, "protocol": args.judge_protocol, "games": n_games,
                     "requests_sent": len(todo), "unparsable_games": every.count("unparsable"),
                     "failed_games": every.count("failed"), "example_error": next(iter(errors.values()), None),
                     "prompts_without_verdict": [r["id"] for r in records if r["win"] is None]}


# --- main ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:
        rows = data.load_prompts(args.prompts)
        raw = {r["id"]: rec for r, (_, rec) in zip(rows, data.read_records(args.prompts))}
    except data.DataError as e:
        fail(e)
    if "wildbench" in args.exports and (problem := exports.check_wildbench(rows, raw, args.prompts)):
        fail(problem)
    repeated = next(((i, c) for i, c in Counter(r["id"] for r in rows).items() if c > 1), None)
    if repeated:  # answers, judgements and exports are keyed by id
        fail(f"{args.prompts}: ids must be unique; {repeated[0]!r} appears {repeated[1]} times")
    for flag, path in (("--model", args.model), ("--baseline", args.baseline),
                       ("--judge rm:", args.judge[3:] if args.judge_kind == "rm" else None)):
        try:
            if path:
                resolve_path(path)  # a typo fails now, not after hours of generation
        except FileNotFoundError as e:
            fail(f"{flag}: {e}")
    try:
        ref_rows = exports.load_reference(args.reference, rows) if args.reference else None
    except ValueError as e:
        fail(e)
    if args.judge_kind == "http":  # an unreachable judge or a refused key fails now, not after the generation
        problem = judge.check_endpoint(args.judge.rstrip("/"), os.environ.get("OPENAI_API_KEY") or None,
                                       min(args.judge_timeout, 10))
        if problem:
            fail(problem)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else \
        torch.bfloat16 if device.type == "cuda" else torch.float32
    name = args.name or folder_name(args.model)

    # --- generate
    ref_name = None
    if args.baseline or args.reference:
        ref_name = args.baseline_name or (folder_name(args.baseline) if args.baseline else ref_rows[0]["generator"])
        ref_name += "-baseline" if ref_name == name else ""  # names key the report and the export files
    templates = {name: args.template, **({ref_name: args.baseline_template or args.template} if args.baseline else {})}
    model_rows = generate("model", args.model, templates[name], rows, args, device, dtype)
    if args.baseline:
        ref_rows = generate("baseline", args.baseline, templates[ref_name], rows, args, device, dtype)
    generated = {name: model_rows, **({ref_name: ref_rows} if args.baseline else {})}

    # --- thinking statistics
    tokenizer = chat.load_tokenizer(args.model)
    thinking, counts = {}, {}
    for n, rs in ([(name, model_rows)] + ([(ref_name, ref_rows)] if ref_rows else [])):
        thinking[n], counts[n] = exports.thinking_stats(rs, tokenizer)
    unparsable = {n: [r["id"] for r in rs if not exports.parsed(r, templates[n])] for n, rs in generated.items()}
    generation = {n: dict(zip(("template", "max_new_tokens", "stop"), (t, *generation_settings(args, t))))
                  for n, t in templates.items()}
    res = {"model": name, "reference": ref_name, "n_prompts": len(rows),
           "settings": {k: v for k, v in vars(args).items() if k not in ("exports", "judge_kind")},
           "generation": generation,
           "thinking": thinking, "judge": None, "exports": {},
           "unparsable": {n: {"n": len(ids), "ids": ids} for n, ids in unparsable.items()},
           "plot": exports.plot_lengths(counts, os.path.join(args.out, "thinking_lengths.png"))}

    # --- judge
    if args.judge:
        if args.judge_kind == "rm":
            records, extra = judge_rm(args.judge[3:], model_rows, ref_rows, device, dtype)
        else:
            records, extra = judge_http(args, model_rows, ref_rows)
        for rec, m, r in zip(records, model_rows, ref_rows):
            rec["word_diff"] = judge.word_count(m["answer"]) - judge.word_count(r["answer"])
        judged = [r for r in records if r["win"] is not None]
        res["judge"] = {"kind": args.judge_kind, "judge": args.judge, **extra,
                        **judge.summarize([r["win"] for r in judged], [r["word_diff"] for r in judged],
                                          args.bootstrap, args.seed)}
        write_jsonl(os.path.join(args.out, "judgments.jsonl"), records)

    # --- export, report
    for fmt in args.exports:
        for n, rs in generated.items():
            gen = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": generation[n]["max_new_tokens"]}
            res["exports"][f"{fmt}/{n}"] = exports.export(fmt, n, rs, raw, tokenizer, args.out, templates[n], gen)
    write_json(os.path.join(args.out, "results.json"), res)
    exports.write_report(os.path.join(args.out, "report.md"), res)
    j = res["judge"]
    summary = f"; win rate {exports.show(j['win_rate'], True)}, LC {exports.show(j['lc_win_rate'], True)}" if j else ""
    print(f"wrote {os.path.join(args.out, 'report.md')}{summary}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
