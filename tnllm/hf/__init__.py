"""tnllm in Hugging Face transformers (``pip install "tnllm[hf]"``).

Importing this package registers model_type ``"transnormer"`` with ``AutoConfig``, ``AutoModelForCausalLM`` and
``AutoTokenizer``, so a released TransNormerLLM folder (or one written by ``save_pretrained``) loads without remote
code::

    import tnllm.hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generate(input_ids, max_new_tokens=8, do_sample=False)

* ``TransNormerHFConfig``: the released config.json fields; ``to_tnllm_config`` / ``from_tnllm_config``.
* ``TransNormerForCausalLM``: ``PreTrainedModel`` + ``GenerationMixin`` wrapping a ``TransNormerLLM`` (same tensors,
  the released parameter names); ``from_tnllm(model)`` wraps an existing one; ``tnllm_model`` gives it back.
* ``TransNormerCache``: the recurrent state as a transformers ``Cache`` (fixed size).
* ``to_hf_tokenizer(tok)``: tnllm's byte / BPE / SentencePiece tokenizers as transformers tokenizers.
* ``tnllm.hf.lm_eval``: lm-evaluation-harness with these classes registered (``tnllm-lm-eval``, same arguments as
  ``lm_eval``), plus an lm-eval model named ``tnllm``.
"""
try:
    import transformers
except ImportError as e:     # an optional dependency
    raise ImportError('tnllm.hf needs Hugging Face transformers (>= 5): pip install "tnllm[hf]"') from e

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"tnllm.hf needs transformers >= 5, found {transformers.__version__}: "
                      f'pip install -U "tnllm[hf]"')

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .configuration import TransNormerHFConfig  # noqa: E402
from .modeling import (TransNormerCache, TransNormerForCausalLM, TransNormerPreTrainedModel,  # noqa: E402
                       select_state_rows)
from .tokenization import TransNormerSPTokenizer, to_hf_tokenizer  # noqa: E402

AutoConfig.register(TransNormerHFConfig.model_type, TransNormerHFConfig, exist_ok=True)
AutoModelForCausalLM.register(TransNormerHFConfig, TransNormerForCausalLM, exist_ok=True)
# the released folders ship a SentencePiece tokenizer.model: read it with sentencepiece itself (exact), not through
# transformers' conversion to a `tokenizers` model
AutoTokenizer.register(TransNormerHFConfig, tokenizer_class=TransNormerSPTokenizer, exist_ok=True)

__all__ = ["TransNormerHFConfig", "TransNormerForCausalLM", "TransNormerPreTrainedModel", "TransNormerCache",
           "TransNormerSPTokenizer", "to_hf_tokenizer", "select_state_rows"]
