"""Distributed checkpoints (``torch.distributed.checkpoint``): sharded save/resume on any (dp, tp) layout, and
export of a single-file safetensors checkpoint (released key names and layout) from a sharded one.

Every rank writes its own shards (``__{rank}_0.distcp``) plus one ``.metadata``; loading reshards to the
current mesh, so a run saved on 8 ranks resumes on 4 (or on one process) without conversion.

The one tensor that needs care is ``qkvu_proj``: tensor parallel permutes its rows so that each rank holds
whole heads of q, k, v and u (``tnllm.train.parallelize.FusedColwiseParallel``), and the permutation
depends on the TP degree. Checkpoints therefore hold it (and its optimizer states) in the TP-independent
shape [4, h, d] ("part, row, column"; [4, h] for a bias): TP shards dim 1, FSDP dim 2. Reshaping it to
[4h, d] gives the released layout (:func:`export_safetensors` does that).

Layout of a checkpoint folder: ``{"model": ..., "optim": ..., "meta": {"config": json, ...}, "extra": ...}``.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from tnllm.config import TransNormerConfig

__all__ = ["save", "load", "export_safetensors", "full_state_dict", "is_qkvu", "FORMAT"]

FORMAT = "tnllm-dcp-1"
_QKVU = ("token_mixer.qkvu_proj.weight", "token_mixer.qkvu_proj.bias")
_PARTS = 4


def is_qkvu(fqn: str) -> bool:
    return fqn.endswith(_QKVU)


# -- qkvu <-> TP-independent layout ----------------------------------------------------------------------
def _dims(t: DTensor) -> tuple[list[int], int | None]:
    names = t.device_mesh.mesh_dim_names
    if names is None:
        raise ValueError("tnllm.train.dcp needs meshes with dim names ('dp', 'tp'), as tnllm.train.dist builds")
    tp = [i for i, n in enumerate(names) if n == "tp"]
    return [i for i, n in enumerate(names) if n != "tp"], (tp[0] if tp else None)


def _to_canonical(t: Tensor) -> Tensor:
    """A qkvu parameter / optimizer state [4h, ...] in its training layout -> [4, h, ...] (see module doc)."""
    if not isinstance(t, DTensor):
        return t.detach().reshape(_PARTS, -1, *t.shape[1:]).clone()
    mesh = t.device_mesh
    dp_dims, tp_dim = _dims(t)
    # 1) gather over dp only: each rank then holds its tp block [q_r; k_r; v_r; u_r] (the permuted rows)
    block = [Replicate()] * mesh.ndim
    if tp_dim is not None:
        block[tp_dim] = t.placements[tp_dim]
        if block[tp_dim] != Shard(0):
            raise ValueError(f"qkvu tensor is sharded as {t.placements} on its tp dim; expected Shard(0)")
    local = t.redistribute(mesh, block).to_local()
    local = local.reshape(_PARTS, -1, *local.shape[1:])
    # 2) the same rows seen as [4, h, ...]: a contiguous Shard(1) over tp, replicated over dp ...
    canon = [Replicate()] * mesh.ndim
    if tp_dim is not None:
        canon[tp_dim] = Shard(1)
    shape = (_PARTS, t.shape[0] // _PARTS, *t.shape[1:])
    c = DTensor.from_local(local, mesh, canon, run_check=False, shape=torch.Size(shape),
                           stride=torch.empty(shape, device="meta").stride())
    # 3) ... then sharded over dp on its last dim again, so no rank keeps more than its share
    if len(shape) > 2 and dp_dims:
        out = list(canon)
        out[dp_dims[0]] = Shard(len(shape) - 1)
        c = c.redistribute(mesh, out)
    return c


def _from_canonical(c: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_to_canonical`, into the layout (placements, permutation) of ``like``."""
    if not isinstance(like, DTensor):
        full = c.full_tensor() if isinstance(c, DTensor) else c
        return full.reshape(like.shape).to(like.dtype)
    mesh = like.device_mesh
    dp_dims, tp_dim = _dims(like)
    canon = [Replicate()] * mesh.ndim
    block = [Replicate()] * mesh.ndim
    if tp_dim is not None:
        canon[tp_dim], block[tp_dim] = Shard(1), Shard(0)
    local = c.redistribute(mesh, canon).to_local()
    local = local.reshape(-1, *local.shape[2:])
    t = DTensor.from_local(local, mesh, block, run_check=False, shape=like.shape, stride=like.stride())
    return t.redistribute(mesh, like.placements).to(like.dtype)


def _map_qkvu(msd: dict, osd: dict | None, fn) -> tuple[dict, dict | None]:
    msd = {k: (fn(v, k) if is_qkvu(k) else v) for k, v in msd.items()}
    if osd is not None:
        state = {}
        for k, st in osd.get("state", {}).items():
            if is_qkvu(k):
                st = {sk: (fn(sv, k) if isinstance(sv, Tensor) and sv.dim() > 0 else sv) for sk, sv in st.items()}
            state[k] = st
        osd = {**osd, "state": state}
    return msd, osd


# -- save / load ---------------------------------------------------------------------------------------
def _config_of(model) -> TransNormerConfig | None:
    cfg = getattr(model, "config", None)
    return cfg if isinstance(cfg, TransNormerConfig) else None


def save(path, model, optimizer=None, *, extra: dict | None = None) -> Path:
    """Write a sharded checkpoint of ``model`` (and ``optimizer``) into the folder ``path`` (every rank calls it).

    ``extra``: small picklable values to restore with :func:`load` (step, data position, RNG); they must be
    the same on every rank (one copy is written; it is unpickled on load, so load only trusted folders).
    """
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"`extra` must be a dict, got {type(extra).__name__}")
    path = Path(path)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
    else:
        msd, osd = get_model_state_dict(model), None
    msd, osd = _map_qkvu(msd, osd, lambda t, k: _to_canonical(t))
    cfg = _config_of(model)
    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict()) if cfg is not None else "",
            "qkvu_layout": "[4, h, d]"}
    # non-tensor leaves are pickled by DCP (torch.save); a str / bytes leaf is not flattened like a dict
    sd = {"model": msd, "meta": json.dumps(meta)}
    if osd is not None:
        sd["optim"] = osd
    if extra:
        sd["extra"] = pickle.dumps(extra)
    dcp.save(sd, checkpoint_id=str(path), no_dist=not _dist())
    return path


def load(path, model, optimizer=None, *, strict: bool = True) -> dict:
    """Load a checkpoint written by :func:`save` into an already parallelized ``model`` (and ``optimizer``),
    resharding to the current mesh; returns the ``extra`` dict given to ``save`` ({} if none)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"no distributed checkpoint at {path} (missing .metadata)")
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
    else:
        msd, osd = get_model_state_dict(model), None
    targets_m, targets_o = msd, osd
    msd, osd = _map_qkvu(msd, osd, lambda t, k: _to_canonical(t))
    keys = _saved_keys(path)
    sd = {"model": msd}
    if osd is not None:
        if not any(k.startswith("optim.") for k in keys):
            raise ValueError(f"checkpoint {path} holds no optimizer state; pass optimizer=None to load the model only")
        sd["optim"] = osd
    has_extra = "extra" in keys
    sd["meta"] = ""
    if has_extra:
        sd["extra"] = b""
    dcp.load(sd, checkpoint_id=str(path), no_dist=not _dist())
    meta = json.loads(sd["meta"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tnllm distributed checkpoint (format {meta.get('format')!r})")
    # back into the training layout of this run's mesh
    back_m = {k: (_from_canonical(v, targets_m[k]) if is_qkvu(k) else v) for k, v in sd["model"].items()}
    back_o = None
    if osd is not None:
        back_o = {**sd["optim"], "state": {}}
        for k, st in sd["optim"]["state"].items():
            like_st = targets_o["state"][k]
            if is_qkvu(k):
                st = {sk: (_from_canonical(sv, like_st[sk]) if isinstance(sv, Tensor) and sv.dim() > 0 else sv)
                      for sk, sv in st.items()}
            back_o["state"][k] = st
    opts = StateDictOptions(strict=strict)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=back_m, optim_state_dict=back_o, options=opts)
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, back_m, options=opts)
    return pickle.loads(sd["extra"]) if has_extra else {}


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _saved_keys(path: Path) -> list[str]:
    return list(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


# -- full (released-layout) state dicts --------------------------------------------------------------------
def full_state_dict(model) -> dict[str, Tensor]:
    """The whole model as plain CPU tensors with the released keys and layout (qkvu rows q|k|v|u).

    Collective (every rank calls it); gathered one tensor at a time into rank 0's CPU memory, other ranks
    get ``{}``. Without a process group, the plain model's tensors."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {}
    for k, v in sd.items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        if is_qkvu(k):
            rows = model.get_submodule(k.rsplit(".", 1)[0])
            chunks_tp = getattr(rows, "tnllm_fused_rows", None)
            if chunks_tp is not None and chunks_tp[1] > 1:
                from .parallelize import unpermute_rows
                v = unpermute_rows(v, *chunks_tp)
        out[k] = v.detach().cpu()
    return out


def export_safetensors(ckpt_dir, out_path, dtype: torch.dtype | None = None) -> Path:
    """Read a sharded checkpoint (no process group needed) and write one ``model.safetensors`` with the
    released keys and layout, plus ``config.json`` beside it. ``out_path``: a folder or a ``.safetensors`` file.
    ``dtype`` casts floating tensors (e.g. torch.bfloat16 for release); default keeps the saved fp32."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir, out_path = Path(ckpt_dir), Path(out_path)
    if not (ckpt_dir / ".metadata").is_file():
        raise FileNotFoundError(f"no distributed checkpoint at {ckpt_dir} (missing .metadata)")
    md = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    model_sd = {k[len("model."):]: torch.empty(v.size, dtype=v.properties.dtype)
                for k, v in md.items() if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    if not model_sd:
        raise ValueError(f"{ckpt_dir} holds no model tensors")
    sd = {"model": model_sd, "meta": ""}
    dcp.load(sd, checkpoint_id=str(ckpt_dir), no_dist=True)
    meta = json.loads(sd["meta"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir} is not a tnllm distributed checkpoint (format {meta.get('format')!r})")
    tensors = {}
    for k, v in sd["model"].items():
        if is_qkvu(k):
            v = v.reshape(-1, *v.shape[2:])          # [4, h, d] -> released [4h, d]
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    # a tied lm_head is the embedding: safetensors refuses shared storage, so give it its own copy
    for k, v in list(tensors.items()):
        for k2, v2 in list(tensors.items()):
            if k2 < k and v2.data_ptr() == v.data_ptr():
                tensors[k] = v.clone()
    if out_path.suffix != ".safetensors":
        out_path.mkdir(parents=True, exist_ok=True)
        out_file = out_path / "model.safetensors"
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_file = out_path
    save_file(tensors, str(out_file), metadata={"format": "pt"})
    if meta.get("config"):
        cfg = TransNormerConfig.from_dict(json.loads(meta["config"]))
        cfg.to_json(out_file.parent / "config.json")
    return out_file
