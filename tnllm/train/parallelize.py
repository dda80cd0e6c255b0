"""Tensor parallel, activation checkpointing, compile and FSDP2 for :class:`tnllm.TransNormerLLM`.

Order, as in torchtitan's ``parallelize``: TP -> AC -> compile -> FSDP. TP first because FSDP2 shards the
DTensors TP made (2-D (dp, tp) parameters); AC before compile so each compiled block holds its checkpoint
region; compile before FSDP so FSDP's hooks stay outside the compiled graphs.

Tensor parallel (Megatron split on DTensor, ``torch.distributed.tensor.parallel``), per block:

* token mixer (GLA), split by heads: ``qkvu_proj`` [4h, d] column-wise, but its rows are ordered q|k|v|u, so a
  plain ``ColwiseParallel`` would give rank 0 all of q and half of k. :class:`FusedColwiseParallel` permutes
  the rows before sharding, so tp-rank r holds ``[q_r; k_r; v_r; u_r]`` (whole heads r*H/tp .. (r+1)*H/tp-1
  of each part) and the local output still splits with ``chunk(4)``. The DTensor's global tensor is then the
  *permuted* matrix; :func:`tnllm.train.dcp` writes the TP-size independent layout [4, h, d] instead, so a
  checkpoint reloads on any (dp, tp) and exports to the released [4h, d]. ``out_proj`` row-wise. The decay
  ``s`` (a non-persistent buffer) is sliced to the local heads; LRPE's ``theta`` [H, 1, e] becomes a DTensor
  sharded on dim 0 (its gradient lands on the right rows; DCP saves it in the released layout) whose local
  slice is used in the forward. ``num_heads`` becomes the local head count (reshapes use it).
* SRMSNorm of the attention output runs over the full width h, which TP splits: :func:`tp_srms_norm` sums the
  local squares in fp32, all-reduces the sum over the TP group (differentiable, backward is the same
  all-reduce), and divides by the full width, so each rank normalises exactly as one process does. The model
  has it built in: ``apply_tp`` sets the token mixer's ``norm_group`` (and LRPE's ``theta_sharded``).
* SGLU: ``l1``, ``l2`` column-wise, ``l3`` row-wise.
* Embedding and the tied ``lm_head`` stay whole on every tp rank, as Replicate DTensors
  (:class:`ReplicateParallel`), so that all parameters live on one mesh; their gradients come out identical on
  every tp rank because the row-wise outputs are all-reduced. The pre-norms have no parameters.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from tnllm.model import Lrpe, NormLinearAttention, TransNormerLLM, tp_srms_norm

__all__ = ["parallelize", "apply_tp", "apply_ac", "apply_compile", "apply_fsdp", "tp_srms_norm", "mixed_precision",
           "memory_per_rank", "FusedColwiseParallel", "ReplicateParallel", "HeadShard", "unpermute_rows",
           "AC_MODES", "QKVU_CHUNKS"]

QKVU_CHUNKS = 4          # q | k | v | u
AC_MODES = ("none", "full", "selective")


# -- parallel styles ---------------------------------------------------------------------------------------
def _permute_rows(t: Tensor, chunks: int, tp: int) -> Tensor:
    """Rows [c0 | c1 | ... ] (each split in tp blocks) -> [c0_0; c1_0; ...; c0_1; c1_1; ...]."""
    rows = t.shape[0]
    if rows % (chunks * tp):
        raise ValueError(f"fused projection with {rows} rows cannot hold {chunks} parts split over tp={tp}")
    return t.reshape(chunks, tp, rows // (chunks * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def unpermute_rows(t: Tensor, chunks: int, tp: int) -> Tensor:
    """Inverse of the TP row permutation: the released q|k|v|u layout back from the permuted one."""
    rows = t.shape[0]
    return t.reshape(tp, chunks, rows // (chunks * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


class FusedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a Linear whose output rows are ``chunks`` parts laid end to end (q|k|v|u).

    Each rank gets the r-th 1/tp of every part, so ``local_out.chunk(chunks, -1)`` yields the local pieces
    of each part. The parameter's global (DTensor) layout is the permuted one; ``unpermute_rows`` undoes it.
    """

    def __init__(self, chunks: int = QKVU_CHUNKS, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"`chunks` must be a positive int, got {chunks!r}")
        self.chunks = chunks

    def _partition_linear_fn(self, name, module, device_mesh):
        tp = device_mesh.size()
        for pname, param in list(module.named_parameters(recurse=False)):
            permuted = _permute_rows(param.detach(), self.chunks, tp)
            dist_param = nn.Parameter(distribute_tensor(permuted, device_mesh, [Shard(0)],
                                                        src_data_rank=self.src_data_rank),
                                      requires_grad=param.requires_grad)
            module.register_parameter(pname, dist_param)
        module.tnllm_fused_rows = (self.chunks, tp)   # read by tnllm.train.dcp to restore the released layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"FusedColwiseParallel applies to nn.Linear, got {type(module).__name__}")
        return super()._apply(module, device_mesh)


class HeadShard(ParallelStyle):
    """Shard LRPE's ``theta`` [H, 1, e] on dim 0 (heads) as a DTensor and set ``theta_sharded``: ``Lrpe.forward``
    then uses its local slice (``to_local`` is differentiable: the gradient comes back as a DTensor with the same
    placement)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, Lrpe):
            raise TypeError(f"HeadShard applies to tnllm.model.Lrpe, got {type(module).__name__}")
        if module.theta.shape[0] % device_mesh.size():
            raise ValueError(f"LRPE theta with {module.theta.shape[0]} heads cannot be split over "
                             f"tp={device_mesh.size()}")
        module.theta = nn.Parameter(distribute_tensor(module.theta.detach(), device_mesh, [Shard(0)]),
                                    requires_grad=module.theta.requires_grad)
        module.theta_sharded = True
        return module


class ReplicateParallel(ParallelStyle):
    """Parameters as Replicate DTensors over tp, plain tensors in and out (embedding, tied lm_head).

    Why not leave them plain: then every parameter is a DTensor on the same mesh, which is what
    ``clip_grad_norm_`` and foreach / fused AdamW need (they refuse to mix Tensors and DTensors, or meshes).
    ``distribute_params=False`` only adds the input/output conversion (for a module whose parameter is
    tied to one distributed already). Gradients stay Replicate: every tp rank computes the same ones.
    """

    def __init__(self, distribute_params: bool = True):
        super().__init__()
        self.distribute_params = distribute_params

    @staticmethod
    def _replicate(name, module, mesh):
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()]),
                                                          requires_grad=p.requires_grad))

    @staticmethod
    def _inputs(module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    @staticmethod
    def _outputs(module, outputs, mesh):
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        part = self._replicate if self.distribute_params else (lambda name, mod, mesh: None)
        return distribute_module(module, device_mesh, part, self._inputs, self._outputs)


# -- TP -------------------------------------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, TransNormerLLM):
        raise TypeError(f"expected a tnllm TransNormerLLM, got {type(model).__name__}")


def _check_mesh(mesh, name: str) -> None:
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        raise TypeError(f"`{name}` must be a 1-D DeviceMesh (e.g. world_mesh['{name[:2]}']), got {mesh!r}")


def apply_tp(model: TransNormerLLM, tp_mesh: DeviceMesh) -> TransNormerLLM:
    """Megatron-style tensor parallel over ``tp_mesh`` (in place; see the module docstring)."""
    _check_model(model)
    _check_mesh(tp_mesh, "tp_mesh")
    tp, r = tp_mesh.size(), tp_mesh.get_local_rank()
    cfg = model.config
    H, g = cfg.decoder_attention_heads, cfg.glu_dim
    if H % tp:
        raise ValueError(f"tensor parallel degree tp={tp} must divide the number of heads "
                         f"decoder_attention_heads={H}")
    if g % tp:
        raise ValueError(f"tensor parallel degree tp={tp} must divide the SGLU width glu_dim={g}")
    if cfg.norm_type == "rmsnorm":
        raise ValueError("tensor parallel supports norm_type 'simplermsnorm' (the released norm, no weight); "
                         "norm_type 'rmsnorm' has a weighted attention-output norm over the split width")
    if any(getattr(l.token_mixer, "tnllm_tp", None) for l in model.model.layers):
        raise ValueError("apply_tp was already applied to this model")
    group = tp_mesh.get_group()
    for layer in model.model.layers:
        tm: NormLinearAttention = layer.token_mixer
        Hl = tm.num_heads // tp
        plan = {"token_mixer.qkvu_proj": FusedColwiseParallel(QKVU_CHUNKS),
                "token_mixer.out_proj": RowwiseParallel(),
                "channel_mixer.l1": ColwiseParallel(),
                "channel_mixer.l2": ColwiseParallel(),
                "channel_mixer.l3": RowwiseParallel()}
        if tm.lrpe is not None:
            plan["token_mixer.lrpe"] = HeadShard()
        parallelize_module(layer, tp_mesh, plan)
        # the decay is a fixed, non-persistent buffer: the local heads' rates, by global head index
        tm.s = tm.s[r * Hl:(r + 1) * Hl].contiguous()
        tm.num_heads = Hl
        tm.norm_group, tm.norm_width = group, Hl * tp * tm.head_dim     # SRMSNorm across the tp ranks
        tm.tnllm_tp = (tp, r)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    parallelize_module(model, tp_mesh, {"model.embed_tokens": ReplicateParallel(),
                                        "lm_head": ReplicateParallel(distribute_params=not tied)})
    if tied:                 # the embedding got a new (DTensor) Parameter: tie the head to it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# -- activation checkpointing ---------------------------------------------------------------------------
def _sac_policy(ctx, op, *args, **kwargs):
    """Selective AC: keep the attention op's outputs (o and the final state) and the TP all-reduces
    (recomputing them would repeat communication); recompute everything else (matmuls, norms, LRPE)."""
    from torch.utils.checkpoint import CheckpointPolicy
    if op in _sac_save_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@functools.cache
def _sac_save_ops() -> frozenset:
    ops = {torch.ops.tnllm.lightning_attn_fwd.default, torch.ops.tnllm.lightning_attn_varlen_fwd.default}
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "all_reduce"):
        ops.add(c10d.all_reduce.default)
    return frozenset(ops)


def _checkpointed_forward(fwd: Callable, mode: str, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    if mode == "selective":
        ctx = functools.partial(create_selective_checkpoint_contexts, _sac_policy)
        return checkpoint(fwd, *args, use_reentrant=False, context_fn=ctx, **kwargs)
    return checkpoint(fwd, *args, use_reentrant=False, **kwargs)


def apply_ac(model: TransNormerLLM, mode: str = "full") -> TransNormerLLM:
    """Activation checkpointing per decoder block, in place.

    ``"full"`` recomputes a block's forward in backward (keeps only the block input); ``"selective"`` keeps
    the outputs of ``torch.ops.tnllm.lightning_attn_fwd`` (and TP all-reduces) and recomputes the rest.
    The block's ``forward`` is wrapped in place (no wrapper module), so state_dict keys stay the released ones.
    """
    _check_model(model)
    if mode not in AC_MODES:
        raise ValueError(f"`mode` must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return model
    for layer in model.model.layers:
        if getattr(layer, "tnllm_ac", None):
            raise ValueError(f"activation checkpointing is already applied ({layer.tnllm_ac!r})")
        layer.forward = functools.partial(_checkpointed_forward, layer.forward, mode)
        layer.tnllm_ac = mode
    return model


# -- compile ----------------------------------------------------------------------------------------------
def apply_compile(model: TransNormerLLM, fullgraph: bool = True, **kwargs) -> TransNormerLLM:
    """torch.compile each decoder block in place (blocks repeat: one compiled graph serves all of them):
    ``tnllm.compile.compile_model``, the one per-block compile."""
    from tnllm.compile import compile_model
    _check_model(model)
    return compile_model(model, fullgraph=fullgraph, **kwargs)


# -- FSDP2 -------------------------------------------------------------------------------------------------
def mixed_precision(name):
    """"fp32" -> None (no casting), "bf16" -> MixedPrecisionPolicy(param bf16, reduce fp32); a policy passes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if name is None or isinstance(name, MixedPrecisionPolicy):
        return name
    if name == "fp32":
        return None
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"mixed precision must be 'fp32', 'bf16' or a MixedPrecisionPolicy, got {name!r}")


def apply_fsdp(model: TransNormerLLM, dp_mesh: DeviceMesh, mp_policy=None,
               reshard_after_forward: bool = True) -> TransNormerLLM:
    """FSDP2 ``fully_shard`` on every decoder block, then on the root, in place.

    The root unit holds what is left: the embedding and the lm_head tied to it (one parameter, so one unit),
    and nothing else (blocks own their LRPE theta). ``mp_policy``: see :func:`mixed_precision`. Gradients
    are averaged over ``dp_mesh``, so each dp rank feeds its own slice of the batch.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    _check_model(model)
    _check_mesh(dp_mesh, "dp_mesh")
    mp = mixed_precision(mp_policy)
    kw = {"mesh": dp_mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    # entry points other than forward() that read the root's parameters (the embedding)
    for method in ("hidden_states", "prefill"):
        register_fsdp_forward_method(model, method)
    return model


def parallelize(model: TransNormerLLM, world_mesh: DeviceMesh, *, ac: str = "none", compile: bool | str = False,
                mp_policy=None, reshard_after_forward: bool = True) -> TransNormerLLM:
    """Apply TP -> AC -> compile -> FSDP as the ("dp", "tp") ``world_mesh`` asks (size-1 dims are skipped).

    ``compile``: True (inductor) or a torch.compile backend name ("aot_eager" in the tests), per block.

    Build the model identically on every rank first (same seed, or the same checkpoint): TP's
    ``distribute_tensor`` broadcasts rank 0's values, but FSDP keeps each rank's own slice of its own copy.
    Create the optimizer afterwards, over the parallelized parameters.
    """
    _check_model(model)
    if not isinstance(world_mesh, DeviceMesh) or world_mesh.mesh_dim_names != ("dp", "tp"):
        raise TypeError(f"`world_mesh` must be the 2-D ('dp', 'tp') DeviceMesh of tnllm.train.dist.build_mesh, "
                        f"got {world_mesh!r}")
    dp, tp = world_mesh["dp"], world_mesh["tp"]
    if tp.size() > 1:
        apply_tp(model, tp)
    apply_ac(model, ac)
    if compile:
        apply_compile(model, **({"backend": compile} if isinstance(compile, str) else {}))
    if dp.size() > 1 or mixed_precision(mp_policy) is not None:
        apply_fsdp(model, dp, mp_policy, reshard_after_forward)
    return model


# -- memory per rank (for docs/distributed.md) ---------------------------------------------------------------
def memory_per_rank(cfg, dp: int = 1, tp: int = 1, seq_len: int = 8192, micro_batch: int = 1, ac: str = "none",
                    loss_chunk_tokens: int | None = None) -> dict[str, float]:
    """Estimated bytes per rank for training ``cfg`` with FSDP2 over ``dp``, TP over ``tp``, AdamW, bf16
    mixed precision (fp32 master weights, grads and states, bf16 compute), ``micro_batch`` sequences of
    ``seq_len`` tokens per rank and step. Returns a dict of byte counts (keys below) and their ``total``.

    * ``params``/``grads``/``adam``: the fp32 shards: 4 / 4 / 8 bytes per parameter, divided by dp (the
      embedding, replicated over tp) or by dp * tp (everything in the blocks).
    * ``unsharded``: bf16 all-gathered parameters alive at once: the root unit (embedding = tied head, kept
      for the whole step) and two blocks (the one computing and the prefetched one), plus one block's
      gradients in bf16 and fp32 (reduce-scatter in fp32) before they are sharded.
    * ``activations``: what autograd keeps for backward, per token and layer (bf16; checked against
      ``saved_tensors_hooks`` in tests/test_distributed.py): with no AC ``12 d`` bytes that TP replicates
      (block inputs, fp32 norm inputs) plus ``(20 h + 6 g) / tp`` (q, k, v, u, attention input/output,
      SGLU); full AC keeps ``2 d`` (the block input) plus one block recomputed at a time; selective keeps
      ``2 d + 2 h / tp`` (input and attention output; ``+ 4 d`` under TP for the saved all-reduces).
    * ``logits``: bf16 logits, their fp32 log-softmax and its gradient, ``10 V`` bytes per token of the
      loss chunk (all tokens of the micro-batch unless ``loss_chunk_tokens`` is smaller).
    """
    if ac not in AC_MODES:
        raise ValueError(f"`ac` must be one of {AC_MODES}, got {ac!r}")
    for name, v in (("dp", dp), ("tp", tp), ("seq_len", seq_len), ("micro_batch", micro_batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
    d, h, g, V, L = cfg.decoder_embed_dim, cfg.hidden_dim, cfg.glu_dim, cfg.vocab_size, cfg.decoder_layers
    P = cfg.num_params()
    P_emb = V * d if cfg.tie_word_embeddings else 2 * V * d
    P_blk = (P - P_emb) / L
    shard = P_emb / dp + (P - P_emb) / (dp * tp)
    tokens = micro_batch * seq_len
    full_layer = 12 * d + (20 * h + 6 * g) / tp
    if ac == "none":
        act = L * full_layer * tokens
    elif ac == "full":
        act = (L * 2 * d + full_layer) * tokens
    else:
        act = (L * (2 * d + 2 * h / tp + (4 * d if tp > 1 else 0)) + full_layer) * tokens
    chunk = tokens if loss_chunk_tokens is None else min(tokens, loss_chunk_tokens)
    out = {"params": 4 * shard, "grads": 4 * shard, "adam": 8 * shard,
           "unsharded": 2 * P_emb + 2 * 2 * P_blk / tp + (2 + 4) * P_blk / tp,
           "activations": act, "logits": 10 * V * chunk}
    out["total"] = sum(out.values())
    return out
