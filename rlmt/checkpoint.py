"""Checkpoints: the HF export of a (possibly sharded) model, and the resumable training state.

- export: the full weights gathered on rank 0 (`get_model_state_dict` with full_state_dict and CPU
  offload; every rank joins the gather), written by rlmt.model.save_pretrained (atomic).
- training state: parameters and optimizer through torch.distributed.checkpoint, each rank writing its
  own shard (never a full gather of an 8B model's optimizer state), plus step, data position and every
  RNG state per rank. Written to `<dir>.tmp` and renamed by rank 0 once all ranks are done.
"""

import json
import os
import random
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from rlmt.model import save_pretrained

# One process without a process group is a supported mode here, not an accident worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _distributed():
    return dist.is_available() and dist.is_initialized()


def _rank():
    return dist.get_rank() if _distributed() else 0


def _barrier():
    if _distributed():
        dist.barrier()


def export(model, out_dir, tokenizer=None, dtype=None):
    """HF folder with the full weights, cast to `dtype` (default: as they are, fp32 masters for a trained
    model); a collective: every rank must call it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        for k in state if dtype is not None else ():  # one tensor at a time: an 8B is 32 GB in fp32
            state[k] = state[k].to(dtype)
        save_pretrained(model, out_dir, tokenizer=tokenizer, state_dict=state)
    _barrier()
    return out_dir


def rng_state(generator=None):
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        s["generator"] = generator.get_state()
    return s


def set_rng_state(s, generator=None):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if generator is not None and "generator" in s:
        generator.set_state(s["generator"])


def _state(models, optimizers):
    """{name: {"model": sharded state dict, "optim": …}}, keyed by parameter names (DCP's layout)."""
    state = {}
    for name, model in models.items():
        opt = optimizers.get(name)
        msd, osd = get_state_dict(model, opt) if opt is not None else (get_model_state_dict(model), None)
        state[name] = {"model": msd, **({"optim": osd} if osd is not None else {})}
    return state


def save_state(path, models, optimizers, trainer_state, generator=None):
    """Resumable state under `path`. models / optimizers: dicts {name: module / optimizer} (policy,
    critic…); trainer_state: JSON-able dict (step, data position…). Every rank must call it."""
    tmp = path.rstrip("/") + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = _state(models, optimizers)
    dcp.save(state, checkpoint_id=os.path.join(tmp, "sharded"))
    torch.save(rng_state(generator), os.path.join(tmp, f"rng-rank{_rank()}.pt"))
    if _rank() == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=1)
    _barrier()
    if _rank() == 0:  # the swap: an old state is removed only when the new one is whole
        if os.path.exists(path):
            shutil.rmtree(path + ".old", ignore_errors=True)
            os.rename(path, path + ".old")
            os.rename(tmp, path)
            shutil.rmtree(path + ".old")
        else:
            os.rename(tmp, path)
    _barrier()


def load_state(path, models, optimizers, generator=None):
    """Restore what save_state wrote into the given (already built and sharded) models and optimizers;
    returns the trainer_state dict. Every rank must call it."""
    meta = os.path.join(path, "trainer_state.json")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"--resume {path}: no trainer_state.json; not a training state folder "
                                "(look for <out>/state)")
    state = _state(models, optimizers)
    dcp.load(state, checkpoint_id=os.path.join(path, "sharded"))
    for name, model in models.items():
        opt = optimizers.get(name)
        if opt is not None:
            set_state_dict(model, opt, model_state_dict=state[name]["model"],
                           optim_state_dict=state[name]["optim"])
        else:
            model.load_state_dict(state[name]["model"])
    rng_file = os.path.join(path, f"rng-rank{_rank()}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False), generator)
    with open(meta) as f:
        return json.load(f)
