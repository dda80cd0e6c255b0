"""``TransNormerHFConfig``: the transformers configuration of a TransNormerLLM (model_type ``"transnormer"``).

Its fields are the released ``config.json`` names, so a released folder's config loads unchanged; it converts to
and from ``tnllm.TransNormerConfig`` (``to_tnllm_config`` / ``from_tnllm_config``), which validates every field.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from tnllm.config import TransNormerConfig, released_to_tnllm_fields

# the fields TransNormerConfig knows, in its order (everything else a config.json holds stays a plain attribute)
TNLLM_FIELDS = ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "glu_dim",
                "hidden_dim", "linear_act_fun", "glu_act", "linear_use_lrpe_list", "no_scale_embedding", "norm_type",
                "decay_type", "bias", "init_std", "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings",
                "block_size", "tie_word_embeddings")


class TransNormerHFConfig(PretrainedConfig):
    r"""Configuration of a TransNormerLLM for transformers (model_type ``"transnormer"``).

    Field names and meanings are those of the released ``config.json`` (``decoder_embed_dim`` = d,
    ``decoder_layers`` = L, ``decoder_attention_heads`` = H, ``glu_dim`` = SGLU width, ``hidden_dim`` = attention
    width, default d; ``linear_use_lrpe_list`` one 0/1 flag per layer, default LRPE on layer 0 only). Two released
    conventions are applied when converting: ``glu_dim: -1`` means ``decoder_embed_dim``, and an empty
    ``linear_use_lrpe_list`` with a ``linear_use_lrpe`` flag means that flag on every layer. The common transformers
    names ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size`` and
    ``initializer_range`` read and write the released fields.

    >>> from tnllm.hf import TransNormerHFConfig
    >>> cfg = TransNormerHFConfig(vocab_size=259, decoder_embed_dim=64, decoder_layers=2,
    ...                           decoder_attention_heads=4, glu_dim=96)
    >>> cfg.to_tnllm_config().head_dim
    16
    """

    model_type = "transnormer"
    attribute_map = {"hidden_size": "decoder_embed_dim", "num_hidden_layers": "decoder_layers",
                     "num_attention_heads": "decoder_attention_heads", "intermediate_size": "glu_dim",
                     "initializer_range": "init_std"}

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
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    max_position_embeddings: int | None = None
    block_size: int = 64
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        cfg = self.to_tnllm_config()    # every field checked now, with the error naming it
        # spell the defaults out, as the released config.json files do
        if self.hidden_dim is None:
            self.hidden_dim = cfg.hidden_dim
        if self.linear_use_lrpe_list is None:
            self.linear_use_lrpe_list = list(cfg.linear_use_lrpe_list)

    # -- conversion ------------------------------------------------------------------------------
    def _tnllm_fields(self) -> dict:
        d = {name: getattr(self, name) for name in TNLLM_FIELDS}
        if hasattr(self, "linear_use_lrpe"):        # the released per-layer flag behind an empty list
            d["linear_use_lrpe"] = self.linear_use_lrpe
        d = released_to_tnllm_fields(d, type(self).__name__)     # the released conventions (glu_dim -1, ...)
        d.pop("linear_use_lrpe", None)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if d[name] is None:
                d[name] = getattr(TransNormerConfig, name)
        return d

    def to_tnllm_config(self) -> TransNormerConfig:
        """The equivalent ``tnllm.TransNormerConfig`` (raises ``TypeError`` / ``ValueError`` naming a bad field)."""
        try:
            return TransNormerConfig(**self._tnllm_fields())
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid TransNormerLLM config: {e}") from e

    @classmethod
    def from_tnllm_config(cls, cfg: TransNormerConfig, **kwargs) -> "TransNormerHFConfig":
        """The transformers config of a ``tnllm.TransNormerConfig`` (its unknown released fields included)."""
        if not isinstance(cfg, TransNormerConfig):
            raise TypeError(f"from_tnllm_config expects a tnllm.TransNormerConfig, got {type(cfg).__name__}")
        d = {k: v for k, v in cfg.extra.items() if k not in ("model_type", "architectures", "transformers_version")}
        d.update({name: getattr(cfg, name) for name in TNLLM_FIELDS})
        d.update(kwargs)
        return cls(**d)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Refuses a config of another model type (transformers only warns), then builds the config."""
        if isinstance(config_dict, dict):
            model_type = config_dict.get("model_type")
            if model_type not in (None, cls.model_type):
                raise ValueError(f"the config has model_type {model_type!r}, but {cls.__name__} loads TransNormerLLM "
                                 f"checkpoints (model_type {cls.model_type!r}); load it with "
                                 f"AutoModelForCausalLM / AutoConfig instead")
            arch = config_dict.get("arch")
            if arch is not None and arch != "transnormer":
                raise ValueError(f"the config has 'arch' {arch!r} (a tnllm trainer checkpoint of another "
                                 f"architecture), not 'transnormer'")
        return super().from_dict(config_dict, **kwargs)
