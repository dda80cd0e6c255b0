"""``TransNormerForCausalLM``: a transformers ``PreTrainedModel`` + ``GenerationMixin`` around a ``TransNormerLLM``.

The wrapper registers the TransNormerLLM's own ``model`` and ``lm_head`` modules as its children, so its parameter
names are the released checkpoint keys (``model.layers.{i}.token_mixer.qkvu_proj.weight``, ``lm_head.weight`` tied to
``model.embed_tokens.weight``) and no weight is copied: ``hf_model.tnllm_model`` is the wrapped ``TransNormerLLM``,
sharing every tensor. ``forward`` calls the TransNormerLLM's public paths, so the logits are the same tensors:

* without a cache: ``model(input_ids, attention_mask)`` (the parallel form);
* with a cache (``generate``): ``prefill`` for a chunk of tokens, ``step`` for one token, on the fixed-size
  recurrent state that ``TransNormerCache`` holds (per layer [B, H, Dk, Dv], fp32) -- it never grows.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from tnllm.model import Lrpe, NormLinearAttention, TransNormerLLM, decay_rates

from .configuration import TransNormerHFConfig

# transformers renamed the cache argument and output field from `past_key_values` to `cache` (5.2x); accept both
_OUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
CACHE_NAME = "cache" if "cache" in _OUT_FIELDS else "past_key_values"

# keys the released code (or fairseq) leaves in a checkpoint that carry no weights
_HARMLESS_KEYS = [r"(^|\.)decoder\.version$", r"(^|\.)_linear_attn_mask$", r"(^|\.)lrpe\.index$", r"(^|\.)slopes$",
                  r"(^|\.)rotary_emb\.inv_freq$"]


def select_state_rows(state, index: Tensor):
    """The recurrent state with its batch rows taken from ``index`` [B'] (int64): beam search reordering,
    ``num_return_sequences`` expansion and batch selection all go through this one function.

    The per-layer tensors ``state[i]`` [B, H, Dk, Dv] are indexed along dim 0, and so are the per-row positions
    (a position shared by every row stays a plain int, so nothing is read back from the device)."""
    rows = [S.index_select(0, index.to(S.device)) for S in state]
    shared = state.shared_offset
    position = shared if shared is not None else state.position.index_select(0, index.to(state.position.device))
    return type(state)(rows, position)


class TransNormerCache(Cache):
    """The recurrent state of a TransNormerLLM as a transformers ``Cache``: fixed size, whatever the length.

    ``state`` is what ``TransNormerLLM.prefill`` / ``step`` return (per-layer [B, H, Dk, Dv] fp32 tensors and the
    position); ``seen_tokens`` counts the input columns consumed (padding included), which is how far ``generate``'s
    ``input_ids`` have been fed. A recurrent state cannot be rolled back, so ``crop`` (assisted decoding) is refused.
    """

    is_compileable = False

    def __init__(self, state=None, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.state = state
        self.seen_tokens = int(seen_tokens)

    def __repr__(self) -> str:
        shape = None if self.state is None else tuple(self.state[0].shape)
        return f"TransNormerCache(seen_tokens={self.seen_tokens}, layers={len(self)}, state shape={shape})"

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state)

    # -- what generate() asks ---------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1                      # no length limit: the state has a fixed size

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.state is not None

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_linear(self) -> list[bool]:
        return [True] * max(len(self), 1)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else int(self.state[0].shape[0])

    def update(self, *args, **kwargs):
        raise NotImplementedError("TransNormerCache holds a recurrent state, not keys and values: it is updated by "
                                  "TransNormerForCausalLM.forward")

    # -- batch edits (beam search, num_return_sequences, contrastive search) ----------------------------
    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.state is not None:
            self.state = select_state_rows(self.state, beam_idx.long())

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            B = self.batch_size
            self.reorder_cache(torch.arange(B).repeat_interleave(repeats))

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or (tokens_to_remove < 0 and -tokens_to_remove >= self.seen_tokens):
            return
        raise ValueError("TransNormerCache cannot be cropped: a recurrent state cannot be rolled back to an earlier "
                         "position (assisted / speculative decoding is not supported; generate without an "
                         "assistant model)")


class TransNormerPreTrainedModel(PreTrainedModel):
    config_class = TransNormerHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransNormerDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = _HARMLESS_KEYS
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        """The TransNormerLLM init: normal(0, init_std) for Linear and Embedding (padding row zeroed), zero biases,
        LRPE theta in closed form, and the fixed decay rates (a non-persistent buffer, never in a checkpoint)."""
        std = self.config.init_std
        if isinstance(module, torch.nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            if not getattr(module.weight, "_is_hf_initialized", False):
                init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, Lrpe):
            n = module.theta.numel()
            init.copy_(module.theta, (10000 ** (-2 / n * torch.arange(n, dtype=torch.float32))).reshape(
                module.theta.shape))
        elif isinstance(module, NormLinearAttention):
            idx = self._layer_index.get(id(module))
            if idx is not None:
                init.copy_(module.s, decay_rates(self.config.to_tnllm_config(), idx))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                 # generate() must not build a DynamicCache: our forward makes a TransNormerCache


class TransNormerForCausalLM(TransNormerPreTrainedModel, GenerationMixin):
    """TransNormerLLM for causal LM in transformers: ``AutoModelForCausalLM``, ``generate``, pipelines.

    ``TransNormerForCausalLM(config)`` builds a fresh model; ``TransNormerForCausalLM.from_tnllm(model)`` wraps an
    existing ``TransNormerLLM`` (same tensors); ``from_pretrained(folder)`` loads a released or saved folder and
    refuses missing or unexpected weights (transformers would only warn) -- a TransNormerLLM checkpoint has no
    optional weights besides the tied ``lm_head.weight``.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransNormerHFConfig, tnllm_model: TransNormerLLM | None = None):
        super().__init__(config)
        inner = tnllm_model if tnllm_model is not None else TransNormerLLM(config.to_tnllm_config())
        # the TransNormerLLM's modules become ours under the released names; the TransNormerLLM itself is kept
        # outside the module tree so no key gets a second prefix
        self.model = inner.model
        self.lm_head = inner.lm_head
        object.__setattr__(self, "_tnllm", inner)
        self._layer_index = {id(layer.token_mixer): i for i, layer in enumerate(inner.model.layers)}
        self.post_init()

    @classmethod
    def from_tnllm(cls, model: TransNormerLLM, **config_kwargs) -> "TransNormerForCausalLM":
        """Wrap an existing ``TransNormerLLM`` (no copy, no re-initialisation: the two share every tensor)."""
        if not isinstance(model, TransNormerLLM):
            raise TypeError(f"from_tnllm expects a tnllm.TransNormerLLM, got {type(model).__name__}")
        for t in list(model.parameters()) + list(model.buffers()):
            t._is_hf_initialized = True          # post_init must keep the weights as they are
        for m in model.modules():
            m._is_hf_initialized = True
        config = TransNormerHFConfig.from_tnllm_config(model.config, **config_kwargs)
        out = cls(config, tnllm_model=model)
        return out.train(model.training)

    @property
    def tnllm_model(self) -> TransNormerLLM:
        """The wrapped ``TransNormerLLM`` (shares every parameter with this model): ``tnllm.generate``, export..."""
        return self._tnllm

    def train(self, mode: bool = True):
        super().train(mode)
        self._tnllm.training = mode
        return self

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings
        self._tnllm.lm_head = new_embeddings

    # -- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        tied = model.config.tie_word_embeddings
        missing = sorted(k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight"))
        unexpected = sorted(info.get("unexpected_keys", ()))
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "the checkpoint")
        if missing:
            shapes = {k: list(t.shape) for k, t in model.state_dict().items()}
            lines = [f"{k} with shape {shapes.get(k)}" for k in missing[:8]]
            raise ValueError(f"Error(s) in loading {cls.__name__} from {where}: missing weights (a TransNormerLLM "
                             f"has no optional weights): " + "; ".join(lines) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            hint = (" (an LRPE key on a layer whose linear_use_lrpe_list flag is 0: check linear_use_lrpe_list)"
                    if any(".lrpe." in k for k in unexpected) else "")
            raise ValueError(f"Error(s) in loading {cls.__name__} from {where}: unexpected weights for this config: "
                             f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}{hint}")
        if info.get("mismatched_keys"):
            raise ValueError(f"Error(s) in loading {cls.__name__} from {where}: weights whose shape does not fit "
                             f"the config: {info['mismatched_keys'][:8]}")
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        if tied and head is not emb:      # transformers unties (with a warning) when the file's head differs
            raise ValueError(f"Error(s) in loading {cls.__name__} from {where}: config.json ties lm_head to the "
                             f"embedding (tie_word_embeddings true, the default), but the file's lm_head.weight "
                             f"differs from model.embed_tokens.weight; set \"tie_word_embeddings\": false in "
                             f"config.json to load it as a separate head")
        cfg = model.config.to_tnllm_config()
        for i, layer in enumerate(model.model.layers):
            tm = layer.token_mixer
            tm.s = decay_rates(cfg, i).to(tm.qkvu_proj.weight.device)    # fixed decay: recomputed, never read
            if tm.lrpe is not None and tm.lrpe.theta.dtype != emb.dtype:
                # theta is built in fp32, so transformers keeps it there; hold it in the model dtype, as
                # TransNormerLLM.from_pretrained(dtype=...) does, so the two give the same logits
                tm.lrpe.theta.data = tm.lrpe.theta.data.to(emb.dtype)
        return (model, info) if want_info else model

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                past_key_values: TransNormerCache | None = None, cache: TransNormerCache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        """Logits [B, T, V] for ``input_ids`` [B, T] (``attention_mask`` [B, T], 1 keep / 0 pad).

        With ``use_cache`` (the default of ``config.use_cache``, off when ``labels`` are given) the returned
        ``TransNormerCache`` carries the recurrent state; passing it back continues the sequence: a chunk of tokens
        runs ``prefill``, a single token ``step``. ``labels`` [B, T] give the next-token cross entropy (-100 ignored).
        ``position_ids`` and other position arguments are not needed (positions travel with the state) and are
        ignored.
        """
        if inputs_embeds is not None:
            raise ValueError("TransNormerForCausalLM takes `input_ids`, not `inputs_embeds`")
        if input_ids is None:
            raise ValueError("TransNormerForCausalLM.forward needs `input_ids` [B, T]")
        if output_attentions or output_hidden_states:
            raise ValueError("TransNormerForCausalLM has no attention maps or per-layer hidden states to return "
                             "(`output_attentions` / `output_hidden_states` must be False)")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once, as `cache` or `past_key_values`")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, TransNormerCache):
            raise TypeError(f"TransNormerForCausalLM needs a TransNormerCache (a recurrent state), got "
                            f"{type(cache).__name__}")
        if use_cache is None:
            use_cache = cache is not None or (labels is None and self.config.use_cache)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"`attention_mask` must be 2-D [B, T] (1 keep, 0 pad), got shape "
                             f"{tuple(attention_mask.shape)}")
        tn = self._tnllm
        T = input_ids.shape[-1]
        if not use_cache:
            logits, cache = tn(input_ids, attention_mask=attention_mask), None
        else:
            if cache is None:
                cache = TransNormerCache()
            mask = attention_mask
            if mask is not None:
                if mask.shape[1] not in (T, cache.seen_tokens + T):
                    raise ValueError(f"`attention_mask` has {mask.shape[1]} columns; expected the new tokens' {T} "
                                     f"or all {cache.seen_tokens + T} seen so far")
                mask = mask[:, -T:]
            if cache.state is not None and T == 1:
                step_logits, state = tn.step(input_ids[:, 0], cache.state)
                logits = step_logits[:, None]
            else:
                logits, state = tn.prefill(input_ids, cache.state, attention_mask=mask)
            cache.state, cache.seen_tokens = state, cache.seen_tokens + T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if return_dict is False:
            out = (logits, cache) if cache is not None else (logits,)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache})

    # -- generate() -------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      inputs_embeds: Tensor | None = None, **kwargs):
        """Feed only the columns the cache has not consumed yet (the whole prompt first, then one token a step)."""
        if inputs_embeds is not None:
            raise ValueError("TransNormerForCausalLM.generate takes `input_ids`, not `inputs_embeds`")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache", True)
        if use_cache is not False and cache is None:
            cache = TransNormerCache()
        if cache is not None and cache.seen_tokens:
            input_ids = input_ids[:, cache.seen_tokens:]
        return {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask, CACHE_NAME: cache,
                "use_cache": use_cache is not False}

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache
