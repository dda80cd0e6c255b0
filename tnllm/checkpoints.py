"""Checkpoint I/O, all of it: run directories, ``latest``, checkpoint folders of either arch, released
Hugging Face folders (through ``tnllm.hub``, the file format layer) and their tokenizers.

* ``load_model(path)``: (model, tokenizer) from a run directory (its ``latest``), a checkpoint folder or a
  released folder; ``resolve_checkpoint(path)`` finds the folder; ``load_pretrained`` / ``convert`` for
  released folders (``tnllm convert``).
* ``save_checkpoint`` / ``load_trainer_state``: what the trainer writes and ``--resume`` reads.

Local checkpoint folders are written atomically.

A run directory holds ``step-0000100/`` folders and a ``latest`` file naming the newest complete one.
Each folder is the released Hugging Face layout plus tnllm extras:

* ``config.json``: ``TransNormerConfig.to_dict()`` plus ``"arch"`` (``"transnormer"`` or ``"transformer"``);
* ``model.safetensors``: ``model.state_dict()`` (TNL through ``model.save_pretrained``, i.e. ``tnllm.hub``);
* the tokenizer (``tokenizer_config.json``, and ``tokenizer.json`` / ``tokenizer.model`` when it has one);
* ``trainer_state.pt``: optimizer, scheduler, RNG states, step, data position, train config;
* ``metrics.jsonl``: the run's log up to this step.

Atomic: everything is written into a hidden temp folder, flushed, then renamed to ``step-N``; only then is
``latest`` replaced (``os.replace``) and older folders pruned. A kill at any moment leaves ``latest`` naming a
complete checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .config import CONFIG_NAME, TransNormerConfig, read_json
from .hub import COPIED_FILES, TNLLM_ONLY_FILES, save_pretrained
from .model import TransNormerLLM

logger = logging.getLogger("tnllm")

LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
WEIGHTS = "model.safetensors"


def model_arch(model) -> str:
    return getattr(model, "arch", "transnormer")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:       # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(model, directory) -> None:
    """config.json (with ``arch``) + model.safetensors. TNL goes through ``model.save_pretrained``; the
    Transformer baseline is written here (tied head stored once, as ``model.embed_tokens.weight``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = model_arch(model)
    if arch == "transnormer":
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(directory / WEIGHTS), metadata={"format": "pt", "arch": arch})
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else model.config.to_dict()   # keep hub's fields
    cfg["arch"] = arch
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _read_config(directory: Path) -> dict:
    p = directory / CONFIG_NAME
    if not p.exists():
        raise FileNotFoundError(f"{str(directory)!r} is not a checkpoint folder: no config.json")
    d = read_json(p, "the model config")
    if not isinstance(d, dict):
        raise ValueError(f"{p}: must hold a JSON object (the model config), got {type(d).__name__}")
    return d


def read_model_config(ckpt) -> TransNormerConfig:
    """The model config of a checkpoint folder or run directory (its latest), as loading would build it."""
    from .config import read_config
    path = resolve_checkpoint(ckpt)
    cfg = _read_config(path)
    if cfg.get("arch", "transnormer") == "transnormer":
        return read_config(path)
    return TransNormerConfig.from_dict(cfg)


def load_model(ckpt_dir, device=None, dtype=None):
    """(model, tokenizer) from a checkpoint folder or a run directory (its ``latest``), either arch.

    A released HF folder (no ``arch`` field) loads as TransNormerLLM with its tokenizer.model/tokenizer.json.
    """
    from .tokenizer import load_tokenizer
    path = resolve_checkpoint(ckpt_dir)
    cfg = _read_config(path)
    arch = cfg.get("arch", "transnormer")
    if arch == "transnormer":
        model = TransNormerLLM.from_pretrained(path, dtype=dtype, device=device)
    elif arch == "transformer":
        from safetensors.torch import load_file
        from .baseline import TransformerLM
        model = TransformerLM(TransNormerConfig.from_dict(cfg))
        sd = load_file(str(path / WEIGHTS))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise ValueError(f"checkpoint {str(path)!r} does not match the Transformer config: missing "
                             f"{sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}")
        model = model.to(device=device, dtype=dtype)
    else:
        raise ValueError(f"checkpoint {str(path)!r}: unknown arch {arch!r} (expected 'transnormer' or 'transformer')")
    model.eval()
    tokenizer = load_tokenizer(path)
    if "arch" not in cfg:
        # a released folder: its config.json names the special ids the model was trained with
        # (pad 0, bos 1, eos 2); they win over what the tokenizer file says or lacks
        for name in ("pad", "bos", "eos"):
            tid = cfg.get(f"{name}_token_id")
            if isinstance(tid, int) and not isinstance(tid, bool):
                setattr(tokenizer, f"{name}_id", tid)
    return model, tokenizer


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder itself, or the one a run directory's ``latest`` names."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if (p / "config.json").exists():
        return p
    latest = p / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        q = p / name
        if (q / "config.json").exists():
            return q
        raise FileNotFoundError(f"{latest} names the checkpoint {name!r}, but {q} "
                                f"{'has no config.json' if q.is_dir() else 'does not exist'} (deleted or moved?); "
                                f"point {LATEST} at an existing step-* folder or pass that folder itself")
    steps = sorted(q for q in p.glob("step-*") if (q / TRAINER_STATE).exists() and (q / "config.json").exists())
    if steps:
        return steps[-1]
    raise FileNotFoundError(f"no checkpoint in {str(p)!r}: expected config.json or a '{LATEST}' file from tnllm train")


def save_checkpoint(run_dir, step: int, model, tokenizer, trainer_state: dict, metrics_file=None,
                    keep: int = 1, _before_rename=None) -> Path:
    """Write ``run_dir/step-{step}`` atomically and point ``latest`` at it; keep the newest ``keep`` folders.

    ``_before_rename`` (tests) runs after the temp folder is written and before it becomes visible.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp)
    tokenizer.save(tmp)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    if metrics_file is not None and Path(metrics_file).exists():
        shutil.copyfile(metrics_file, tmp / METRICS)
    else:
        (tmp / METRICS).write_text("")
    _fsync_tree(tmp)
    if _before_rename is not None:
        _before_rename(tmp)
    final = run_dir / name
    if final.exists():            # re-saving the same step: move the old one aside first
        old = run_dir / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    pointer = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, run_dir / LATEST)
    done = sorted(q for q in run_dir.glob("step-*") if q.is_dir())
    for q in done[:-keep] if keep > 0 else []:
        if q != final:
            shutil.rmtree(q, ignore_errors=True)
    for q in run_dir.glob(".tmp-step-*"):          # leftovers of killed saves
        if q != tmp:
            shutil.rmtree(q, ignore_errors=True)
    return final


def load_trainer_state(ckpt) -> dict:
    path = resolve_checkpoint(ckpt)
    f = path / TRAINER_STATE
    if not f.exists():
        raise FileNotFoundError(f"{str(path)!r} has no {TRAINER_STATE}: not a tnllm training checkpoint, "
                                f"cannot --resume from it")
    return torch.load(f, map_location="cpu", weights_only=False)


def load_pretrained(path, dtype=None, device=None):
    """``TransNormerLLM.from_pretrained(path, dtype, device)``: a released (or tnllm) folder, checked."""
    return TransNormerLLM.from_pretrained(path, dtype=dtype, device=device)


def _is_tnllm_folder(folder: Path, cfg_dict: dict) -> bool:
    return "arch" in cfg_dict or any((folder / n).exists() for n in TNLLM_ONLY_FILES)


def convert(src, dst, overwrite: bool = False) -> str:
    """Convert between the released Hugging Face layout and tnllm's own checkpoint folder.

    * tnllm -> released (``src`` has ``"arch"`` in config.json or a ``trainer_state.pt``): weights and config
      are rewritten as ``config.json`` + ``model.safetensors``, without ``"arch"``; tokenizer files are
      copied; trainer state and metrics are dropped.
    * released -> tnllm (anything else: ``.bin``, sharded, bf16...): weights are loaded, checked and saved as
      one ``model.safetensors``; config.json gains ``"arch": "transnormer"``; tokenizer files are copied.

    Tensors keep their stored dtype in both directions (lossless). ``dst`` must not exist or be empty unless
    ``overwrite=True``. Returns the direction, ``"tnllm->released"`` or ``"released->tnllm"``.
    """
    for name, p in (("src", src), ("dst", dst)):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"`{name}` must be a folder path (str or os.PathLike), got {type(p).__name__}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"convert: source folder {src} does not exist" if not src.exists()
                                else f"convert: source {src} is not a folder")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"convert: destination {dst} exists and is a file")
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"convert: source and destination are the same folder ({src})")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"convert: destination {dst} exists and is not empty (pass overwrite=True to "
                              f"write into it)")
    raw_cfg = _read_config(src)
    to_released = _is_tnllm_folder(src, raw_cfg)
    model = TransNormerLLM.from_pretrained(src, dtype="auto")       # checks everything before dst is touched

    if to_released:
        model.config.extra.pop("arch", None)
    else:
        model.config.extra["arch"] = "transnormer"
    save_pretrained(model, dst)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    direction = "tnllm->released" if to_released else "released->tnllm"
    logger.info("converted %s (%s) to %s", src, direction, dst)
    return direction
