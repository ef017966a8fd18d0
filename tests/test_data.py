"""Data files, validation messages, left-truncation, padding and the one mask convention."""

import json
import os

import pytest
import torch

from rlmt import chat, data
from conftest import SHARED_PROMPTS

SHARED_PARQUET = os.path.join(os.path.dirname(SHARED_PROMPTS), "train.parquet")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(tmp_path, name, rows):
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}


# ----------------------------------------------------------------------------- reading

def test_read_records_jsonl_and_array(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"x": 1}\n\n   \n{"x": 2}\n')
    assert data.read_records(p) == [(f"{p}:1", {"x": 1}), (f"{p}:4", {"x": 2})]
    p = write(tmp_path, "a.json", ' \n[{"x": 1},\n {"x": 2}]\n')
    assert data.read_records(p) == [(f"{p}[0]", {"x": 1}), (f"{p}[1]", {"x": 2})]
    p = write(tmp_path, "bom.jsonl", '\ufeff{"x": 1}\n')
    assert data.read_records(p) == [(f"{p}:1", {"x": 1})]
    # Raw U+2028 / U+0085 inside a JSON string are not line breaks (the shared prompt file has them).
    p = write(tmp_path, "ls.jsonl", '{"x": "a\u2028b\x85c"}\n{"x": 2}\n')
    assert data.read_records(p) == [(f"{p}:1", {"x": "a\u2028b\x85c"}), (f"{p}:2", {"x": 2})]


@pytest.mark.parametrize("name,text,message", [
    ("bad.jsonl", '{"x": 1}\n{"x": \n', "bad.jsonl:2: invalid JSON"),
    ("list.jsonl", '{"x": 1}\n[1, 2]\n', "list.jsonl:2: expected a JSON object, got list"),
    ("str.jsonl", '"hello"\n', "str.jsonl:1: expected a JSON object, got str"),
    ("empty.jsonl", "", "empty.jsonl: empty file"),
    ("blank.jsonl", "\n  \n", "blank.jsonl: empty file"),
    ("empty.json", "[]", "empty.json: empty file"),
    ("arr.json", '[{"x": 1}, 3]', "arr.json[1]: expected a JSON object, got int"),
    ("broken.json", '[{"x": 1},\n {"x": }]', "broken.json:2: invalid JSON"),
])
def test_read_records_errors(tmp_path, name, text, message):
    with pytest.raises(data.DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data.read_records(write(tmp_path, name, text))


def test_invalid_utf8_names_file_line_and_column(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"x": 1}\n{"x": "caf\xe9"}\n')
    with pytest.raises(data.DataError) as e:
        data.read_records(str(p))
    assert str(e.value) == f"{p}:2: not valid UTF-8 (byte 0xe9 at column 11)"


def parquet(tmp_path, name, rows):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    path = str(tmp_path / name)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_read_records_parquet(tmp_path):
    rows = [{"id": "b", "prompt": [U]}, {"id": "a", "prompt": [U | {"content": "Yo"}]}]
    p = parquet(tmp_path, "p.parquet", rows)
    assert data.read_records(p) == [(f"{p}[row 0]", rows[0]), (f"{p}[row 1]", rows[1])]
    os.rename(p, str(tmp_path / "p.bin"))  # found by its PAR1 magic bytes too
    assert [r["id"] for r in data.load_prompts(str(tmp_path / "p.bin"))] == ["b", "a"]


def test_parquet_errors(tmp_path, monkeypatch):
    bad = write(tmp_path, "bad.parquet", "PAR1 this is not parquet")
    with pytest.raises(data.DataError, match="bad.parquet: not a readable Parquet file"):
        data.read_records(bad)
    p = parquet(tmp_path, "p.parquet", [{"prompt": "x"}])
    real_import = __import__

    def no_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr("builtins.__import__", no_pyarrow)
    with pytest.raises(data.DataError) as e:
        data.read_records(p)
    assert str(e.value) == f"reading {p} needs pyarrow: pip install pyarrow"


def test_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="nope.jsonl: no such file"):
        data.load_prompts(str(tmp_path / "nope.jsonl"))
    assert issubclass(data.DataError, ValueError)


# ----------------------------------------------------------------------------- prompts

def test_load_prompts_forms(tmp_path):
    p = jsonl(tmp_path, "prompts.jsonl", [
        {"id": "a", "messages": [{"role": "system", "content": "Be nice.", "name": "x"}, U]},
        {"prompt": "Tell me a story."},
        {"id": 7, "prompt": [A | {"content": "Earlier"}, U]},
    ])
    assert data.load_prompts(p) == [
        {"id": "a", "messages": [{"role": "system", "content": "Be nice."}, U]},
        {"id": "prompts-1", "messages": [{"role": "user", "content": "Tell me a story."}]},
        {"id": "7", "messages": [{"role": "assistant", "content": "Earlier"}, U]},
    ]
    arr = write(tmp_path, "p.json", json.dumps([{"prompt": "x"}, {"prompt": "y"}]))
    assert [r["id"] for r in data.load_prompts(arr)] == ["p-0", "p-1"]


@pytest.mark.parametrize("row,message", [
    ({"id": "x"}, 'prompts.jsonl:2: missing field "messages" (or "prompt", "conversation_input", "instruction")'),
    ({"messages": []}, 'prompts.jsonl:2: "messages" must be a non-empty list'),
    ({"messages": "Hi"}, 'prompts.jsonl:2: "messages" must be a non-empty list'),
    ({"prompt": 5}, 'prompts.jsonl:2: "prompt" must be a non-empty list'),
    ({"messages": [{"role": "user", "content": "  "}]}, 'prompts.jsonl:2: "messages"[0]: content must be a non-empty'),
    ({"prompt": ""}, 'prompts.jsonl:2: "prompt"[0]: content must be a non-empty'),
    ({"messages": [{"role": "user", "content": 3}]}, '"messages"[0]: content must be a non-empty string'),
    ({"messages": [U, {"role": "tool", "content": "x"}]}, "\"messages\"[1]: unknown role 'tool'"),
    ({"messages": [U, {"content": "x"}]}, '"messages"[1]: a message must be an object with "role" and "content"'),
    ({"messages": [U, A]}, 'prompts.jsonl:2: the last message of "messages" must be a user turn, not assistant'),
])
def test_load_prompts_errors(tmp_path, row, message):
    p = jsonl(tmp_path, "prompts.jsonl", [{"messages": [U]}, row])
    with pytest.raises(data.DataError) as e:
        data.load_prompts(p)
    assert str(e.value).startswith(p) and message in str(e.value), str(e.value)


def test_load_prompts_benchmark_question_files(tmp_path):
    """The official question files as they are: AlpacaEval, WildBench, Arena-Hard v2, verl Parquet; file order."""
    alpaca = write(tmp_path, "alpaca_eval.json", json.dumps(
        [{"instruction": "Q2", "dataset": "helpful_base", "output": "x", "generator": "gpt4"}, {"instruction": "Q1"}]))
    assert data.load_prompts(alpaca) == [{"id": "alpaca_eval-0", "messages": [U | {"content": "Q2"}]},
                                         {"id": "alpaca_eval-1", "messages": [U | {"content": "Q1"}]}]
    wb = jsonl(tmp_path, "wildbench.jsonl", [
        {"session_id": "s9", "conversation_input": [{"role": "user", "content": "Hi", "language": "English",
                                                     "turn_identifier": 1}, A, U], "primary_tag": "Math"},
        {"session_id": "s1", "conversation_input": [U], "checklist": ["a"]}])
    assert data.load_prompts(wb) == [{"id": "s9", "messages": [U, A, U]}, {"id": "s1", "messages": [U]}]
    arena = jsonl(tmp_path, "question.jsonl", [{"uid": "u2", "category": "hard_prompt", "prompt": "Hi"},
                                               {"uid": "u1", "category": "creative_writing", "prompt": "Hi"}])
    assert [r["id"] for r in data.load_prompts(arena)] == ["u2", "u1"]
    verl = parquet(tmp_path, "train.parquet", [
        {"data_source": "wildchat-if", "prompt": [U], "ability": "chat", "reward_model": {"style": "model"},
         "extra_info": {"index": i, "split": "train"}} for i in range(3)])
    assert data.load_prompts(verl) == [{"id": f"train-{i}", "messages": [U]} for i in range(3)]


@pytest.mark.skipif(not (os.path.exists(SHARED_PARQUET) and os.path.exists(SHARED_PROMPTS)),
                    reason="shared prompt files not present")
def test_shared_parquet_matches_jsonl():
    pytest.importorskip("pyarrow")
    assert [r["messages"] for r in data.load_prompts(SHARED_PARQUET)] == \
        [r["messages"] for r in data.load_prompts(SHARED_PROMPTS)]


def test_load_prompts_array_bad_element(tmp_path):
    p = write(tmp_path, "p.json", json.dumps([{"prompt": "ok"}, {"prompt": "ok"}, {"messages": [A]}]))
    with pytest.raises(data.DataError, match=r"p\.json\[2\]: the last message"):
        data.load_prompts(p)


@pytest.mark.skipif(not os.path.exists(SHARED_PROMPTS), reason="shared prompt file not present")
def test_shared_prompts_load(qwen_tokenizer):
    rows = data.load_prompts(SHARED_PROMPTS)
    assert len(rows) == 7544 and len({r["id"] for r in rows}) == 7544
    assert rows[0]["id"] == "wildchat-if-train-0"
    assert all(r["messages"][-1]["role"] == "user" for r in rows)
    ids, n_cut = data.encode_prompts(qwen_tokenizer, rows[:40], "chat", 256)
    full = [chat.encode_prompt(qwen_tokenizer, r["messages"], "chat") for r in rows[:40]]
    assert n_cut == sum(len(f) > 256 for f in full) and all(len(x) <= 256 for x in ids)


# ----------------------------------------------------------------------------- preferences and SFT

def test_load_preferences(tmp_path):
    p = jsonl(tmp_path, "prefs.jsonl", [
        {"id": "p", "prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "meh"}]},
        # Hub style: chosen / rejected repeat the prompt turns; the last assistant message is the completion.
        {"prompt": [U], "chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "no"}]},
    ])
    assert data.load_preferences(p) == [
        {"id": "p", "prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"},
        {"id": "prefs-1", "prompt": [U], "chosen": "Hello", "rejected": "meh"},
        {"id": "prefs-2", "prompt": [U], "chosen": "Hello", "rejected": "no"},
    ]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Q", "chosen": "a"}, 'prefs.jsonl:1: missing field "rejected"'),
    ({"chosen": "a", "rejected": "b"}, 'prefs.jsonl:1: missing field "prompt"'),
    ({"prompt": "Q", "chosen": " ", "rejected": "b"}, 'prefs.jsonl:1: "chosen" must be a non-empty string'),
    ({"prompt": "Q", "chosen": "a", "rejected": [U]}, 'the last message of "rejected" must be a assistant turn'),
    ({"prompt": [U, A], "chosen": "a", "rejected": "b"}, 'the last message of "prompt" must be a user turn'),
])
def test_load_preferences_errors(tmp_path, row, message):
    with pytest.raises(data.DataError) as e:
        data.load_preferences(jsonl(tmp_path, "prefs.jsonl", [row]))
    assert message in str(e.value), str(e.value)


def test_load_sft(tmp_path):
    p = jsonl(tmp_path, "sft.jsonl", [{"id": "s", "messages": [U, A]}, {"messages": [U, A, U, A]}])
    assert data.load_sft(p) == [{"id": "s", "messages": [U, A]}, {"id": "sft-1", "messages": [U, A, U, A]}]
    for row, message in [({"messages": [A, U]}, 'sft.jsonl:1: the last message of "messages" must be a assistant'),
                         ({"messages": [{"role": "system", "content": "s"}, A]}, 'sft.jsonl:1: "messages" has no user'),
                         ({"prompt": "x"}, 'sft.jsonl:1: missing field "messages"')]:
        with pytest.raises(data.DataError) as e:
            data.load_sft(jsonl(tmp_path, "sft.jsonl", [row]))
        assert message in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- truncation

def test_encode_prompts_left_truncation(llama_tokenizer, qwen_tokenizer):
    rows = [{"id": "short", "messages": [{"role": "user", "content": "Hi"}]},
            {"id": "long", "messages": [{"role": "user", "content": "the cat and the dog " * 30}]}]
    bos = llama_tokenizer.bos_token_id
    for tok in (llama_tokenizer, qwen_tokenizer):
        for template in ("chat", "think", "zero"):
            full = [chat.encode_prompt(tok, r["messages"], template) for r in rows]
            limit = len(full[0]) + 1  # the short prompt fits, the long one does not
            assert len(full[1]) > limit
            ids, n_cut = data.encode_prompts(tok, rows, template, limit)
            assert n_cut == 1 and ids[0] == full[0] and len(ids[1]) == limit
            if tok is llama_tokenizer:  # BOS kept at position 0, once; the end of the prompt kept
                assert ids[1][0] == bos and ids[1].count(bos) == 1 and ids[1][1:] == full[1][-(limit - 1):]
            else:
                assert ids[1] == full[1][-limit:]
            assert data.encode_prompts(tok, rows, template, None) == (full, 0)


# ----------------------------------------------------------------------------- padding and masks

def test_left_right_pad():
    ids, mask = data.left_pad([[1, 2, 3], [4], []], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = data.right_pad([[1, 2, 3], [4], []], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = data.left_pad([[], []], pad_id=0)
    assert ids.shape == mask.shape == (2, 0)


def test_position_ids_naive():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 11, generator=g) > 0.4).long()
    expected = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        seen = 0
        for t in range(mask.shape[1]):
            seen += int(mask[b, t])
            expected[b, t] = max(seen - 1, 0)
    assert torch.equal(data.position_ids(mask), expected)
    assert data.position_ids(torch.tensor([[0, 0, 1, 1, 1, 0]])).tolist() == [[0, 0, 0, 1, 2, 2]]


def test_join_pad_equals_eos():
    eos = 9  # pad == EOS: the response's own EOS must stay in the mask, the padding after it must not
    batch = data.join([[5, 6], [7]], [[1, eos], [2, 3, 4]], pad_id=eos)
    assert batch["prompt_len"] == 2
    assert batch["input_ids"].tolist() == [[5, 6, 1, eos, eos], [eos, 7, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 0, 1, 2, 3]]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "response_mask", "position_ids"))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        data.join([[1], [2]], [[3]], pad_id=0)
