"""Run train_grpo.py and record the peak of torch's allocator in each phase, next to the memory plan's.

    python bench/phase_peaks.py OUT.json train_grpo.py --model ... --steps 1 ...   (bench/gpu.py's "memory")

The phases are bounded where the script calls into the library, without touching it: sampling is each
sampler.generate call (the rollout copy is alive then), scoring each RewardModel.score, training from the
end of rollout.on_policy to the end of optim.step (the reference pass, the forwards and backwards, the
AdamW step). OUT.json: {"measured": {phase: bytes}, "plan": {phase: bytes}, "plan_items": {...},
"card": bytes}; "measured" is empty on the CPU, where there is no allocator to read.
"""

import json
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rlmt import optim, preflight, reward, rollout, sampler  # noqa: E402

peaks = {}
cuda = torch.cuda.is_available()


def _reset():
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _record(phase):
    if cuda:
        torch.cuda.synchronize()
        peaks[phase] = max(peaks.get(phase, 0), torch.cuda.max_memory_allocated())


def _bounded(phase, fn, start=True):
    """fn, with the allocator's peak reset before it (start) and recorded into `phase` after it."""
    def wrapped(*a, **kw):
        if start:
            _reset()
        out = fn(*a, **kw)
        _record(phase)
        return out
    return wrapped


def _then_reset(fn):
    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        _reset()  # training starts here
        return out
    return wrapped


sampler.generate = _bounded("sampling", sampler.generate)
reward.RewardModel.score = _bounded("scoring", reward.RewardModel.score)
rollout.on_policy = _then_reset(rollout.on_policy)
optim.step = _bounded("training", optim.step, start=False)

out_json, script, *argv = sys.argv[1:]
sys.argv = [script, *argv]
g = runpy.run_path(script, run_name="__main__")
args = g["args"]
card = torch.cuda.get_device_properties(0).total_memory if cuda else 80 << 30
plan = preflight.memory_plan(args, "grpo", int(os.environ.get("WORLD_SIZE", 1)), card, g["checkpointing"])
with open(out_json, "w") as f:
    json.dump({"measured": peaks, "plan": {ph: plan.peak(ph) for ph in plan.phases}, "plan_items": plan.phases,
               "card": card, "checkpointing": g["checkpointing"]}, f, indent=1)
