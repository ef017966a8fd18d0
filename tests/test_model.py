"""rlmt.model against transformers (the independent reference) on tiny random checkpoints."""

import json
import os
import shutil

import pytest
import torch
import transformers

from rlmt import hub, tiny
from rlmt import model as M
from conftest import assert_close_to_scale


def _batch(vocab, padding, B=3, T=80, seed=0, avoid=()):
    """Random ids with left or right padding; T=80 passes the llama3 scaling's original context (64)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    for a in avoid:  # keep the pad id out of the content (HF finds the last token by searching for it)
        ids[ids == a] = (a + 1) % vocab
    am = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        am[0, :9], am[1, :2] = 0, 0
    elif padding == "right":
        am[0, 50:], am[2, 70:] = 0, 0
    return ids, am, (am.cumsum(-1) - 1).clamp(min=0)


def _hf(path, cls=transformers.AutoModelForCausalLM):
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(family, padding, llama_dir, qwen_dir):
    path = llama_dir if family == "llama" else qwen_dir
    ours, ref = M.from_pretrained(path), _hf(path)
    assert ours.config.num_kv_heads < ours.config.num_heads  # GQA exercised
    assert ours.config.tie_word_embeddings == (family == "qwen")
    ids, am, pos = _batch(ref.config.vocab_size, padding)
    with torch.no_grad():
        a = ours(ids, am, pos)
        b = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    assert_close_to_scale(a[valid], b[valid], 1e-5, "logits vs transformers")
    assert a.shape == (3, 80, ref.config.vocab_size)


def test_rope_scaling_is_applied(llama_dir):
    cfg = M.from_pretrained(llama_dir).config
    assert cfg.rope_scaling["rope_type"] == "llama3"
    plain = M.rope_inv_freq(M.Config(**{**cfg.__dict__, "rope_scaling": None}))
    scaled = M.rope_inv_freq(cfg)
    # head_dim 16, θ 5e5, original context 64, factor 8, low/high freq factors 1/4: wavelength 2π/f is
    # 6.3 for f[0] (< 64/4: kept), 32.4 for f[1] (between 16 and 64: ramped), > 64 for the rest (f / 8)
    assert scaled[0] == plain[0] and plain[1] / 8 < scaled[1] < plain[1]
    assert torch.allclose(scaled[2:], plain[2:] / 8)


def test_transformers_4_config_layout(llama_dir, tmp_path):
    """Hub checkpoints carry `rope_theta` and `rope_scaling` (4.x); transformers 5 writes
    `rope_parameters`. Both must give the same model."""
    old = tmp_path / "old"
    shutil.copytree(llama_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}  # the oldest spelling
    (old / "config.json").write_text(json.dumps(cfg))
    a, b = M.from_pretrained(llama_dir), M.from_pretrained(str(old))
    assert a.config == b.config
    ids, am, pos = _batch(a.config.vocab_size, "none")
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_reward_score_matches_sequence_classification(family, llama_rm_dir, qwen_rm_dir):
    path = llama_rm_dir if family == "llama" else qwen_rm_dir
    ours = M.from_pretrained(path)
    ref = _hf(path, transformers.AutoModelForSequenceClassification)
    assert ours.config.head == "score"
    ids, am, pos = _batch(ref.config.vocab_size, "right", avoid=(ref.config.pad_token_id,))
    ids[~am.bool()] = ref.config.pad_token_id
    with torch.no_grad():
        per_token = ours(ids, am, pos)
        b = ref(input_ids=ids, attention_mask=am).logits.squeeze(-1)
    last = am.sum(-1) - 1  # the last valid token, from the mask
    a = per_token[torch.arange(3), last]
    assert_close_to_scale(a, b, 1e-5, "scores vs transformers")


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_save_then_transformers_load(family, llama_dir, qwen_dir, tmp_path, llama_tokenizer):
    path = llama_dir if family == "llama" else qwen_dir
    ours = M.from_pretrained(path)
    out = M.save_pretrained(ours, str(tmp_path / "export"), tokenizer=llama_tokenizer)
    assert sorted(os.listdir(out))[:2] == ["chat_template.jinja", "config.json"]
    assert not any(".tmp-" in p for p in os.listdir(tmp_path))
    ref = _hf(out)
    ids, am, pos = _batch(ref.config.vocab_size, "left")
    with torch.no_grad():
        valid = am.bool()
        assert_close_to_scale(ours(ids, am, pos)[valid],
                              ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[valid], 1e-5)
    again = M.from_pretrained(out)
    if family == "qwen":  # tied embeddings stay tied after load, save and load
        assert again.lm_head.weight is again.model.embed_tokens.weight
    for (n, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_sharded_checkpoint_loads(llama_dir, tmp_path):
    ours = M.from_pretrained(llama_dir)
    out = M.save_pretrained(ours, str(tmp_path / "sharded"), max_shard_bytes=150_000)
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(shards) >= 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    ids, _, _ = _batch(ours.config.vocab_size, "none")
    with torch.no_grad():
        want = ours(ids)
        assert torch.equal(M.from_pretrained(out)(ids), want)
        assert_close_to_scale(_hf(out)(input_ids=ids).logits, want, 1e-5, "logits vs transformers")


def test_save_overwrites_atomically(llama_dir, tmp_path):
    ours = M.from_pretrained(llama_dir)
    out = tmp_path / "ckpt"
    M.save_pretrained(ours, str(out))
    with torch.no_grad():
        ours.model.norm.weight.add_(1.0)
    M.save_pretrained(ours, str(out))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert torch.equal(M.from_pretrained(str(out)).model.norm.weight, ours.model.norm.weight)


def test_critic_from_policy_and_saved_as_classifier(llama_dir, tmp_path):
    critic = M.from_pretrained(llama_dir, head="score")
    policy = M.from_pretrained(llama_dir)
    assert critic.config.head == "score" and critic.score.weight.shape == (1, 64)
    assert torch.equal(critic.model.layers[1].mlp.up_proj.weight, policy.model.layers[1].mlp.up_proj.weight)
    ids, am, pos = _batch(critic.config.vocab_size, "left")
    with torch.no_grad():
        values = critic(ids, am, pos)
    assert values.shape == (3, 80) and torch.isfinite(values).all()
    out = M.save_pretrained(critic, str(tmp_path / "critic"))
    ref = _hf(out, transformers.AutoModelForSequenceClassification)
    assert torch.equal(ref.score.weight, critic.score.weight)


def test_dtype_and_gradient_checkpointing(llama_dir):
    assert M.from_pretrained(llama_dir, dtype=torch.bfloat16).model.norm.weight.dtype == torch.bfloat16
    ids, am, pos = _batch(384, "left", T=24)
    grads = []
    for ckpt in (False, True):
        m = M.from_pretrained(llama_dir).train()
        m.gradient_checkpointing = ckpt
        m(ids, am, pos)[am.bool()].logsumexp(-1).sum().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_clear_errors(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        M.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.from_pretrained(str(tmp_path))
    bad = tmp_path / "gpt2"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'.*not supported.*LlamaForCausalLM"):
        M.from_pretrained(str(bad))
    cfg["architectures"], cfg["rope_parameters"] = ["LlamaForCausalLM"], {"rope_type": "yarn", "factor": 4.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        M.from_pretrained(str(bad))
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(os.path.join(llama_dir, "config.json"), empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.from_pretrained(str(empty))


def test_aliases_resolve_to_hub_ids():
    assert hub.ALIASES["llama-3.1-8b"] == "meta-llama/Llama-3.1-8B"
    assert hub.ALIASES["skywork-reward-llama-3.1-8b-v0.2"] == "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    with pytest.raises(FileNotFoundError, match="not a hub id or one of the aliases"):
        hub.resolve_path("./missing-model")


def test_from_pretrained_mistral_and_untied_qwen(tmp_path, qwen_tokenizer):
    """Mistral-style configs load as Llama; a Qwen2 with untied embeddings (the 7B) loads too."""
    path = str(tmp_path / "qwen-untied")
    ref = tiny.build_checkpoint(path, "qwen", tokenizer=qwen_tokenizer, tie_word_embeddings=False, seed=3)
    assert M.from_pretrained(path).lm_head.weight is not M.from_pretrained(path).model.embed_tokens.weight
    cfg = transformers.MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, sliding_window=None)
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(cfg).eval()
    mistral.save_pretrained(str(tmp_path / "mistral"))
    for ref, path in ((ref, path), (mistral, str(tmp_path / "mistral"))):
        ours = M.from_pretrained(path)
        ids, am, pos = _batch(ref.config.vocab_size, "left")
        with torch.no_grad():
            valid = am.bool()
            assert_close_to_scale(ours(ids, am, pos)[valid],
                                  ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[valid], 1e-5)


def test_a_run_folder_resolves_to_its_newest_export(llama_dir, tmp_path):
    """`--model runs/grpo` (sample.py, eval.py, a warm start) reads OUT/latest/policy, the newest export."""
    import shutil
    step = tmp_path / "run" / "checkpoints" / "step-000003"
    shutil.copytree(llama_dir, step / "policy")
    os.symlink(os.path.join("checkpoints", "step-000003"), tmp_path / "run" / "latest")
    assert hub.resolve_path(str(tmp_path / "run")) == str(tmp_path / "run" / "latest" / "policy")
    assert M.from_pretrained(str(tmp_path / "run")).config.vocab_size == M.from_pretrained(llama_dir).config.vocab_size
    assert hub.resolve_path(llama_dir) == llama_dir  # a model folder is itself


# ----------------------------------------------------------------------------- packed rows, right padding

def _ragged(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_packed_row_equals_each_sequence_alone(family, llama_dir, qwen_dir):
    """Sequences laid end to end in one row (Segments), positions restarting at each: every position's
    logits equal those of its sequence run alone, i.e. nothing attends across sequences. Lengths pass the
    llama3 scaling's original context (64) and include a 1-token sequence."""
    model = M.from_pretrained(llama_dir if family == "llama" else qwen_dir)
    seqs = _ragged(model.config.vocab_size, [70, 1, 33, 90, 5])
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, segments=M.Segments.of([len(s) for s in seqs]))[0]
        alone = torch.cat([model(s[None])[0] for s in seqs])
    # another attention shape per sequence: fp32 rounding of the logits' scale (measured ~1e-7)
    assert_close_to_scale(packed, alone, 1e-5, "packed vs alone")
    with pytest.raises(ValueError, match="one row"):
        model(torch.cat([ids, ids]), position_ids=torch.cat([pos, pos]), segments=M.Segments.of([ids.shape[1]] * 2))


def _stand_in_varlen(calls):
    """torch 2.13's varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa) in plain
    torch, per sequence, for the CPU: q [n, H, hd], k and v [n, K, hd] -> [n, H, hd]."""
    import torch.nn.functional as F

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, **kw):
        calls.append(dict(window_size=window_size, enable_gqa=enable_gqa, cu=cu_q.tolist(), max_q=max_q,
                          dtype=cu_q.dtype, shapes=(tuple(q.shape), tuple(k.shape)), **kw))
        assert torch.equal(cu_q, cu_k) and max_q == max_k
        cu = cu_q.tolist()
        out = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                              v[a:b].transpose(0, 1), is_causal=window_size == (-1, 0),
                                              enable_gqa=enable_gqa).transpose(0, 1)
               for a, b in zip(cu[:-1], cu[1:])]
        return torch.cat(out)
    return varlen_attn


@pytest.mark.parametrize("gqa_in_kernel", [True, False])  # torch 2.13 (enable_gqa) and a torch without it
def test_varlen_branch_with_a_stand_in_kernel(gqa_in_kernel, llama_dir, monkeypatch):
    """The GPU branch's layout code ([n, heads, hd], RoPE on it, GQA, cu_seqlens) runs on the CPU with a
    plain-torch stand-in for varlen_attn and equals the per-sequence SDPA path, forward and backward.
    The kernel itself is CUDA-only and untested here."""
    model = M.from_pretrained(llama_dir).train()
    seqs = _ragged(model.config.vocab_size, [20, 7, 41])
    ids, pos = torch.cat(seqs)[None], torch.cat([torch.arange(len(s)) for s in seqs])[None]
    seg = M.Segments.of([len(s) for s in seqs])
    results, calls = [], []
    for varlen in (False, True):
        if varlen:
            monkeypatch.setattr(M, "_varlen_attn", _stand_in_varlen(calls))
            monkeypatch.setattr(M, "_use_varlen", lambda x: True)
            monkeypatch.setattr(M, "_VARLEN_GQA", gqa_in_kernel)
            monkeypatch.setattr(M, "_VARLEN_CAUSAL", {"window_size": (-1, 0)})
        model.zero_grad(set_to_none=True)
        out = model(ids, position_ids=pos, segments=seg)
        out.float().logsumexp(-1).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == model.config.num_layers
    c = calls[0]
    assert c["window_size"] == (-1, 0) and c["cu"] == [0, 20, 27, 68] and c["max_q"] == 41 and c["dtype"] == torch.int32
    H, K, hd = model.config.num_heads, model.config.num_kv_heads, model.config.head_dim
    assert c["shapes"] == ((68, H, hd), (68, K if gqa_in_kernel else H, hd)) and c["enable_gqa"] == gqa_in_kernel
    (a, ga), (b, gb) = results
    assert_close_to_scale(b, a, 1e-5, "logits")
    for n in ga:
        assert_close_to_scale(gb[n], ga[n], 1e-5, n)


def test_right_padded_rows_take_no_mask(llama_dir, monkeypatch):
    """Right padding comes after every real token: plain causal attention (no mask, SDPA's flash kernel)
    gives the masked path's logits on every real token. Left padding still builds the mask."""
    model = M.from_pretrained(llama_dir)
    ids, am, pos = _batch(model.config.vocab_size, "right", T=24)
    with torch.no_grad():
        masked = model(ids, attn_mask=M.attention_mask_4d(am), position_ids=pos)
        built = []
        real = M.attention_mask_4d
        monkeypatch.setattr(M, "attention_mask_4d", lambda m: built.append(1) or real(m))
        plain = model(ids, am)
        assert not built  # no [B, 1, T, T] mask for right-padded rows
        model(*_batch(model.config.vocab_size, "left", T=24)[:2])
        assert built
    assert M.right_padded(am) and not M.right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert M.right_padded(torch.ones(2, 3)) and not M.right_padded(torch.tensor([[1, 0, 1]]))
    assert_close_to_scale(plain[am.bool()], masked[am.bool()], 1e-5, "right-padded, no mask vs mask")
