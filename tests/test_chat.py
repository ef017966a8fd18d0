"""Templates, BOS handling, stop ids and the thought / answer split, against hand-written strings."""

import os

import pytest

from rlmt import chat

MSGS = [{"role": "user", "content": "Write a poem about the sea."}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "  Name three colors.\n"}]

LLAMA_CHAT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWrite a poem about the sea.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
QWEN_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nWrite a poem about the sea.<|im_end|>\n<|im_start|>assistant\n")
LLAMA_MULTI = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nName three colors.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
QWEN_MULTI = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n  Name three colors.\n<|im_end|>\n"
              "<|im_start|>assistant\n")
# Written out by hand from the paper, not built from chat.ZERO_INSTRUCTION.
ZERO = ("A conversation between User and Assistant. Following the User's query, the Assistant first plans a "
        "response, and then provides the response. The internal reasoning process is enclosed within <think> "
        "</think> tags and the response is enclosed within <response> </response> tags, i.e., in the format "
        "<think> reasoning process here </think> <response> response here </response>.\n\n"
        "User: <query>Write a poem about the sea.</query>\nAssistant:")
# The authors' released no-think template, verbatim: "... i.e., <response> response </response>." (no "here").
ZERO_NOTHINK = ("A conversation between User and Assistant. The user asks a question, and the assistant provides "
                "a response. The response is enclosed within <response> </response> tags, i.e., <response> "
                "response </response>.\n\nUser: <query>Write a poem about the sea.</query>\nAssistant:")
REAL_TOKENIZERS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizers")


@pytest.fixture(params=["llama", "qwen"])
def family(request, llama_tokenizer, qwen_tokenizer):
    return request.param, {"llama": llama_tokenizer, "qwen": qwen_tokenizer}[request.param]


def test_templates_tuple():
    assert chat.TEMPLATES == ("chat", "chat-think", "think", "zero", "zero-nothink")
    assert set(chat.THINKING) == {"chat-think", "think", "zero"}


def test_render_every_template(family):
    name, tok = family
    chat_text = {"llama": LLAMA_CHAT, "qwen": QWEN_CHAT}[name]
    assert chat.render(tok, MSGS, "chat") == chat_text
    assert chat.render(tok, MSGS, "chat-think") == chat_text  # the model opens <think> itself
    assert chat.render(tok, MSGS, "think") == chat_text + "<think>\n"
    assert chat.render(tok, MSGS, "zero") == ZERO
    assert chat.render(tok, MSGS, "zero-nothink") == ZERO_NOTHINK


def test_render_multi_turn(family):
    name, tok = family
    assert chat.render(tok, MULTI, "chat") == {"llama": LLAMA_MULTI, "qwen": QWEN_MULTI}[name]
    # Zero prompts are single-turn: the last user turn, stripped; system and history dropped.
    assert chat.render(tok, MULTI, "zero").endswith("\n\nUser: <query>Name three colors.</query>\nAssistant:")
    assert "Be brief" not in chat.render(tok, MULTI, "zero-nothink")


def test_render_base_tokenizer(llama_base_tokenizer, qwen_base_tokenizer):
    for tok in (llama_base_tokenizer, qwen_base_tokenizer):
        assert chat.render(tok, MSGS, "zero") == ZERO
        assert chat.render(tok, MSGS, "zero-nothink") == ZERO_NOTHINK
        for template in ("chat", "chat-think", "think"):
            with pytest.raises(ValueError, match="--template zero"):
                chat.render(tok, MSGS, template)


def test_render_unknown_template(llama_tokenizer):
    with pytest.raises(ValueError, match="chat, chat-think, think, zero, zero-nothink"):
        chat.render(llama_tokenizer, MSGS, "r1")


@pytest.mark.skipif(not os.path.isdir(REAL_TOKENIZERS), reason="../shared/data/tokenizers is not beside the repo")
def test_templates_byte_for_byte_with_real_tokenizers():
    """The Zero prompts, rendered and tokenized with the real Llama 3 and Qwen vocabularies, decode to the
    authors' text exactly (one BOS for Llama, none for Qwen); the chat templates of a real chat tokenizer
    (Qwen3's) give the plain prompt for chat and chat-think, and it + "<think>\n" for think."""
    from transformers import AutoTokenizer
    llama = AutoTokenizer.from_pretrained(os.path.join(REAL_TOKENIZERS, "llama-3.2-base"))
    qwen = AutoTokenizer.from_pretrained(os.path.join(REAL_TOKENIZERS, "qwen3"))
    for tok, bos in ((llama, "<|begin_of_text|>"), (qwen, "")):
        for template, text in (("zero", ZERO), ("zero-nothink", ZERO_NOTHINK)):
            assert chat.render(tok, MSGS, template) == text
            ids = chat.encode_prompt(tok, MSGS, template)
            assert tok.decode(ids) == bos + text, template
            assert ids[len(ids) - len(tok.encode(text, add_special_tokens=False)):] == \
                tok.encode(text, add_special_tokens=False)
    plain = qwen.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert plain.endswith("<|im_start|>assistant\n")
    assert chat.render(qwen, MSGS, "chat") == chat.render(qwen, MSGS, "chat-think") == plain
    assert chat.render(qwen, MSGS, "think") == plain + "<think>\n"
    assert qwen.decode(chat.encode_prompt(qwen, MSGS, "think")) == plain + "<think>\n"


def test_encode_prompt_llama_one_bos(llama_tokenizer, llama_base_tokenizer):
    bos = llama_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    for tok, templates in ((llama_tokenizer, chat.TEMPLATES), (llama_base_tokenizer, ("zero", "zero-nothink"))):
        for template in templates:
            ids = chat.encode_prompt(tok, MSGS, template)
            assert ids[0] == bos and ids.count(bos) == 1, template
            text = chat.render(tok, MSGS, template)
            assert tok.decode(ids) == (text if text.startswith("<|begin_of_text|>") else "<|begin_of_text|>" + text)
    # The tail is the hand-written text, tokenized on its own.
    ids = chat.encode_prompt(llama_tokenizer, MSGS, "chat")
    assert ids[1:] == llama_tokenizer.encode(LLAMA_CHAT[len("<|begin_of_text|>"):], add_special_tokens=False)
    assert chat.encode_prompt(llama_base_tokenizer, MSGS, "zero")[1:] == \
        llama_base_tokenizer.encode(ZERO, add_special_tokens=False)


def test_encode_prompt_qwen_no_bos(qwen_tokenizer, qwen_base_tokenizer):
    assert qwen_tokenizer.bos_token_id is None
    for tok, templates in ((qwen_tokenizer, chat.TEMPLATES), (qwen_base_tokenizer, ("zero", "zero-nothink"))):
        for template in templates:
            ids = chat.encode_prompt(tok, MSGS, template)
            assert ids == tok.encode(chat.render(tok, MSGS, template), add_special_tokens=False)
    ids = chat.encode_prompt(qwen_tokenizer, MSGS, "think")
    assert qwen_tokenizer.decode(ids) == QWEN_CHAT + "<think>\n"


def test_stop_ids(llama_tokenizer, llama_base_tokenizer, qwen_tokenizer, qwen_base_tokenizer):
    def ids(tok, names):
        return sorted(tok.convert_tokens_to_ids(n) for n in names)
    # Each family's vocabulary holds two of the end tokens; EOS is always one of them.
    assert chat.stop_ids(llama_tokenizer) == ids(llama_tokenizer, ["<|eot_id|>", "<|end_of_text|>"])
    assert chat.stop_ids(llama_base_tokenizer) == ids(llama_base_tokenizer, ["<|eot_id|>", "<|end_of_text|>"])
    assert chat.stop_ids(qwen_tokenizer) == ids(qwen_tokenizer, ["<|im_end|>", "<|endoftext|>"])
    assert chat.stop_ids(qwen_base_tokenizer) == ids(qwen_base_tokenizer, ["<|im_end|>", "<|endoftext|>"])
    for tok in (llama_tokenizer, llama_base_tokenizer, qwen_tokenizer, qwen_base_tokenizer):
        assert tok.eos_token_id in chat.stop_ids(tok)


def test_pad_id(llama_tokenizer, qwen_tokenizer):
    assert llama_tokenizer.pad_token_id is None
    assert chat.pad_id(llama_tokenizer) == llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert chat.pad_id(qwen_tokenizer) == qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_user_turn():
    assert chat.user_turn(MSGS) == "Write a poem about the sea."
    assert chat.user_turn(MULTI) == "  Name three colors.\n"
    with pytest.raises(ValueError, match="no user message"):
        chat.user_turn([{"role": "system", "content": "x"}])


def test_load_tokenizer(tiny_dir, llama_tokenizer, tmp_path):
    tok = chat.load_tokenizer(str(tiny_dir / "tok-llama"))
    assert tok.get_vocab() == llama_tokenizer.get_vocab() and tok.chat_template == llama_tokenizer.chat_template
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        chat.load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- split_answer

def authors_answer(text, template, strict=False):
    """The reward worker's rule, written independently with str.partition: what the reward model scores."""
    if template == "chat":  # no delimiter: strict does nothing
        return text.partition("</think>")[2].strip() if "</think>" in text else text.strip()
    if template in ("chat-think", "think"):
        return text.partition("</think>")[2].strip() if "</think>" in text else "[NULL]" if strict else text.strip()
    if "<response>" not in text:
        return "[NULL]" if strict else text.strip()
    after = text.partition("<response>")[2]
    if "</response>" in after:
        return after.partition("</response>")[0].strip()
    return "[NULL]" if strict else after.strip()


TEXTS = ["I plan.\n</think>\n\nThe answer.", "<think>\nI plan.\n</think>\n\nThe answer.", "a</think>b</think> c ",
         "plan</think>  \n", "<think> still planning ", "  just an answer ", "   ", "",
         " <think> plan it </think> <response> Hello there. </response>",
         "<think>p</think>\nok\n<response>A</response> extra", "<think> p </think> no response tags",
         "<think> p <response> A </response>", "p </think> <response> A </response>",
         "<response> A </response> <think> p </think>", "<think> p </think> <response> A cut off at the limit",
         "<think>p</think><response> </response>", "<think>I will use <response> tags</think><response>B</response>",
         "<think>a</think><response>A</response><think>b</think><response>B</response>",
         " <response> Hi! </response>", "Hi!", "<response>Hi!", "<response></response>",
         "<response>A</response><response>B</response>", "<response> x </response> </think> y"]


@pytest.mark.parametrize("template", chat.TEMPLATES)
def test_split_answer_is_the_authors_rule(template):
    # The answer never depends on the stricter format flag: it is the worker's rule on every text, in both
    # modes; format_ok only ever says False more often than parseable.
    for text in TEXTS:
        for strict in (False, True):
            thought, answer, ok = chat.split_answer(text, template, strict=strict)
            assert answer == authors_answer(text, template, strict), (text, strict)
            if strict:  # the [NULL] fallback is exactly the unparseable case
                assert chat.parseable(text, template, strict) == (answer != "[NULL]"), text
            assert not ok or (chat.parseable(text, template, strict) and answer not in ("", "[NULL]")), text


@pytest.mark.parametrize("template", ["chat-think", "think"])
def test_split_think(template):
    s = chat.split_answer
    assert s("<think>\nI plan.\n</think>\n\nThe answer.", template) == ("I plan.", "The answer.", True)
    # the pre-filled prompt opened the thought; a model on the plain template must open it itself
    assert s("I plan.\n</think>\n\nThe answer.", template) == ("I plan.", "The answer.", template == "think")
    # Two delimiters: the first by default, the last for evaluation.
    text = "<think>a</think>b</think> c "
    assert s(text, template) == ("a", "b</think> c", True)
    assert s(text, template, last=True) == ("a</think>b", "c", True)
    # Empty answer after </think>: scored as "" in both modes (the authors'), never [NULL]; not well formed.
    assert s("<think>plan</think>  \n", template) == ("plan", "", False)
    assert s("<think>plan</think>  \n", template, strict=True) == ("plan", "", False)
    assert chat.parseable("<think>plan</think>  \n", template, strict=True)
    # No </think> (an unclosed thought, a response cut at the length limit, no thinking at all): the whole
    # text, or [NULL] under strict.
    for text in ("<think> still planning ", "  just an answer "):
        assert s(text, template) == ("", text.strip(), False)
        assert s(text, template, strict=True) == ("", "[NULL]", False)
        assert not chat.parseable(text, template)
    assert s("<think>x</think>y", template, strict=True) == ("x", "y", True)


def test_split_chat_has_no_delimiter():
    s = chat.split_answer
    # A plain answer is the answer, and strict changes nothing (the authors' no-think Instruct config sets
    # strict without a delimiter): `--template chat --strict` must not score every answer [NULL].
    for strict in (False, True):
        assert s("  just an answer ", "chat", strict=strict) == ("", "just an answer", True)
        assert s("x</think>y", "chat", strict=strict) == ("x", "y", True)  # a thought, when there is one
        assert s("<think> still planning ", "chat", strict=strict) == ("", "<think> still planning", False)
        assert s("   ", "chat", strict=strict) == ("", "", False)
        assert s("plan</think>", "chat", strict=strict) == ("plan", "", False)
    assert chat.parseable("anything", "chat", strict=True)


def test_split_zero():
    s = chat.split_answer
    good = " <think> plan it </think> <response> Hello there. </response>"
    assert s(good, "zero") == ("plan it", "Hello there.", True)
    assert s(good, "zero", strict=True) == ("plan it", "Hello there.", True)
    # Text between the tags and after </response> is ignored.
    assert s("<think>p</think>\nok\n<response>A</response> extra", "zero") == ("p", "A", True)
    # Cut off at the length limit (no </response>): what follows <response>; [NULL] when strict.
    cut = "<think> p </think> <response> A cut off"
    assert s(cut, "zero") == ("p", "A cut off", False)
    assert s(cut, "zero", strict=True) == ("", "[NULL]", False)
    assert chat.parseable(cut, "zero") and not chat.parseable(cut, "zero", strict=True)
    # <response> mentioned in the plan: the answer starts there (the authors' worker never reads <think>);
    # format_ok flags it, and the thought is not reported apart from an answer it overlaps.
    plan = "<think>I will use <response> tags</think><response>B</response>"
    assert s(plan, "zero") == ("", "tags</think><response>B", False)
    # No think tags, or out of order: the response is still the answer.
    for text in ("<response> A </response>", "p </think> <response> A </response>",
                 "<think> p <response> A </response>", "<response> A </response> <think> p </think>"):
        assert s(text, "zero")[1:] == ("A", False), text
        assert s(text, "zero", strict=True)[1:] == ("A", False), text
        assert chat.parseable(text, "zero", strict=True)
    # No <response> at all: the whole text (plan included), or [NULL] under strict.
    bad = "<think> p </think> no response tags"
    assert s(bad, "zero") == ("", bad, False)
    assert s(bad, "zero", strict=True) == ("", "[NULL]", False)
    # Empty answer: "" in both modes.
    assert s("<think>p</think><response> </response>", "zero") == ("p", "", False)
    assert s("<think>p</think><response> </response>", "zero", strict=True) == ("p", "", False)
    # Two responses: the first, also for evaluation (which stops at the first </response>).
    two = "<think>a</think><response>A</response><think>b</think><response>B</response>"
    assert s(two, "zero") == s(two, "zero", last=True) == ("a", "A", True)


def test_split_zero_nothink():
    s = chat.split_answer
    assert s(" <response> Hi! </response>", "zero-nothink") == ("", "Hi!", True)
    assert s("Hi!", "zero-nothink") == ("", "Hi!", False)
    assert s("Hi!", "zero-nothink", strict=True) == ("", "[NULL]", False)
    # without </response> (cut at the limit): what follows <response>; strict: [NULL]
    assert s("<response>Hi!", "zero-nothink") == ("", "Hi!", False)
    assert s("<response>Hi!", "zero-nothink", strict=True) == ("", "[NULL]", False)
    assert s("<response></response>", "zero-nothink") == ("", "", False)
    assert s("<response></response>", "zero-nothink", strict=True) == ("", "", False)
    two = "<response>A</response><response>B</response>"
    assert s(two, "zero-nothink") == s(two, "zero-nothink", last=True) == ("", "A", True)


def test_split_unknown_template():
    with pytest.raises(ValueError, match="zero-nothink"):
        chat.split_answer("x", "plain")
    with pytest.raises(ValueError, match="chat-think"):
        chat.parseable("x", "plain")
