"""torchrun helpers: one code path for one process and for N.

    rank, world_size, device = dist.init()   # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    ...
    with dist.unsharded(model):               # an FSDP2 model: gather the weights once for a rollout
        samples = sampler.generate(model, ...)
    dist.cleanup()

Run as a plain `python script.py` (no WORLD_SIZE in the environment) everything here is a no-op and the
process is rank 0 of 1. NCCL on GPUs, gloo on the CPU.
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as tdist


def init():
    """Join the process group torchrun describes -> (rank, world_size, device).

    device: cuda:LOCAL_RANK when CUDA is available (and made current), else cpu. Without torchrun's
    environment: (0, 1, cuda:0 or cpu) and no process group."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                 device_id=device if cuda else None)
    return rank, world, device


def cleanup():
    """Leave the process group (if any), once every rank is here: a gloo rank that tore its group down
    while another was still in flight aborted ("terminate called without an active exception")."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def is_main():
    """True on rank 0, and in a single process."""
    return not tdist.is_initialized() or tdist.get_rank() == 0


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if tdist.is_initialized():
        tdist.barrier()


def is_sharded(model):
    """True when `model` or one of its submodules is an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def unsharded(model):
    """Hold an FSDP2 model's full parameters for a rollout: every `FSDPModule` in it is unsharded once
    (one all-gather each) and stops resharding after its forward, so the decode loop runs no collective
    and ranks may run different numbers of steps. On exit the reshard-after-forward settings are put back
    and the parameters resharded. A plain module, or a call nested in another `unsharded`, is a no-op.

    FSDP2 has no public getter for reshard_after_forward, so the fields that `set_reshard_after_forward`
    writes are saved and restored as they were."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods or getattr(model, "_rlmt_unsharded", False):
        yield model
        return
    states = [m._get_fsdp_state() for m in mods]
    for state in states:  # decide the root(s) as the first forward would, before saving the settings
        state._lazy_init()
    saved = [(s, s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups])
             for s in states]
    model._rlmt_unsharded = True
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield model
    finally:
        for state, auto, infos in saved:
            state._auto_reshard_after_forward = auto
            for g, info in zip(state._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
        for m in mods:
            m.reshard()
        model._rlmt_unsharded = False


def shard(model, device):
    """Move `model` to `device`; under torchrun, shard it with FSDP2: `fully_shard` on every block, then
    on the root (embeddings, final norm, head). On GPUs the compute runs in bf16 with gradients reduced in
    fp32; on the CPU (gloo, tests) everything stays fp32. A single process gets the plain module.
    FSDP averages gradients over ranks: a loss already normalized by the global count must be multiplied
    by the world size before backward (gloo has no PREMUL_SUM, so set_gradient_divide_factor can't)."""
    model = model.to(device)
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def all_reduce_sum(x):
    """Sum of a tensor over ranks (returned, not in place); the tensor itself in a single process."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        x = x.clone()
        tdist.all_reduce(x)
    return x


def clip_grad_norm(model, max_norm):
    """Clip a (possibly FSDP2-sharded) model's gradient norm -> the total norm before clipping, a plain
    0-d tensor: under FSDP2 clip_grad_norm_ reduces over all ranks' shards and returns a DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def all_reduce_max(x):
    """Maximum of a tensor over ranks (returned, not in place); the tensor itself in a single process.
    Used to give every rank the same number of forward/backward passes (FSDP runs collectives in each)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x
