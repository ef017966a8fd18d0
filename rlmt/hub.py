"""Model names and HF checkpoint folders: aliases, hub downloads, config.json and weight files.

`resolve_path` turns what a user types after `--model` (a folder, a training run's output folder, an
alias from ALIASES or a hub id) into a local folder; `read_config`, `read_weights` and `write_folder` read
and write what such a folder holds (config.json, safetensors single or sharded with an index, or an old
pytorch_model.bin). Nothing here knows the decoder: rlmt.model builds its Transformer from these files
(the parameter names are the HF names, so a state dict maps one to one to them), and rlmt.chat reads a
tokenizer from the same folder.
"""

import glob
import json
import os
import shutil
import tempfile

ALIASES = {  # the paper's models, and small ones that fit a single GPU
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "skywork-reward-llama-3.1-8b-v0.2": "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
    "skywork-reward-v2-llama-3.1-8b": "Skywork/Skywork-Reward-V2-Llama-3.1-8B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
}


def resolve_path(path_or_alias: str) -> str:
    """A local folder as is; a training run's output folder (no config.json, but OUT/latest/policy) as its
    newest export; an alias (ALIASES) or hub id downloaded with huggingface_hub (cached)."""
    if os.path.isdir(path_or_alias):
        newest = os.path.join(path_or_alias, "latest", "policy")  # rlmt.checkpoint's layout
        if not os.path.exists(os.path.join(path_or_alias, "config.json")) and os.path.isdir(newest):
            return newest
        return path_or_alias
    repo = ALIASES.get(path_or_alias.lower(), path_or_alias)
    looks_local = path_or_alias.startswith((".", "/", "~")) or os.sep * 2 in path_or_alias \
        or repo.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"model {path_or_alias!r}: no such folder, and not a hub id or one of the "
                                f"aliases {', '.join(ALIASES)}")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as e:  # offline, gated, misspelled: one line that says which
        raise FileNotFoundError(f"model {path_or_alias!r}: could not fetch {repo!r} from the hub "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_config(folder):
    """config.json of a model folder (as resolve_path gives it), as a dict."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no config.json; is this a model folder?")
    with open(path) as f:
        return json.load(f)


def read_weights(folder):
    """Yield (name, tensor) from model.safetensors, its sharded index, or pytorch_model.bin, on CPU."""
    from safetensors import safe_open
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        for name in files:
            with safe_open(os.path.join(folder, name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
    elif os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        import torch  # only for this old format: `import rlmt.hub` (and rlmt.chat) stays free of torch
        yield from torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu",
                              weights_only=True).items()
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")


def write_folder(out_dir, hf_config, state, tokenizer=None, max_shard_bytes=4 << 30):
    """Write config.json (`hf_config`, a dict), the CPU tensors of `state` as safetensors (sharded with an
    index above `max_shard_bytes`) and the tokenizer into `out_dir`. Written to a temporary folder and
    renamed, so a crash never leaves a half-written checkpoint; an existing `out_dir` is replaced only
    once the new one is whole. Returns the absolute path."""
    from safetensors.torch import save_file
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        shards, size = [{}], 0
        for k, v in state.items():
            n = v.numel() * v.element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k], size = v, size + n
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):  # swap: the old checkpoint is removed only once the new one is whole
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
