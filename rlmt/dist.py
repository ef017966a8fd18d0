"""torchrun helpers: one code path for one process and for N.

    rank, world_size, device = dist.init()   # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    policy = dist.shard(policy, device, torch.bfloat16)               # fp32 masters, bf16 compute
    with dist.full_copy(policy) as rollout_model:                     # plain bf16 weights for sampling
        samples = sampler.generate(rollout_model, ...)
    dist.cleanup()

A plain `python script.py` (no WORLD_SIZE in the environment) is rank 0 of a one-process group, so a
trained model is an FSDP2 module there too and the precision, checkpoint and gradient code is the same
as under torchrun. NCCL on GPUs, gloo on the CPU.

Precision: what is trained (policy, critic) is stored in fp32, with fp32 gradients after reduction and
fp32 AdamW state; FSDP2 casts each block's gathered weights to the compute dtype (bf16 on GPUs) for the
forward and backward. At lr 1e-6 an Adam step is ~1e-6 while half a bf16 ulp of a weight of 0.02 is
~6e-5: a bf16-stored policy would not move at all. Frozen models (reference, reward model) are stored
in the compute dtype. The sampler decodes `full_copy`, a plain module in the compute dtype.
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as tdist


def init(timeout=None):
    """Join the process group torchrun describes, or a one-process group -> (rank, world_size, device).

    device: cuda:LOCAL_RANK when CUDA is available (and made current), else cpu. Without torchrun's
    environment the process is rank 0 of 1, in a group kept in memory (no port is opened).
    timeout: a datetime.timedelta, how long a collective waits for every rank (None: torch's default, 10
    minutes under NCCL, which a long rollout or rank 0's export of an 8B model exceeds)."""
    cuda = torch.cuda.is_available()
    torchrun = "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if torchrun else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        store = {} if torchrun else {"store": tdist.HashStore()}
        tdist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                 device_id=device if cuda else None, timeout=timeout, **store)
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


def shard(model, device, dtype=torch.float32, train=True):
    """Put `model` on `device` for training (train=True) or as a frozen model (train=False).

    Trained (policy, critic): parameters cast to fp32, then FSDP2 `fully_shard` on every block and on the
    root (embeddings, final norm, head), each block cast just before it is sharded, so a bf16 checkpoint
    never sits in memory whole in fp32. MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=fp32):
    forward and backward in `dtype`, gradients reduced and kept in fp32; AdamW built on these parameters
    keeps fp32 state. This runs in a one-process group too (dist.init), so one code path serves both.
    Frozen (reference): cast to `dtype`, no gradients; sharded only when there are several ranks.
    `model.compute_dtype` records `dtype` (full_copy's default).

    FSDP averages gradients over ranks: a loss already normalized by the global count must be multiplied
    by the world size before backward (gloo has no PREMUL_SUM, so set_gradient_divide_factor can't)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    model.compute_dtype = dtype
    model.inv_freq = model.inv_freq.to(device)  # the fp32 rope frequencies: moved, never cast
    stored = torch.float32 if train else dtype
    if not train:
        model.requires_grad_(False)
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return _params_to(model, device, stored)
    elif not tdist.is_initialized():
        raise RuntimeError("dist.shard(train=True) needs a process group: call rlmt.dist.init() first")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if stored != dtype \
        else MixedPrecisionPolicy()
    for block in model.model.layers:  # one block at a time: a bf16 checkpoint is never whole in fp32
        fully_shard(_params_to(block, device, stored), mp_policy=mp)
    fully_shard(_params_to(model, device, stored), mp_policy=mp)  # the root's own: embeddings, norm, head
    return model


def _params_to(module, device, dtype):
    """Move and cast `module`'s parameters in place (not the already sharded ones; tied: once) -> module."""
    for p in module.parameters():
        if not _is_dtensor(p):
            p.data = p.data.to(device=device, dtype=dtype)
    return module


def _is_dtensor(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


@contextmanager
def full_copy(model, dtype=None):
    """A plain module (no FSDP hooks, no gradients) holding `model`'s full weights in `dtype` (default:
    the compute dtype `shard` recorded, else the weights' own), for no-grad work: the rollout copy the
    sampler decodes (CUDA graphs and torch.compile apply, no collective runs inside, ranks may decode
    different numbers of steps), reference log-probs. Every rank must enter it: one all-gather per
    parameter, in `dtype`. Memory: the full model in `dtype` (an 8B in bf16: 16 GB, what unsharding held),
    released on exit. A plain model already in `dtype` is handed back as is, without a copy.
    Fresh on every call, so it always holds the weights of the last optimizer step."""
    from rlmt.model import assemble
    dtype = dtype or getattr(model, "compute_dtype", None) or next(model.parameters()).dtype
    params = dict(model.named_parameters())  # tied: one entry
    if not is_sharded(model) and all(p.dtype == dtype for p in params.values()):
        yield model
        return
    reshard(model)
    with torch.no_grad():
        state = {}
        for name, p in params.items():
            t = p.detach().to(dtype)  # a plain tensor already in `dtype` is shared: the copy is only read
            state[name] = t.full_tensor() if _is_dtensor(t) else t
        copy = assemble(model.config, model.hf_config, state, device=model.inv_freq.device)
    yield copy.eval().requires_grad_(False)


def reshard(model):
    """Free the full weights FSDP2 still holds for `model` (no-op for a plain module). FSDP2 keeps its root
    (embeddings, final norm, head: 2 GB of an 8B in bf16) unsharded after a forward, expecting the
    backward; after a no-grad forward (reference log-probs, reward scoring) nothing else frees them."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
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
