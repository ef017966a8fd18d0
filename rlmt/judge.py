"""Pairwise judging: the win rate, its bootstrap interval, the paper's length-controlled win rate, an LLM
judge's prompt and verdict parser, and a standard-library client for OpenAI-compatible judges.

A judgement compares the model's answer with a reference answer to the same prompt and gives the model
a win in [0, 1] per prompt:
  - a reward model: P(win) = σ(r_model − r_ref)  (the Bradley-Terry probability the RM was trained on);
  - an LLM judge, both orders: 1 / 0.5 / 0 for a win / tie / loss, averaged over the two orders (model
    shown as A, then as B), which cancels a judge's preference for a position;
  - an LLM judge, AlpacaEval 2 as the paper ran it: AlpacaEval's ranking prompt, one game a prompt in an
    order drawn per prompt from a seed (a position bias averages out over prompts, not within one),
    a binary win (rank 1 or 2, no ties), the instruction and both outputs cut to 2,000 words.

Length control, as the paper computes it (RLMT, "Evaluation"): fit a logistic regression of the win on
the word-count difference (model − reference) and read the win probability at a difference of zero:

    P(win | Δ) = σ(a + b · Δ / sd(Δ))        LC win rate = σ(a)

Δ is scaled by its standard deviation but not centered, so that zero still means "equally long".
The wins may be fractional (a reward model's P(win)); the fit maximizes the Bernoulli likelihood with
those soft targets by Newton's method (IRLS). numpy only.
"""

import ast
import hashlib
import json
import re
import time
import urllib.error
import urllib.request

import numpy as np

# --- statistics ----------------------------------------------------------------------------------------


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # no overflow for large |x|


def lc_fit(wins, diffs, ridge=1e-4):
    """Logistic regression of wins [n] in [0, 1] on word-count differences [n] -> (a, b), the intercept
    and the slope per standard deviation of the difference. `ridge` (an L2 penalty on a and b, tiny next
    to the n-term likelihood) keeps the fit finite when the wins are all 0, all 1, or perfectly separated
    by length, where the unpenalized maximum lies at infinity."""
    y = np.asarray(wins, dtype=np.float64)
    d = np.asarray(diffs, dtype=np.float64)
    scale = d.std() if d.std() > 0 else 1.0
    X = np.stack([np.ones_like(d), d / scale], axis=1)  # [n, 2]
    w = np.zeros(2)
    for _ in range(100):
        p = sigmoid(X @ w)
        grad = X.T @ (y - p) - ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def lc_win_rate(wins, diffs):
    """The length-controlled win rate σ(a): the win probability at a word-count difference of zero."""
    return float(sigmoid(lc_fit(wins, diffs)[0]))


def bootstrap_ci(stat, n, samples=1000, seed=0, level=0.95):
    """Percentile bootstrap over prompts: stat(indices [n] int) -> float, recomputed on `samples`
    resamples drawn with replacement from a seeded generator -> (low, high)."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(samples)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def summarize(wins, diffs, samples=1000, seed=0):
    """Win rate, length-controlled win rate and their 95% bootstrap intervals (None when n = 0)."""
    y = np.asarray(wins, dtype=np.float64)
    d = np.asarray(diffs, dtype=np.float64)
    n = len(y)
    if n == 0:
        return {"n": 0, "win_rate": None, "win_rate_ci95": None, "lc_win_rate": None, "lc_win_rate_ci95": None,
                "lc_slope": None}
    a, b = lc_fit(y, d)
    return {"n": n, "win_rate": float(y.mean()),
            "win_rate_ci95": bootstrap_ci(lambda i: y[i].mean(), n, samples, seed),
            "lc_win_rate": float(sigmoid(a)),
            "lc_win_rate_ci95": bootstrap_ci(lambda i: lc_win_rate(y[i], d[i]), n, samples, seed),
            "lc_slope": b}


def word_count(text):
    return len(text.split())


# --- reward-model judge --------------------------------------------------------------------------------

def rm_win_probs(rm, prompts, answers, ref_answers):
    """P(win) [n] = σ(r(prompt, answer) − r(prompt, ref_answer)) and both score arrays, from a
    rlmt.reward.RewardModel scoring the 2n pairs in one call."""
    n = len(prompts)
    scores = rm.score(list(prompts) * 2, list(answers) + list(ref_answers)).double().numpy()
    r_model, r_ref = scores[:n], scores[n:]
    return sigmoid(r_model - r_ref), r_model, r_ref


# --- LLM judge -----------------------------------------------------------------------------------------

JUDGE_SYSTEM = (
    "You are an impartial judge of AI assistants. You will see a conversation that ends with a user's "
    "message, and two candidate replies to that message, Answer A and Answer B. Decide which reply serves "
    "the user better: follows the user's instructions, is helpful, correct, complete and clearly written. "
    "Neither the length of a reply nor the order in which the replies are shown is a merit in itself. "
    "Explain your reasoning briefly, then give your verdict on the last line, exactly one of: [[A]] if "
    "Answer A is better, [[B]] if Answer B is better, [[tie]] if they are equally good."
)


def judge_messages(messages, answer_a, answer_b):
    """The chat messages asking the judge to compare two answers to a conversation (message list)."""
    convo = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)
    user = (f"<conversation>\n{convo}\n</conversation>\n\n<answer_a>\n{answer_a}\n</answer_a>\n\n"
            f"<answer_b>\n{answer_b}\n</answer_b>\n\nWhich answer is better? End with [[A]], [[B]] or [[tie]].")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_VERDICT = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.IGNORECASE)


def parse_verdict(text):
    """A judge's reply -> "A", "B", "tie" or None (unparsable).

    The last bracketed verdict counts ([[A]], [[B]], [[tie]], or MT-Bench's [[C]] for a tie): a judge
    that restates the choices before deciding ends with its own. A reply that is nothing but the letter
    or the word ("B", "tie.") is accepted too; anything else is unparsable."""
    if not isinstance(text, str):
        return None
    found = _VERDICT.findall(text)
    token = found[-1] if found else re.sub(r"[^a-z]", "", text.lower())
    return {"a": "A", "b": "B", "c": "tie", "tie": "tie"}.get(token.lower())


def game_score(verdict, model_is_a):
    """The model's score in one game: 1 win, 0.5 tie, 0 loss, None unparsable."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == model_is_a else 0.0


# --- AlpacaEval 2's ranking judge ------------------------------------------------------------------------

# AlpacaEval's ranking annotator prompt (github.com/tatsu-lab/alpaca_eval, Apache-2.0: the alpaca_eval_gpt4
# annotator, evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt), reproduced as the protocol requires: a
# judge's verdicts are only comparable under the same words. {instruction}, {output_1} and {output_2} are
# filled in one pass (an answer that contains "{output_2}" stays as written).
ALPACA_EVAL_SYSTEM = "You are a helpful assistant, that ranks models by the quality of their answers."
ALPACA_EVAL_RANKING = """I want you to create a leaderboard of different of large-language models. To do so, \
I will give you the instructions (prompts) given to the models, and the responses of two models. Please rank \
the models based on which responses would be preferred by humans. All inputs and outputs should be python \
dictionaries.

Here is the prompt:
{
    "instruction": \"\"\"{instruction}\"\"\",
}

Here are the outputs of the models:
[
    {
        "model": "model_1",
        "answer": \"\"\"{output_1}\"\"\"
    },
    {
        "model": "model_2",
        "answer": \"\"\"{output_2}\"\"\"
    }
]

Now please rank the models by the quality of their answers, so that the model with rank 1 has the best \
output. Then return a list of the model names and ranks, i.e., produce the following output:
[
    {'model': <model-name>, 'rank': <model-rank>},
    {'model': <model-name>, 'rank': <model-rank>}
]

Your response must be a valid Python dictionary and should contain nothing else because we will directly \
execute it in Python. Please provide the ranking that the majority of humans would give."""
ALPACA_EVAL_MAX_WORDS = 2000  # the paper cuts the judge's inputs to 2,000 words


def truncate_words(text, max_words):
    """`text` up to the end of its `max_words`-th whitespace-separated word (its own spacing and line
    breaks kept); unchanged when it has no more words than that."""
    for n, word in enumerate(re.finditer(r"\S+", text), 1):
        if n == max_words:
            return text[:word.end()]
    return text


def alpaca_eval_messages(instruction, output_1, output_2, max_words=ALPACA_EVAL_MAX_WORDS):
    """The chat messages of AlpacaEval's ranking judge for one game: output_1 is shown as model_1.
    The instruction and both outputs are cut to `max_words` words first."""
    values = {k: truncate_words(v, max_words) for k, v in
              (("instruction", instruction), ("output_1", output_1), ("output_2", output_2))}
    user = re.sub(r"\{(instruction|output_1|output_2)\}", lambda m: values[m.group(1)], ALPACA_EVAL_RANKING)
    return [{"role": "system", "content": ALPACA_EVAL_SYSTEM}, {"role": "user", "content": user}]


def parse_ranking(text):
    """An AlpacaEval ranking reply -> "A" when model_1 (the answer shown first) is ranked 1, "B" when it is
    ranked 2, None when unparsable. The reply is a Python list of {'model', 'rank'} dicts, read with
    ast.literal_eval (never eval) from its first "[" to its last "]", so a code fence or a sentence around
    it does no harm; model_1's rank must be 1 or 2, and model_2's, when given, the other one."""
    if not isinstance(text, str) or text.find("[") < 0 or text.rfind("]") < text.find("["):
        return None
    try:
        items = ast.literal_eval(text[text.find("["):text.rfind("]") + 1])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(items, (list, tuple)):
        return None
    ranks = {d.get("model"): d.get("rank") for d in items if isinstance(d, dict)}
    first, second = ranks.get("model_1"), ranks.get("model_2", 0)
    if type(first) is not int or first not in (1, 2) or second not in (0, 3 - first):
        return None
    return "A" if first == 1 else "B"


def model_shown_first(seed, prompt_id):
    """The one order of a prompt's AlpacaEval game, drawn from (seed, prompt id): True when the model's
    answer is model_1. A hash rather than a running generator, so a prompt keeps its order (and its
    cached reply) when prompts are added, removed or reordered."""
    return hashlib.sha256(f"{seed}\0{prompt_id}".encode()).digest()[0] % 2 == 0


# --- OpenAI-compatible chat completions, standard library only -----------------------------------------

def post_json(url, payload=None, api_key=None, timeout=60.0):
    """GET (payload None) or POST JSON -> the parsed reply. Raises urllib's HTTPError / URLError,
    TimeoutError, or ValueError for a reply that is not JSON."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read().decode())


def redact(text, api_key):
    """`text` with the API key masked: server error messages sometimes quote it."""
    return text.replace(api_key, "***") if api_key and text else text


def check_endpoint(base, api_key=None, timeout=10.0):
    """None when the endpoint `base` (…/v1) answers GET /models, else a one-line reason. Any HTTP status
    but 401 / 403 counts as reachable (some servers have no /models route)."""
    try:
        post_json(base + "/models", None, api_key, timeout)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return f"judge {base}: HTTP {e.code}, the API key was refused (it is read from OPENAI_API_KEY)"
    except (urllib.error.URLError, OSError) as e:
        return redact(f"judge {base}: unreachable ({getattr(e, 'reason', e)})", api_key)
    except ValueError:
        pass  # it answered, though not with JSON
    return None


def chat_completion(url, payload, api_key=None, timeout=120.0, retries=3, backoff=1.0):
    """POST one chat-completions request -> (the first choice's content, None) or (None, last error).

    Timeouts, connection errors, HTTP 408 / 409 / 429 / 5xx and replies without choices are retried
    `retries` times, waiting backoff × 1, 2, 4, … s (at most 30 s). Any other HTTP status (a wrong model
    name, a refused key) no retry can fix: it raises RuntimeError. A null content (a refusal) is ""."""
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2.0 ** (attempt - 1), 30.0))
        try:
            content = post_json(url, payload, api_key, timeout)["choices"][0]["message"]["content"]
            return (content if isinstance(content, str) else ""), None
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            if e.code not in (408, 409, 429) and e.code < 500:
                raise RuntimeError(redact(f"judge {url}: HTTP {e.code}: {detail}", api_key)) from None
            error = f"HTTP {e.code}: {detail}"
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    return None, redact(error, api_key)
