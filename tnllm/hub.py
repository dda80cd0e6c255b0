"""Released-checkpoint compatibility: the Hugging Face folder layout of the published TransNormerLLM weights.

A folder holds ``config.json`` (released field names, SPEC section 1) and weights as ``model.safetensors``,
``pytorch_model.bin``, or shards listed in ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``
(``{"metadata": {...}, "weight_map": {key: file}}``). tnllm's own training checkpoints use the same layout plus
``"arch": "transnormer"`` in config.json and extra files (``trainer_state.pt``, metrics) that loading ignores.

* ``load_pretrained(path, dtype=None, device=None)``: every key, shape and dtype is checked (and a tied
  ``lm_head`` compared with the embedding) before a model exists; the model is built on the meta device and
  the checked tensors are assigned to it, so an error never leaves a half-loaded model behind.
* ``save_pretrained(model, path)``: writes the same layout back; save -> load is bit-exact.
* ``convert(src, dst)``: released folder <-> tnllm checkpoint folder (``tnllm convert SRC DST``).

Pickles are read with ``torch.load(weights_only=True)`` only. See docs/checkpoints.md.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

from .config import TransNormerConfig
from .model import TransNormerLLM, decay_rates

logger = logging.getLogger("tnllm")

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# looked for in this order (the Hugging Face order: single safetensors file first)
_WEIGHT_CANDIDATES = ((SAFE_WEIGHTS, "safetensors", False), (SAFE_INDEX, "safetensors", True),
                      (BIN_WEIGHTS, "bin", False), (BIN_INDEX, "bin", True))
_SHARD_RE = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|pytorch_model-\d{5}-of-\d{5}\.bin)$")

# files copied by ``convert`` besides config and weights
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
_COPIED_FILES = TOKENIZER_FILES + ("generation_config.json",)
_TNLLM_ONLY_FILES = ("trainer_state.pt",)

# keys the released code (or fairseq, its ancestor) may leave in a file that carry no weights
_HARMLESS_KEYS = (
    re.compile(r"^(.*\.)?decoder\.version$"),        # fairseq version stamp
    re.compile(r"^(.*\.)?_linear_attn_mask$"),       # released mask cache
    re.compile(r"^(.*\.)?lrpe\.index$"),             # released Lrpe position cache
    re.compile(r"^(.*\.)?slopes$"),                  # released ALiBi slopes (we recompute the decay)
    re.compile(r"^(.*\.)?rotary_emb\.inv_freq$"),    # rotary caches of related checkpoints
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "fp64": torch.float64}
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# config.json field -> (accepted JSON types, description); checked before TransNormerConfig sees the dict
_INT, _BOOL, _STR = "an integer", "a boolean (true/false)", "a string"
_FIELD_TYPES = {
    "vocab_size": _INT, "decoder_embed_dim": _INT, "decoder_layers": _INT, "decoder_attention_heads": _INT,
    "glu_dim": _INT, "hidden_dim": _INT, "pad_token_id": _INT, "bos_token_id": _INT, "eos_token_id": _INT,
    "block_size": _INT, "max_position_embeddings": _INT,
    "no_scale_embedding": _BOOL, "bias": _BOOL, "tie_word_embeddings": _BOOL,
    "linear_act_fun": _STR, "glu_act": _STR, "norm_type": _STR, "decay_type": _STR,
    "init_std": "a number", "linear_use_lrpe_list": "a list of 0/1 flags",
}
_NULLABLE = ("hidden_dim", "max_position_embeddings", "linear_use_lrpe_list")


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_field_types(d: dict, where: str) -> None:
    for name, want in _FIELD_TYPES.items():
        if name not in d or (d[name] is None and name in _NULLABLE):
            continue
        v = d[name]
        ok = {_INT: _is_int(v), _BOOL: isinstance(v, bool), _STR: isinstance(v, str),
              "a number": isinstance(v, (int, float)) and not isinstance(v, bool),
              "a list of 0/1 flags": isinstance(v, list) and all(_is_int(x) or isinstance(x, bool) for x in v)}[want]
        if not ok:
            raise TypeError(f"{where}: field {name!r} must be {want}, got {type(v).__name__} {v!r}")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({what}): {e}") from e


def _released_to_tnllm_fields(d: dict, where: str) -> dict:
    """Apply the released code's conventions that tnllm's config spells differently."""
    d = dict(d)
    if d.get("glu_dim") == -1:                       # released: -1 means "same as decoder_embed_dim"
        d["glu_dim"] = d.get("decoder_embed_dim", TransNormerConfig.decoder_embed_dim)
    if d.get("linear_use_lrpe_list") == []:          # released: empty list -> per-layer `linear_use_lrpe`
        flag = d.get("linear_use_lrpe")
        if not (_is_int(flag) or isinstance(flag, bool)):
            raise ValueError(f"{where}: 'linear_use_lrpe_list' is empty and there is no 'linear_use_lrpe' flag; "
                             f"give one 0/1 flag per layer (decoder_layers)")
        d["linear_use_lrpe_list"] = [int(flag)] * d.get("decoder_layers", TransNormerConfig.decoder_layers)
    return d


def read_config(path) -> TransNormerConfig:
    """The ``TransNormerConfig`` of a checkpoint folder (or of a config.json file), with clear errors.

    Unknown fields (``architectures``, ``auto_map``, ``torch_dtype``, ...) are kept in ``config.extra``.
    """
    path = Path(path)
    cfg_path = path / CONFIG_NAME if path.is_dir() else path
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: a checkpoint folder needs config.json "
                                f"(the released field names, SPEC section 1)")
    d = _read_json(cfg_path, "the model config")
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: must hold a JSON object, got {type(d).__name__}")
    arch = d.get("arch")
    if arch is not None and arch != "transnormer":
        hint = (" It is a baseline Transformer checkpoint of tnllm's trainer: load it with "
                "tnllm.train.checkpoint.load_model(path).") if arch == "transformer" else ""
        raise ValueError(f"{cfg_path}: 'arch' is {arch!r}, not 'transnormer'; from_pretrained loads "
                         f"TransNormerLLM checkpoints only.{hint}")
    _check_field_types(d, str(cfg_path))
    d = _released_to_tnllm_fields(d, str(cfg_path))
    try:
        return TransNormerConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{cfg_path}: {e}") from e


# ------------------------------------------------------------------------------------------------
# reading weight files
# ------------------------------------------------------------------------------------------------
def _find_weights(folder: Path) -> tuple[str, dict[str, Path] | None, list[Path]]:
    """(format, weight_map or None, files) of the first weight layout present in ``folder``."""
    present = [(name, fmt, sharded) for name, fmt, sharded in _WEIGHT_CANDIDATES if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(f"no weights in {folder}: looked for " +
                                ", ".join(name for name, _, _ in _WEIGHT_CANDIDATES))
    name, fmt, sharded = present[0]
    if len(present) > 1:
        logger.info("%s: using %s (also present, not read: %s)", folder, name, ", ".join(p[0] for p in present[1:]))
    if not sharded:
        return fmt, None, [folder / name]
    index_path = folder / name
    index = _read_json(index_path, "a shard index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in wmap.items()):
        raise ValueError(f"{index_path}: must hold {{\"weight_map\": {{key: shard file name}}}} with at least one key")
    resolved: dict[str, Path] = {}
    for key, fname in wmap.items():
        if Path(fname).name != fname or fname in ("", ".", ".."):
            raise ValueError(f"{index_path}: shard {fname!r} of key {key!r} must be a file name in the same folder")
        resolved[key] = folder / fname
    files = sorted(set(resolved.values()))
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{index_path} lists shard {f.name}, which is not in {folder}")
    return fmt, resolved, files


def _torch_load(file: Path) -> dict:
    """``torch.load`` with ``weights_only=True`` (never unpickles arbitrary objects), memory-mapped when the
    file is in the zip format."""
    import pickle
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:           # legacy (non-zip) format: no mmap
            if "mmap" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # keep torch's reason (e.g. "unsupported GLOBAL os.system"), drop its advice to disable weights_only
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        raise ValueError(f"{file}: refused to load: the pickle holds objects other than tensors, and tnllm "
                         f"reads .bin files with torch.load(weights_only=True) only ({why})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{file}: expected a state dict {{key: tensor}}, got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return obj


class _WeightFile:
    """Keys, shapes and dtypes of one file, readable before any tensor is (safetensors: from the header)."""

    def __init__(self, file: Path, fmt: str):
        self.file, self.fmt = file, fmt
        if fmt == "safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    self.meta = {}
                    for k in f.keys():
                        sl = f.get_slice(k)
                        if hasattr(sl, "get_dtype"):
                            dt = sl.get_dtype()
                            dt = _SAFE_DTYPES.get(dt, dt)
                        else:                # safetensors < 0.4: no header dtype, read the tensor
                            dt = f.get_tensor(k).dtype
                        self.meta[k] = (tuple(sl.get_shape()), dt)
            except Exception as e:  # safetensors raises its own error types for a corrupt header
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
            self._tensors = None
        else:
            self._tensors = _torch_load(file)
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def get(self, key: str) -> Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        from safetensors import safe_open
        with safe_open(str(self.file), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def get_many(self, keys) -> dict[str, Tensor]:
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        from safetensors import safe_open
        with safe_open(str(self.file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}


def _collect(folder: Path) -> tuple[dict[str, tuple[tuple, object]], dict[str, _WeightFile]]:
    """(key -> (shape, dtype), key -> its file) over all files of the folder's weight layout."""
    fmt, wmap, files = _find_weights(folder)
    wfiles = {f: _WeightFile(f, fmt) for f in files}
    meta, where = {}, {}
    if wmap is None:
        wf = wfiles[files[0]]
        return dict(wf.meta), {k: wf for k in wf.meta}
    index_name = SAFE_INDEX if fmt == "safetensors" else BIN_INDEX
    for key, f in wmap.items():
        wf = wfiles[f]
        if key not in wf.meta:
            raise ValueError(f"{folder / index_name} maps {key!r} to {f.name}, which has no such tensor")
        meta[key], where[key] = wf.meta[key], wf
    for f, wf in wfiles.items():
        unlisted = sorted(set(wf.meta) - set(wmap))
        if unlisted:
            raise ValueError(f"{f} holds tensors that {index_name} does not list: {unlisted[:8]}"
                             f"{' ...' if len(unlisted) > 8 else ''}; the index and the shards disagree")
    return meta, where


# ------------------------------------------------------------------------------------------------
# checks against the config
# ------------------------------------------------------------------------------------------------
def _shape_formula(key: str) -> str:
    rules = (("embed_tokens.weight", "[vocab_size, decoder_embed_dim]"),
             ("lm_head.weight", "[vocab_size, decoder_embed_dim]"),
             ("qkvu_proj.weight", "[4 * hidden_dim, decoder_embed_dim]"), ("qkvu_proj.bias", "[4 * hidden_dim]"),
             ("out_proj.weight", "[decoder_embed_dim, hidden_dim]"), ("out_proj.bias", "[decoder_embed_dim]"),
             ("lrpe.theta", "[decoder_attention_heads, 1, hidden_dim / decoder_attention_heads]"),
             ("l1.weight", "[glu_dim, decoder_embed_dim]"), ("l2.weight", "[glu_dim, decoder_embed_dim]"),
             ("l1.bias", "[glu_dim]"), ("l2.bias", "[glu_dim]"),
             ("l3.weight", "[decoder_embed_dim, glu_dim]"), ("l3.bias", "[decoder_embed_dim]"))
    for suffix, formula in rules:
        if key.endswith(suffix):
            return formula + " = "
    return ""


def _check_keys(meta: dict, expected: dict, cfg: TransNormerConfig, folder: Path) -> list[str]:
    """Raise on unknown/missing keys, wrong shapes or non-float dtypes; return the ignored harmless keys."""
    tied = cfg.tie_word_embeddings
    ignored = sorted(k for k in meta if k not in expected and any(p.match(k) for p in _HARMLESS_KEYS))
    unknown = sorted(k for k in meta if k not in expected and k not in ignored)
    if unknown:
        hints = []
        for k in unknown[:4]:
            if "model." + k in expected:
                hints.append(f"{k!r} looks like {'model.' + k!r} (the released keys start with 'model.')")
        if any(".lrpe." in k for k in unknown):
            hints.append("an LRPE key on a layer whose linear_use_lrpe_list flag is 0: check linear_use_lrpe_list")
        raise ValueError(f"{folder}: unknown keys for this config: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
                         + (" (" + "; ".join(hints) + ")" if hints else ""))
    optional = {"lm_head.weight"} if tied else set()
    missing = [k for k in expected if k not in meta and k not in optional]
    if missing:
        lines = [f"{k} with shape {_shape_formula(k)}{list(expected[k])}" for k in missing[:8]]
        extra = " ..." if len(missing) > 8 else ""
        hint = (" (an untied lm_head is required because config.json says tie_word_embeddings false)"
                if "lm_head.weight" in missing else "")
        if any(".lrpe.theta" in k for k in missing):
            hint += " (LRPE theta is expected on every layer flagged in linear_use_lrpe_list)"
        raise ValueError(f"{folder}: missing keys: " + "; ".join(lines) + extra + hint)
    for k, (shape, dtype) in meta.items():
        if k in ignored:
            continue
        if shape != expected[k]:
            raise ValueError(f"{folder}: {k} has shape {list(shape)}, but the config expects "
                             f"{_shape_formula(k)}{list(expected[k])} (vocab_size={cfg.vocab_size}, "
                             f"decoder_embed_dim={cfg.decoder_embed_dim}, hidden_dim={cfg.hidden_dim}, "
                             f"decoder_attention_heads={cfg.decoder_attention_heads}, glu_dim={cfg.glu_dim})")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{folder}: {k} has dtype {dtype}, expected a floating-point tensor")
    return ignored


def _resolve_dtype(dtype):
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be a torch floating dtype, one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        return _DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise TypeError(f"`dtype` must be a torch floating dtype (e.g. torch.bfloat16), a name, 'auto' or None, "
                    f"got {dtype!r}")


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def load_pretrained(path, dtype=None, device=None) -> TransNormerLLM:
    """Load a released Hugging Face-layout folder (or a tnllm checkpoint folder) into a ``TransNormerLLM``.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` / shards + index.
        dtype: parameter dtype. ``None`` -> float32 (bf16 files are upcast exactly); a torch dtype or its name
            casts every tensor; ``"auto"`` keeps each tensor's dtype as stored in the file (lossless).
        device: where the parameters go (default CPU).

    Returns the model in eval mode. Raises ``FileNotFoundError`` for a missing folder/config/weights,
    ``TypeError`` for a config field of the wrong type or a non-float tensor, ``ValueError`` for unknown or
    missing keys, a shape the config does not imply, an untrusted pickle, or a tied ``lm_head`` that differs
    from the embedding. Every check runs before the model (a meta-device skeleton) receives any tensor.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a folder path (str or os.PathLike), got {type(path).__name__}")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"`path` must be a checkpoint folder (config.json + weights), got the file {folder}")
    want = _resolve_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    cfg = read_config(folder)

    meta, where = _collect(folder)
    # a skeleton on the meta device (no memory, no init cost) gives the expected keys and shapes; it only
    # receives tensors once every check below has passed, and is dropped on any error
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignored = _check_keys(meta, expected, cfg, folder)
    if ignored:
        logger.info("%s: ignoring known-harmless keys with no weights: %s", folder, ignored)

    # read the tensors, grouped by file
    by_file: dict[_WeightFile, list[str]] = {}
    for k in meta:
        if k not in ignored:
            by_file.setdefault(where[k], []).append(k)
    raw: dict[str, Tensor] = {}
    for wf, keys in by_file.items():
        raw.update(wf.get_many(keys))

    emb_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
    if cfg.tie_word_embeddings and head_key in raw:
        a, b = raw[emb_key], raw[head_key]
        if a.dtype != b.dtype or not torch.equal(a, b):
            raise ValueError(f"{folder}: config.json ties lm_head to the embedding (tie_word_embeddings true, the "
                             f"default), but the file's lm_head.weight differs from model.embed_tokens.weight; "
                             f"set \"tie_word_embeddings\": false in config.json to load it as a separate head")
        del raw[head_key]

    sd = {}
    for k, t in raw.items():
        t = t if want == "auto" else t.to(want)
        sd[k] = t.to(device)
    if cfg.tie_word_embeddings:
        sd[head_key] = sd[emb_key]

    # all checks passed: hand the tensors over
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:                      # assign=True replaced both Parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    for i, layer in enumerate(model.model.layers):   # the decay is a fixed, non-persistent buffer
        layer.token_mixer.s = decay_rates(cfg, i).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"left on the meta device after loading: {left}"
    return model.eval()


# ------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------
def _parse_size(size) -> int | None:
    if size is None:
        return None
    if _is_int(size):
        if size < 1:
            raise ValueError(f"`max_shard_size` must be >= 1 byte, got {size}")
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*", size.upper())
        if m:
            mult = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2)]
            n = int(float(m.group(1)) * mult)
            if n >= 1:
                return n
    raise ValueError(f"`max_shard_size` must be a byte count or a size like '5GB' / '500MiB', got {size!r}")


def _remove_stale_weights(folder: Path) -> None:
    """Drop weight files of an earlier save so the loader cannot pick a stale layout."""
    for f in folder.iterdir():
        if f.is_file() and (f.name in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX) or _SHARD_RE.match(f.name)):
            f.unlink()


def _config_dict(model: TransNormerLLM) -> dict:
    d = model.config.to_dict()
    d["architectures"] = ["TransnormerForCausalLM"]
    d["model_type"] = "transnormer"
    d["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).replace("torch.", "")   # informational
    return d


def save_pretrained(model: TransNormerLLM, path, safe_serialization: bool = True, max_shard_size=None) -> None:
    """Write ``model`` in the released layout: ``config.json`` + ``model.safetensors`` (or
    ``pytorch_model.bin`` when ``safe_serialization=False``), sharded with an index when
    ``max_shard_size`` (bytes or e.g. ``"5GB"``) is given and exceeded.

    Tensors are written in their own dtype (round trip bit-exact). A tied ``lm_head.weight`` is written as
    a copy of the embedding (safetensors refuses shared storage), as the released checkpoints carry it;
    the loader checks that the two are equal. Weight files of an earlier save in ``path`` are removed.
    """
    if not isinstance(model, TransNormerLLM):
        raise TypeError(f"save_pretrained expects a TransNormerLLM, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a folder path (str or os.PathLike), got {type(path).__name__}")
    limit = _parse_size(max_shard_size)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`path` must be a folder, got the file {folder}")
    folder.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, t in model.state_dict().items():
        if t.is_meta:
            raise ValueError(f"cannot save {k}: it is on the meta device (load or initialise the weights first)")
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        # clone tied / shared tensors: safetensors refuses shared storage, torch.save would keep the alias
        tensors[k] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n

    _remove_stale_weights(folder)
    ext, stem = ("safetensors", "model") if safe_serialization else ("bin", "pytorch_model")

    def write(part: dict, name: str) -> None:
        if safe_serialization:
            from safetensors.torch import save_file
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)

    if len(shards) == 1:
        write(shards[0], SAFE_WEIGHTS if safe_serialization else BIN_WEIGHTS)
    else:
        wmap = {}
        for i, part in enumerate(shards):
            name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
            write(part, name)
            wmap.update({k: name for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": wmap}
        (folder / (SAFE_INDEX if safe_serialization else BIN_INDEX)).write_text(json.dumps(index, indent=2) + "\n")
    cfg = _config_dict(model)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------
def _is_tnllm_folder(folder: Path, cfg_dict: dict) -> bool:
    return "arch" in cfg_dict or any((folder / n).exists() for n in _TNLLM_ONLY_FILES)


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
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"convert: no {CONFIG_NAME} in {src}")
    raw_cfg = _read_json(cfg_path, "the model config")
    if not isinstance(raw_cfg, dict):
        raise ValueError(f"{cfg_path}: must hold a JSON object, got {type(raw_cfg).__name__}")
    to_released = _is_tnllm_folder(src, raw_cfg)
    model = load_pretrained(src, dtype="auto")       # checks everything before dst is touched

    if to_released:
        model.config.extra.pop("arch", None)
    else:
        model.config.extra["arch"] = "transnormer"
    save_pretrained(model, dst)
    for name in _COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    direction = "tnllm->released" if to_released else "released->tnllm"
    logger.info("converted %s (%s) to %s", src, direction, dst)
    return direction
