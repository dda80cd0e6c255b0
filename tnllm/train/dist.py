"""Process-group and device-mesh setup for torchrun (or mp.spawn) jobs, plus rank-aware helpers.

The one place in tnllm that reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK); everything else is
handed a :class:`ParallelDims` and a ``DeviceMesh``. The mesh is 2-D, ``("dp", "tp")``: FSDP2 shards over
``dp`` (and averages gradients there), tensor parallel splits heads / hidden units over ``tp``. Ranks of one
``tp`` group are contiguous (rank = dp_index * tp + tp_index), so on a multi-GPU host the TP all-reduces stay
on neighbouring devices (one node's NVLink), as in torchtitan.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .loop import Trainer

__all__ = ["ParallelDims", "init_distributed", "build_mesh", "is_initialized", "rank", "world_size", "local_rank",
           "is_main", "print0", "barrier", "all_reduce_mean", "destroy", "device_type", "DistributedTrainer"]


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of data (FSDP) and tensor parallelism; ``dp * tp == world``."""
    dp: int = 1
    tp: int = 1

    def __post_init__(self):
        for name in ("dp", "tp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ParallelDims.{name} must be an int >= 1, got {v!r}")

    @property
    def world(self) -> int:
        return self.dp * self.tp

    @classmethod
    def resolve(cls, world: int, fsdp: int | None = None, tp: int | None = None) -> "ParallelDims":
        """Fill in a missing (None or -1) degree from the world size, like torchtitan's ``-1``.

        ``resolve(8, tp=2)`` -> dp 4, tp 2; ``resolve(4)`` -> dp 4, tp 1.
        """
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"`world` must be an int >= 1, got {world!r}")
        fsdp, tp = (None if v in (None, -1) else v for v in (fsdp, tp))
        for name, v in (("fsdp", fsdp), ("tp", tp)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"`{name}` must be a positive int (or -1 to infer), got {v!r}")
        if fsdp is None:
            tp = tp or 1
            if world % tp:
                raise ValueError(f"world size {world} is not divisible by tp={tp}")
            fsdp = world // tp
        elif tp is None:
            if world % fsdp:
                raise ValueError(f"world size {world} is not divisible by fsdp={fsdp}")
            tp = world // fsdp
        if fsdp * tp != world:
            raise ValueError(f"fsdp ({fsdp}) x tp ({tp}) = {fsdp * tp} must equal the world size {world} "
                             f"(torchrun --nproc-per-node x nodes)")
        return cls(dp=fsdp, tp=tp)


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int, int]:
    """Start the default process group from torchrun's environment, once; return (rank, world, local_rank).

    Backend: nccl on CUDA, gloo on CPU unless given. On CUDA, the current device becomes ``LOCAL_RANK``.
    Called without torchrun variables (a plain ``python`` run) it does nothing and returns (0, 1, 0).
    """
    if is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"`backend` must be 'nccl' or 'gloo', got {backend!r}")
    lr = local_rank()
    kw = {}
    if timeout_s is not None:
        from datetime import timedelta
        kw["timeout"] = timedelta(seconds=timeout_s)
    if backend == "nccl":
        n = torch.cuda.device_count()
        if lr >= n:
            raise ValueError(f"LOCAL_RANK {lr} has no GPU: this machine has {n} CUDA device(s); start at most {n} "
                             "processes per node (torchrun --nproc-per-node), or train on CPU (--device cpu, gloo)")
        torch.cuda.set_device(lr)
        kw["device_id"] = torch.device("cuda", lr)
    dist.init_process_group(backend=backend, **kw)
    return dist.get_rank(), dist.get_world_size(), lr


def build_mesh(dims: ParallelDims, device: str | None = None) -> DeviceMesh:
    """The 2-D ("dp", "tp") mesh over the default group; ``mesh["dp"]`` / ``mesh["tp"]`` are the sub-meshes."""
    if not isinstance(dims, ParallelDims):
        raise TypeError(f"`dims` must be a ParallelDims, got {type(dims).__name__}")
    if not is_initialized():
        raise RuntimeError("build_mesh needs an initialized process group (call init_distributed under torchrun)")
    if dims.world != dist.get_world_size():
        raise ValueError(f"dp ({dims.dp}) x tp ({dims.tp}) = {dims.world} must equal the world size "
                         f"{dist.get_world_size()}")
    return init_device_mesh(device or device_type(), (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on global rank 0 (or without a process group): the rank that logs and writes single files."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(x: float | torch.Tensor, group=None) -> float:
    """Mean of a scalar over the group (for logging a loss averaged over data-parallel ranks)."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().clone()
    if not is_initialized():
        return float(t)
    if dist.get_backend(group) == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group)


def destroy(barrier: bool = True) -> None:
    """Tear the process group down, by default once every rank got here (a rank leaving while a peer still
    talks to it can make gloo abort that peer). ``barrier=False`` after an error: the others may never come."""
    if is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


# -- the trainer on a mesh ------------------------------------------------------------------------------------
class DistributedTrainer(Trainer):
    """The one-process :class:`tnllm.train.loop.Trainer` on a (dp, tp) mesh, for ``torchrun ... tnllm train``.

    What changes, and nothing else:

    * the model is parallelized by :func:`tnllm.train.parallelize.parallelize` (TP -> AC -> per-block compile
      -> FSDP2) through the trainer's ``parallelize`` hook; ``--compile`` compiles the blocks there instead of
      ``model.compile()`` on the whole FSDP-wrapped model;
    * data: the loader keeps the rows of this rank's *dp* index (the tp ranks of one group read the same
      rows); only global rank 0 logs and writes single files; logged numbers are averaged over all ranks;
    * checkpoints: every rank writes its shards with ``torch.distributed.checkpoint`` (into ``step-N/dcp``);
      rank 0 gathers the full model and writes around it the same folder a one-process run writes (released
      ``model.safetensors``, tokenizer, ``trainer_state.pt`` without optimizer tensors), so ``tnllm generate``
      reads it unchanged. ``--resume`` takes the one-process path (weights, scheduler, data position, step),
      then loads the model and optimizer shards from ``dcp/`` onto whatever (dp, tp) this run has.

    ``fsdp``/``tp``: degrees (None or -1: inferred from the world size); ``ac``: "none" | "full" |
    "selective"; ``mp``: "fp32" | "bf16" (FSDP MixedPrecisionPolicy: param bf16, reduce fp32).
    """

    DCP_DIR = "dcp"

    def __init__(self, cfg, fsdp: int | None = None, tp: int | None = None, ac: str = "none", mp: str = "fp32",
                 log=None):
        import dataclasses
        import functools
        from .parallelize import AC_MODES, mixed_precision, parallelize
        if ac not in AC_MODES:
            raise ValueError(f"`ac` must be one of {AC_MODES}, got {ac!r}")
        mixed_precision(mp)                                # validates the name
        if cfg.compile_mode != "default":
            raise ValueError(f"compile_mode={cfg.compile_mode!r}: the distributed trainer compiles the blocks in the "
                             "default mode only (FSDP2 gathers the parameters into new memory every step, which a "
                             "CUDA graph cannot replay)")
        on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
        g_rank, world, _ = init_distributed("nccl" if on_gpu else "gloo")
        if not is_initialized():                           # e.g. `tnllm train --tp 2` without torchrun
            raise ValueError("--fsdp / --tp need a torchrun launch: torchrun --nproc-per-node N -m tnllm train "
                             "--fsdp A --tp B ... (RANK / WORLD_SIZE are not set)")
        self.dims = ParallelDims.resolve(world, fsdp, tp)
        self.mesh = build_mesh(self.dims, "cuda" if on_gpu else "cpu")
        fn = functools.partial(parallelize, world_mesh=self.mesh, ac=ac, compile=cfg.compile, mp_policy=mp)
        super().__init__(dataclasses.replace(cfg, compile=False), parallelize=fn,
                         rank=self.mesh["dp"].get_local_rank(), world_size=self.dims.dp, log=log)
        self.global_rank = g_rank
        self.is_main = g_rank == 0
        self.ac, self.mp = ac, mp

    def device(self) -> torch.device:
        dev = super().device()
        if dev.type == "cuda" and dev.index is None:      # this rank's GPU (init_distributed set it)
            return torch.device("cuda", torch.cuda.current_device())
        return dev

    def setup(self) -> None:
        super().setup()
        if self.cfg.resume:
            from .. import checkpoints as ckpt
            from . import dcp as tdcp
            tdcp.load(ckpt.resolve_checkpoint(self.out) / self.DCP_DIR, self.raw_model, self.optimizer)
        self.log(f"parallel: dp={self.dims.dp} x tp={self.dims.tp} = {self.dims.world} ranks "
                 f"({self.mesh.device_type}), ac={self.ac}, mp={self.mp}")

    def reduce_mean(self, value: float) -> float:
        return all_reduce_mean(value)

    def save(self):
        import os
        from .. import checkpoints as ckpt
        from . import dcp as tdcp
        from ..model import TransNormerLLM
        staging = self.out / f".dcp-step-{self.step:07d}"
        tdcp.save(staging, self.raw_model, self.optimizer)
        full = tdcp.full_state_dict(self.raw_model)        # collective; the tensors land on rank 0
        path = None
        if self.is_main:
            with torch.device("meta"):
                model = TransNormerLLM(self.raw_model.config)
            model.load_state_dict(full, assign=True)
            if model.config.tie_word_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
            state = self.trainer_state()
            state["optimizer"] = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
            state["sharded"] = self.DCP_DIR
            path = ckpt.save_checkpoint(self.out, self.step, model, self.tokenizer, state, self.metrics_file,
                                        keep=self.cfg.keep_checkpoints,
                                        _before_rename=lambda tmp: os.rename(staging, tmp / self.DCP_DIR))
        barrier()
        return path
