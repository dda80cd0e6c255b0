"""lm-evaluation-harness on TransNormerLLM checkpoints (``pip install "tnllm[hf]"``).

lm-eval's own ``lm_eval`` command cannot know model_type ``"transnormer"``: transformers learns it when ``tnllm.hf``
is imported. ``tnllm-lm-eval`` (or ``python -m tnllm.hf.lm_eval``) is ``lm_eval`` with ``tnllm.hf`` imported,
taking exactly its arguments::

    tnllm-lm-eval --model hf --model_args pretrained=path/to/folder --tasks lambada_openai

It also registers an lm-eval model named ``tnllm``: the ``hf`` model (``HFLM``) with the causal backend and, unless
``tokenizer=`` is given, the folder's tokenizer read by tnllm (``tnllm.tokenizer.load_tokenizer``: a tnllm trainer
checkpoint, a ``tokenizer.json`` or the released ``tokenizer.model``) turned into a transformers tokenizer, so a
folder without transformers tokenizer files evaluates too::

    tnllm-lm-eval --model tnllm --model_args pretrained=runs/demo --tasks ...

(a ``tnllm train`` run directory stands for the step folder its ``latest`` file names).

From Python, ``import tnllm.hf`` before ``lm_eval.simple_evaluate(model="hf", ...)`` is enough; call
``register_lm_eval_model()`` first to use ``model="tnllm"``.
"""
from __future__ import annotations

import os
import sys

import tnllm.hf  # noqa: F401  (registers model_type "transnormer" with transformers)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(f'tnllm.hf.lm_eval needs lm-evaluation-harness with its transformers extras '
                          f'(lm-eval, accelerate): pip install "tnllm[hf]" ({e})') from e
    return register_model, HFLM


_REGISTERED = None


def register_lm_eval_model():
    """Register the lm-eval model ``tnllm`` (idempotent) and return its class."""
    global _REGISTERED
    if _REGISTERED is not None:
        return _REGISTERED
    register_model, HFLM = _import_lm_eval()

    class TransNormerLM(HFLM):
        """lm-eval's ``hf`` model for TransNormerLLM folders: causal backend, and tnllm's reading of the folder's
        tokenizer unless ``tokenizer=`` is given."""

        def __init__(self, pretrained, backend: str = "causal", tokenizer=None, **kwargs):
            if isinstance(pretrained, str) and os.path.isdir(pretrained):
                latest = os.path.join(pretrained, "latest")
                if not os.path.isfile(os.path.join(pretrained, "config.json")) and os.path.isfile(latest):
                    # a `tnllm train` run directory: its `latest` file names the newest complete step folder
                    with open(latest) as f:
                        pretrained = os.path.join(pretrained, f.read().strip())
                if tokenizer is None:
                    from .tokenization import to_hf_tokenizer
                    tokenizer = to_hf_tokenizer(pretrained)
            super().__init__(pretrained=pretrained, backend=backend, tokenizer=tokenizer, **kwargs)

    from lm_eval.api.registry import model_registry
    if "tnllm" not in model_registry:
        register_model("tnllm")(TransNormerLM)
    _REGISTERED = TransNormerLM
    return TransNormerLM


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line with ``tnllm.hf`` imported and the ``tnllm`` model registered."""
    register_lm_eval_model()
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = ["tnllm-lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
