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

--serve answers OpenAI chat-completions requests (`/v1/models`, `/v1/chat/completions`, streaming,
logprobs) as vLLM's server does, so that official harnesses and eval.py's judge can query an rlmt
checkpoint; rlmt/serve.py says what it implements. No auth: it binds 127.0.0.1 unless --host says otherwise.
"""

import argparse
import sys

import torch

from rlmt import chat, data, dist, exports, sampler, serve
from rlmt.api import response_text
from rlmt.model import from_pretrained


def fail(message):
    """One line on stderr and exit status 2, before any model is loaded where possible."""
    print(f"sample.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- flags ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, hub id or alias (rlmt.hub.ALIASES)")
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
        try:
            return serve.serve(model, tokenizer, args)
        except ValueError as e:  # no context length, or the port cannot be bound
            fail(e)

    lo, hi = rank * len(rows) // world, (rank + 1) * len(rows) // world  # this rank's prompts
    samples = sampler.generate(model, prompt_ids[lo:hi], args.n, progress=dist.is_main(),
                               **sample_kwargs(args, tokenizer, range(lo, hi)))
    stops = set(chat.stop_ids(tokenizer))
    mine = [to_row(tokenizer, args.template, rows[lo + s["prompt_index"]], s, stops) for s in samples]
    merged = gather_rows(mine, world)
    if dist.is_main():
        exports.write_jsonl(args.out, merged)
        done = sum(r["finish_reason"] == "stop" for r in merged)
        print(f"wrote {len(merged)} samples ({done} stopped, {len(merged) - done} hit --max-new-tokens) "
              f"to {args.out}", file=sys.stderr)
    dist.cleanup()


if __name__ == "__main__":
    main()
