"""TransNormerConfig: the released ``config.json`` field names, presets, JSON round trip."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

_ACTS = ("silu", "swish", "none", "relu")
NORM_TYPES = ("simplermsnorm", "srmsnorm", "rmsnorm")
DECAY_TYPES = ("layer", "uniform", "none")


@dataclass
class TransNormerConfig:
    """Configuration of a TransNormerLLM, field names as in the released ``config.json``.

    ``hidden_dim`` defaults to ``decoder_embed_dim``; LRPE on layer 0 only (``linear_use_lrpe_list``
    defaults to [1, 0, 0, ...]); ``glu_dim`` is the SGLU width g.

    Two fields exist for ablations; their defaults are the released model:

    * ``norm_type``: "simplermsnorm" (alias "srmsnorm"; SRMSNorm, no weight) or "rmsnorm" (RMSNorm with a
      learned weight, for the pre-norms, the attention-output norm and the final norm).
    * ``decay_type``: "layer" (the released schedule: head rate s_h times 1 - l/(L-1) + 1e-5, so the last layer
      barely decays), "uniform" (s_h on every layer) or "none" (lambda = 1: no decay).
    """
    vocab_size: int = 64000
    decoder_embed_dim: int = 1024
    decoder_layers: int = 24
    decoder_attention_heads: int = 8
    glu_dim: int = 2816
    hidden_dim: int | None = None
    linear_act_fun: str = "silu"
    glu_act: str = "none"
    linear_use_lrpe_list: list[int] | None = None
    no_scale_embedding: bool = False
    norm_type: str = "simplermsnorm"
    decay_type: str = "layer"
    bias: bool = False
    init_std: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    max_position_embeddings: int | None = None   # informational: LRPE and the recurrence have no length limit
    block_size: int = 64                          # block length of the CPU blocked attention
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict)     # unknown released fields, kept for the round trip

    def __post_init__(self):
        for name in ("decoder_embed_dim", "decoder_layers"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool):
                raise TypeError(f"TransNormerConfig.{name} must be an int, got {type(val).__name__} {val!r}")
        if self.hidden_dim is None:
            self.hidden_dim = self.decoder_embed_dim
        if self.linear_use_lrpe_list is None:
            self.linear_use_lrpe_list = [1] + [0] * (self.decoder_layers - 1)
        self.validate()

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        ints = ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "glu_dim",
                "hidden_dim", "pad_token_id", "bos_token_id", "eos_token_id", "block_size")
        for name in ints:
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool):
                raise TypeError(f"TransNormerConfig.{name} must be an int, got {type(val).__name__} {val!r}")
        for name in ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "glu_dim",
                     "hidden_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransNormerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("no_scale_embedding", "bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TransNormerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.init_std, (int, float)) or isinstance(self.init_std, bool):
            raise TypeError(f"TransNormerConfig.init_std must be a float, got {self.init_std!r}")
        if self.hidden_dim % self.decoder_attention_heads:
            raise ValueError(f"TransNormerConfig: hidden_dim ({self.hidden_dim}) must be divisible by "
                             f"decoder_attention_heads ({self.decoder_attention_heads})")
        if self.linear_act_fun not in _ACTS:
            raise ValueError(f"TransNormerConfig.linear_act_fun must be one of {_ACTS}, got {self.linear_act_fun!r}")
        if self.glu_act not in _ACTS:
            raise ValueError(f"TransNormerConfig.glu_act must be one of {_ACTS}, got {self.glu_act!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"TransNormerConfig.norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if self.decay_type not in DECAY_TYPES:
            raise ValueError(f"TransNormerConfig.decay_type must be one of {DECAY_TYPES}, got {self.decay_type!r}")
        lst = self.linear_use_lrpe_list
        if not isinstance(lst, (list, tuple)) or len(lst) != self.decoder_layers:
            raise ValueError(f"TransNormerConfig.linear_use_lrpe_list must be a list of decoder_layers "
                             f"({self.decoder_layers}) flags, got {lst!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"TransNormerConfig.pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.decoder_attention_heads

    def lrpe(self, layer_idx: int) -> bool:
        return bool(self.linear_use_lrpe_list[layer_idx])

    def num_params(self) -> int:
        """Parameter count with a tied head (theta of the LRPE layers included)."""
        d, g, h = self.decoder_embed_dim, self.glu_dim, self.hidden_dim
        per_layer = 4 * h * d + h * d + 3 * d * g
        bias = (4 * h + d + 2 * g + d) if self.bias else 0
        lrpe = sum(self.linear_use_lrpe_list) * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        norms = (self.decoder_layers * (2 * d + h) + d) if self.norm_type == "rmsnorm" else 0
        return self.vocab_size * d + self.decoder_layers * (per_layer + bias) + lrpe + head + norms

    # -- presets and JSON --------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TransNormerConfig":
        """A named preset (``list_presets()``), fields overridable by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TransNormerConfig":
        """Build from a released/tnllm config dict; unknown fields are kept in ``extra``."""
        if not isinstance(d, dict):
            raise TypeError(f"TransNormerConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra", {}) if isinstance(d.get("extra"), dict) else {})
        extra.pop("extra", None)
        return cls(**kw, extra=extra)

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path) -> "TransNormerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _p(d, L, H, g, scale=True, V=64000):
    return dict(vocab_size=V, decoder_embed_dim=d, decoder_layers=L, decoder_attention_heads=H, glu_dim=g,
                no_scale_embedding=not scale)


PRESETS: dict[str, dict] = {
    # the released shapes
    "385M": _p(1024, 24, 8, 2816),
    "1B": _p(2048, 16, 16, 5632),
    "3B": _p(2560, 32, 20, 6912, scale=False),
    "7B": _p(4096, 30, 32, 11008, scale=False),
    # derived (no released config): Llama-like width/depth, e = 128, g ~ 8/3 d rounded to 128
    "13B": _p(5120, 40, 40, 13824, scale=False),
    "65B": _p(8192, 80, 64, 22016, scale=False),
    "175B": _p(12288, 96, 96, 32768, scale=False),
    # small ones for tests and the CPU demo (byte-level vocab 256 + specials)
    "tiny": _p(64, 2, 4, 96, V=259),
    "small": _p(256, 4, 4, 704, V=259),
    "demo": _p(192, 4, 4, 512, V=259),
    "mini": _p(96, 4, 2, 256, V=259),      # 0.50M: the CPU quality experiments (docs/quality.md)
    # ~100M with the byte vocabulary (99.3M; e = 128), for `tnllm compare` on a GPU
    "100M": _p(768, 12, 6, 2304, V=259),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head rates 2 ** (-8 (h+1) / H) for H a power of two; other H use the nearest lower power c, then
    every other slope of 2c."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n_heads).is_integer():
        return pow2(n_heads)
    c = 2 ** math.floor(math.log2(n_heads))
    return pow2(c) + alibi_slopes(2 * c)[0::2][: n_heads - c]


# -- config.json: the type table and the released conventions ---------------------------------
CONFIG_NAME = "config.json"

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


def is_int(v) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_field_types(d: dict, where: str) -> None:
    for name, want in _FIELD_TYPES.items():
        if name not in d or (d[name] is None and name in _NULLABLE):
            continue
        v = d[name]
        ok = {_INT: is_int(v), _BOOL: isinstance(v, bool), _STR: isinstance(v, str),
              "a number": isinstance(v, (int, float)) and not isinstance(v, bool),
              "a list of 0/1 flags": isinstance(v, list) and all(is_int(x) or isinstance(x, bool) for x in v)}[want]
        if not ok:
            raise TypeError(f"{where}: field {name!r} must be {want}, got {type(v).__name__} {v!r}")


def read_json(path: Path, what: str):
    """The JSON in ``path``; a ValueError naming the file (and ``what`` it should hold) when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({what}): {e}") from e


def released_to_tnllm_fields(d: dict, where: str) -> dict:
    """Apply the released code's conventions that tnllm's config spells differently."""
    d = dict(d)
    if d.get("glu_dim") == -1:                       # released: -1 means "same as decoder_embed_dim"
        d["glu_dim"] = d.get("decoder_embed_dim", TransNormerConfig.decoder_embed_dim)
    if d.get("linear_use_lrpe_list") == []:          # released: empty list -> per-layer `linear_use_lrpe`
        flag = d.get("linear_use_lrpe")
        if not (is_int(flag) or isinstance(flag, bool)):
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
                                f"(the released field names)")
    d = read_json(cfg_path, "the model config")
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: must hold a JSON object, got {type(d).__name__}")
    arch = d.get("arch")
    if arch is not None and arch != "transnormer":
        hint = (" It is a baseline Transformer checkpoint of tnllm's trainer: load it with "
                "tnllm.checkpoints.load_model(path).") if arch == "transformer" else ""
        raise ValueError(f"{cfg_path}: 'arch' is {arch!r}, not 'transnormer'; from_pretrained loads "
                         f"TransNormerLLM checkpoints only.{hint}")
    _check_field_types(d, str(cfg_path))
    d = released_to_tnllm_fields(d, str(cfg_path))
    try:
        return TransNormerConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{cfg_path}: {e}") from e
