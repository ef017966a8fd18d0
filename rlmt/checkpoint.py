"""Checkpoints: the HF export of a (possibly sharded) model, the resumable training state, and the
per-step layout that lets a long run survive a kill at any instant.

    OUT/checkpoints/step-000050/policy/     an HF folder per exported model (policy, PPO's critic)
    OUT/checkpoints/step-000050/state/      the resumable training state (until pruned: --keep-last)
    OUT/latest -> checkpoints/step-000050   a relative symlink, switched atomically after each save

- export: the full weights gathered on rank 0 (`get_model_state_dict` with full_state_dict and CPU
  offload; every rank joins the gather), written by rlmt.model.save_pretrained.
- training state: parameters and optimizer through torch.distributed.checkpoint, each rank writing its
  own shard (never a full gather of an 8B model's optimizer state), plus the step (the data's position
  is a function of it: rlmt.batching.step_indices), the skipped-step count, the flags and every RNG
  state per rank.
- save: a step is built as `step-NNNNNN.tmp`, renamed by rank 0 once every rank is done, then `latest`
  is switched, then older steps lose their state/ (their exports stay). Every rank writes into the same
  OUT, so several nodes need a shared filesystem. find_resume reads the layout back.
- Preemption: SIGTERM only sets a flag; the trainers save at the end of the step and exit 0.
"""

import json
import os
import random
import re
import shutil
import signal
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from rlmt.dist import all_reduce_max, cleanup
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
    """Resumable state into the folder `path`. models / optimizers: dicts {name: module / optimizer}
    (policy, critic…); trainer_state: JSON-able dict (step, skipped_steps, args). Every rank must call it.
    Not atomic by itself: save() builds it inside a step folder that is renamed only when complete."""
    if _rank() == 0:
        os.makedirs(path, exist_ok=True)
    _barrier()
    dcp.save(_state(models, optimizers), checkpoint_id=os.path.join(path, "sharded"))
    torch.save(rng_state(generator), os.path.join(path, f"rng-rank{_rank()}.pt"))
    if _rank() == 0:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=1)
    _barrier()
    return path


def load_state(path, models, optimizers, generator=None):
    """Restore what save_state wrote into the given (already built and sharded) models and optimizers;
    returns the trainer_state dict. Every rank must call it."""
    meta = os.path.join(path, "trainer_state.json")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"{path}: no trainer_state.json; not a training state folder "
                                "(find_resume finds one)")
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


# --- the per-step layout --------------------------------------------------------------------------------

CHECKPOINTS, LATEST = "checkpoints", "latest"
_STEP = re.compile(r"step-(\d+)(\.replaced)?")  # a finished step, or one moved aside while it is re-saved


def step_dir(out, step):
    """OUT/checkpoints/step-NNNNNN: six digits, so that names sort as the steps do."""
    return os.path.join(out, CHECKPOINTS, f"step-{step:06d}")


def save(out, step, models, optimizers, trainer_state, exports, keep_last=1, generator=None):
    """Checkpoint `step` as OUT/checkpoints/step-NNNNNN/: one HF folder per entry of `exports`
    ({name: (model, tokenizer, dtype)}, see export) and state/ (see save_state); then point OUT/latest at
    it and prune: the newest `keep_last` steps keep their state/ (0: every step does), every step keeps
    its exports (a run's best step is picked afterwards). Returns the step folder.

    A kill at any instant leaves the previous complete checkpoint loadable (find_resume): the step is
    built under `step-NNNNNN.tmp` and renamed by rank 0 only after every rank is done; `latest` is a
    symlink made under a temporary name and os.replace'd; a state being pruned is renamed
    `state.deleting` before it is removed, so a half-deleted one never looks whole. Leftovers of a
    crashed save are removed by the next one. A collective: every rank calls it, with the same step."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every state), got {keep_last}")
    final = step_dir(out, step)
    if _rank() == 0:
        _sweep(os.path.join(out, CHECKPOINTS))
        os.makedirs(final + ".tmp")
    _barrier()
    for name, (model, tokenizer, dtype) in exports.items():
        export(model, os.path.join(final + ".tmp", name), tokenizer, dtype)
    save_state(os.path.join(final + ".tmp", "state"), models, optimizers, trainer_state, generator)
    if _rank() == 0:  # save_state ended with a barrier: every rank's shard is on disk
        _publish(out, final)
        _prune(out, step, keep_last)
    _barrier()
    return final


def _publish(out, final):
    """Rank 0: rename the finished `.tmp` into place, then switch OUT/latest to it. Re-saving a step
    (resumed at it, or a step left by a crashed save) moves the old folder aside as `.replaced` first:
    find_resume still finds it there until the new one is in place."""
    old = final + ".replaced"
    if os.path.lexists(final):
        os.rename(final, old)
    os.rename(final + ".tmp", final)
    link = os.path.join(out, LATEST)
    if os.path.lexists(link + ".tmp"):
        os.remove(link + ".tmp")
    os.symlink(os.path.relpath(final, out), link + ".tmp")
    os.replace(link + ".tmp", link)
    if os.path.lexists(old):
        _remove(old)


def _prune(out, step, keep_last):
    """Rank 0: remove the training states of all but the newest `keep_last` steps up to `step`, and those
    of steps after `step` (left by the run this one branched off when it resumed from an earlier step:
    their exports will be overwritten as this run reaches them). keep_last 0 removes nothing."""
    if keep_last == 0:
        return
    with_state = sorted(n for n, path in _steps(os.path.join(out, CHECKPOINTS))
                        if os.path.isdir(os.path.join(path, "state")))
    keep = set([n for n in with_state if n <= step][-keep_last:])
    for n in with_state:
        if n not in keep:
            _remove(os.path.join(step_dir(out, n), "state"))


def _remove(path):
    """Delete a folder by renaming it `<path>.deleting` first: a kill halfway leaves a name that nothing
    loads, and the next save's sweep finishes the job."""
    gone = path + ".deleting"
    if os.path.lexists(gone):
        shutil.rmtree(gone)
    os.rename(path, gone)
    shutil.rmtree(gone)


def _sweep(folder):
    """Rank 0, before a save: clear what a crashed save left in OUT/checkpoints. Unfinished `*.tmp` steps
    and `*.deleting` folders (also a step's state.deleting) are removed; a `.replaced` step is removed
    when its re-saved successor is in place, else renamed back (the successor never got there)."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith((".tmp", ".deleting")):
            shutil.rmtree(path)
        elif name.endswith(".replaced"):
            base = path.removesuffix(".replaced")
            if os.path.lexists(base):
                _remove(path)
            else:
                os.rename(path, base)
        elif os.path.isdir(os.path.join(path, "state.deleting")):
            shutil.rmtree(os.path.join(path, "state.deleting"))


def _steps(folder):
    """(step, path) of the finished step folders under OUT/checkpoints (no .tmp, .replaced, .deleting)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [(int(m[1]), os.path.join(folder, n)) for n in names if (m := _STEP.fullmatch(n)) and not m[2]]


def _has_state(folder):
    return os.path.isfile(os.path.join(folder, "state", "trainer_state.json"))


def last_complete(out):
    """The state folder of OUT's last complete checkpoint, or None: where OUT/latest points when that
    holds a state, else the highest step that holds one (a kill between a save's renames can leave
    latest dangling; a `.replaced` step counts, below a finished one of the same step)."""
    link = os.path.join(out, LATEST)
    if _has_state(link):
        target = os.path.normpath(os.path.join(out, os.readlink(link))) if os.path.islink(link) else link
        return os.path.join(target, "state")
    folder = os.path.join(out, CHECKPOINTS)
    found = [(int(m[1]), not m[2], os.path.join(folder, n)) for n in (os.listdir(folder) if os.path.isdir(folder)
             else []) if (m := _STEP.fullmatch(n)) and _has_state(os.path.join(folder, n))]
    return os.path.join(max(found)[2], "state") if found else None


def find_resume(spec, out):
    """--resume -> the training state folder to load, or None to start fresh.

    spec: "auto" (OUT's last complete checkpoint, None when OUT has none: a preempted job is relaunched
    with the same command; a run saved as OUT/state by the layout before this one resumes too), an OUT
    folder (its last complete checkpoint), a step folder OUT/checkpoints/step-NNNNNN (its state/), or a
    state folder (it holds trainer_state.json). Anything else: ValueError naming the path and what was
    looked for."""
    if not spec:
        return None
    if spec == "auto":
        found = last_complete(out)
        return found or (os.path.join(out, "state") if _has_state(out) else None)
    if not os.path.isdir(spec):
        raise ValueError(f"--resume {spec}: no such folder")
    if os.path.isfile(os.path.join(spec, "trainer_state.json")):
        return spec
    if _has_state(spec):
        return os.path.join(spec, "state")
    found = last_complete(spec)
    if found:
        return found
    if _STEP.fullmatch(os.path.basename(os.path.normpath(spec))):
        raise ValueError(f"--resume {spec}: no trainer_state.json in its state/: this step's training state "
                         "was pruned (--keep-last); its exports still load. Resume from a newer step, or OUT")
    raise ValueError(f"--resume {spec}: no checkpoint there: no trainer_state.json in it, in its state/, or in "
                     f"a step of its {CHECKPOINTS}/ (give --resume auto, an OUT folder, "
                     f"OUT/{CHECKPOINTS}/step-NNNNNN or its state/)")


class Preemption:
    """A scheduler's SIGTERM (preemption, a time limit) -> save at the end of the step and exit 0.

    The handler only sets a flag, so it is safe wherever the signal lands (inside a collective, a
    save); requested() shares the flag over ranks with one tiny all-reduce, so every rank stops at the
    same step even if only one got the signal. Call it once per step, on every rank. device: where the
    flag's tensor lives (the rank's GPU under NCCL)."""

    def __init__(self, device="cpu"):
        self.device, self.signalled = device, False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.signalled = True

    def requested(self):
        """True on every rank when any rank got SIGTERM (a collective)."""
        return bool(all_reduce_max(torch.tensor(float(self.signalled), device=self.device)).item())

    def stop(self, step, out):
        """After the step was saved: say so on rank 0, leave the process group, exit 0."""
        if _rank() == 0:
            print(f"SIGTERM: saved step {step} to {step_dir(out, step)}; relaunch with --resume auto", flush=True)
        cleanup()
        sys.exit(0)
