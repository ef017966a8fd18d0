"""Templates, BOS handling, stop ids and the thought / answer split, against hand-written strings."""

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
ZERO_NOTHINK = ("A conversation between User and Assistant. The user asks a question, and the assistant provides "
                "a response. The response is enclosed within <response> </response> tags, i.e., <response> "
                "response here </response>.\n\nUser: <query>Write a poem about the sea.</query>\nAssistant:")


@pytest.fixture(params=["llama", "qwen"])
def family(request, llama_tokenizer, qwen_tokenizer):
    return request.param, {"llama": llama_tokenizer, "qwen": qwen_tokenizer}[request.param]


def test_templates_tuple():
    assert chat.TEMPLATES == ("chat", "think", "zero", "zero-nothink")


def test_render_every_template(family):
    name, tok = family
    chat_text = {"llama": LLAMA_CHAT, "qwen": QWEN_CHAT}[name]
    assert chat.render(tok, MSGS, "chat") == chat_text
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
        for template in ("chat", "think"):
            with pytest.raises(ValueError, match="--template zero"):
                chat.render(tok, MSGS, template)


def test_render_unknown_template(llama_tokenizer):
    with pytest.raises(ValueError, match="chat, think, zero, zero-nothink"):
        chat.render(llama_tokenizer, MSGS, "r1")


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

@pytest.mark.parametrize("template", ["think", "chat"])
def test_split_think(template):
    s = chat.split_answer
    assert s("I plan.\n</think>\n\nThe answer.", template) == ("I plan.", "The answer.", True)
    assert s("<think>\nI plan.\n</think>\n\nThe answer.", template) == ("I plan.", "The answer.", True)
    # Two delimiters: the first by default, the last for evaluation.
    text = "a</think>b</think> c "
    assert s(text, template) == ("a", "b</think> c", True)
    assert s(text, template, last=True) == ("a</think>b", "c", True)
    # Empty answer: a format failure; non-strict scores the empty answer, strict scores [NULL].
    assert s("plan</think>  \n", template) == ("plan", "", False)
    assert s("plan</think>  \n", template, strict=True) == ("plan", "[NULL]", False)
    # An unclosed <think> fails under both templates.
    assert s("<think> still planning ", template) == ("", "<think> still planning", False)
    assert s("<think> still planning ", template, strict=True) == ("", "[NULL]", False)
    # Strict mode is the same on a good sample.
    assert s("x</think>y", template, strict=True) == ("x", "y", True)


def test_split_no_delimiter():
    s = chat.split_answer
    # think: the prompt opened <think>, so a missing </think> is a failure.
    assert s("  just an answer ", "think") == ("", "just an answer", False)
    assert s("  just an answer ", "think", strict=True) == ("", "[NULL]", False)
    # chat: thinking is optional; a plain answer is fine unless strict demands the thinking format.
    assert s("  just an answer ", "chat") == ("", "just an answer", True)
    assert s("  just an answer ", "chat", strict=True) == ("", "[NULL]", False)
    assert s("   ", "chat") == ("", "", False)


def test_split_zero():
    s = chat.split_answer
    good = " <think> plan it </think> <response> Hello there. </response>"
    assert s(good, "zero") == ("plan it", "Hello there.", True)
    assert s(good, "zero", strict=True) == ("plan it", "Hello there.", True)
    # Text between the tags and after </response> is ignored.
    assert s("<think>p</think>\nok\n<response>A</response> extra", "zero") == ("p", "A", True)
    # Missing pieces, and pieces out of order.
    for bad in ("<think> p </think> no response tags",
                "<think> p <response> A </response>",
                "p </think> <response> A </response>",
                "<response> A </response> <think> p </think>",
                "<think> p </think> <response> A"):
        assert s(bad, "zero") == ("", bad.strip(), False), bad
        assert s(bad, "zero", strict=True)[1:] == ("[NULL]", False), bad
    # Empty answer.
    assert s("<think>p</think><response> </response>", "zero") == ("p", "", False)
    assert s("<think>p</think><response> </response>", "zero", strict=True) == ("p", "[NULL]", False)
    # Two thoughts: split on the first </think> (the response after it) or the last.
    two = "<think>a</think><response>A</response><think>b</think><response>B</response>"
    assert s(two, "zero") == ("a", "A", True)
    assert s(two, "zero", last=True) == ("a</think><response>A</response><think>b", "B", True)


def test_split_zero_nothink():
    s = chat.split_answer
    assert s(" <response> Hi! </response>", "zero-nothink") == ("", "Hi!", True)
    assert s("Hi!", "zero-nothink") == ("", "Hi!", False)
    assert s("Hi!", "zero-nothink", strict=True) == ("", "[NULL]", False)
    assert s("<response>Hi!", "zero-nothink") == ("", "<response>Hi!", False)
    assert s("<response></response>", "zero-nothink") == ("", "", False)
    two = "<response>A</response><response>B</response>"
    assert s(two, "zero-nothink") == ("", "A", True)
    assert s(two, "zero-nothink", last=True) == ("", "B", True)


def test_split_unknown_template():
    with pytest.raises(ValueError, match="zero-nothink"):
        chat.split_answer("x", "plain")
