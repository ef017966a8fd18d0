"""sample.py end to end on a tiny checkpoint: the JSONL it writes, its errors, the chat, and torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rlmt import chat, data, sampler
from rlmt import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402

PROMPTS = [{"id": "a", "messages": [{"role": "user", "content": "Hi"}]},
           {"id": "b", "prompt": "Tell me a story about a cat and a dog who live in the city"},
           {"id": "c", "messages": [{"role": "user", "content": "why is the sky blue? explain short"}]}]
FIELDS = {"id", "sample", "text", "thought", "response", "format_ok", "token_ids", "num_tokens", "finish_reason"}


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return str(path)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_ignore_eos_writes_every_sample_at_full_length(llama_dir, prompts_file, tmp_path):
    out = str(tmp_path / "out" / "samples.jsonl")  # the folder is created
    sample.main(["--model", llama_dir, "--prompts", prompts_file, "--out", out, "--n", "2",
                 "--max-new-tokens", "8", "--ignore-eos", "--batch-size", "4"])
    rows = read(out)
    assert [(r["id"], r["sample"]) for r in rows] == [(p, i) for p in "abc" for i in range(2)]
    for r in rows:
        assert set(r) == FIELDS
        assert r["num_tokens"] == len(r["token_ids"]) == 8 and r["finish_reason"] == "length"
    assert not os.path.exists(out + ".tmp")


def test_greedy_rows_match_the_library(llama_dir, llama_tokenizer, prompts_file, tmp_path):
    out = str(tmp_path / "greedy.jsonl")
    sample.main(["--model", llama_dir, "--prompts", prompts_file, "--out", out, "--n", "1", "--template", "think",
                 "--temperature", "0", "--max-new-tokens", "12"])
    ids, _ = data.encode_prompts(llama_tokenizer, data.load_prompts(prompts_file), "think")
    want = sampler.generate(M.from_pretrained(llama_dir), ids, max_new_tokens=12, temperature=0,
                            stop_ids=chat.stop_ids(llama_tokenizer))
    stops = set(chat.stop_ids(llama_tokenizer))
    for r, s in zip(read(out), want):
        assert r["token_ids"] == s["tokens"] and r["finish_reason"] == s["finish_reason"]
        body = s["tokens"][:-1] if s["finish_reason"] == "stop" else s["tokens"]
        assert r["text"] == llama_tokenizer.decode(body)  # the stop token is not in the text
        assert (r["thought"], r["response"], r["format_ok"]) == chat.split_answer(r["text"], "think")


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "MISSING", "--out", "o.jsonl"], "MISSING: no such file"),
    (["--prompts", "PROMPTS", "--out", "o.jsonl", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompts", "PROMPTS", "--out", "o.jsonl", "--n", "0"], "--n must be at least 1"),
    (["--prompts", "PROMPTS"], "--prompts and --out are required"),
    (["--prompts", "PROMPTS", "--out", "o.jsonl", "--model", "/no/such/model"], "no such folder"),
])
def test_clear_one_line_errors(argv, message, llama_dir, prompts_file, tmp_path, capsys):
    argv = [a.replace("MISSING", str(tmp_path / "missing.jsonl")).replace("PROMPTS", prompts_file) for a in argv]
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", llama_dir] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().replace(str(tmp_path / "missing.jsonl"), "MISSING")
    assert err.count("\n") == 0 and err.startswith("sample.py: error: ") and message in err


def test_bad_prompt_row_names_the_line(llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b"}\n')
    with pytest.raises(SystemExit):
        sample.main(["--model", llama_dir, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert f'{bad}:2: missing field "messages"' in capsys.readouterr().err


def test_interactive_shows_thought_and_answer_apart(llama_dir, monkeypatch, capsys):
    lines = iter(["Hi there", "/reset", "", "tell me more"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    sample.main(["--model", llama_dir, "--interactive", "--template", "think", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert out.count("assistant>") == 2 and "(new conversation)" in out


def test_torchrun_two_ranks_merge_in_prompt_order(llama_dir, prompts_file, tmp_path):
    """Each rank samples its share; rank 0 writes all rows in prompt order, the very samples one process
    draws (seeds follow the prompt's index). torchrun's own flags make `--n` ambiguous before the script
    name, so a `--` separates them."""
    args = ["--model", llama_dir, "--prompts", prompts_file, "--n", "2", "--temperature", "1.0",
            "--max-new-tokens", "6", "--batch-size", "3"]
    one = str(tmp_path / "one.jsonl")
    sample.main(args + ["--out", one])
    two = str(tmp_path / "two.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--", os.path.join(ROOT, "sample.py")] + args + ["--out", two],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read(two) == read(one)
    assert torch.distributed.is_initialized() is False
