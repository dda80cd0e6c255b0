"""tnllm's tokenizers as transformers tokenizers (for ``pipeline``, ``TextStreamer``, lm-evaluation-harness).

``to_hf_tokenizer(tok)`` turns a tnllm tokenizer (``tnllm.tokenizer.load_tokenizer``) into one whose ``encode``
gives the same ids and whose ``decode`` the same text:

* byte tokenizer -> ``PreTrainedTokenizerFast``: a ``tokenizers`` byte-level model with ids pad 0, bos 1, eos 2,
  byte b at b + 3 (no merges);
* byte-level BPE (``tokenizer.json``) -> ``PreTrainedTokenizerFast`` on the same ``tokenizers`` model;
* SentencePiece (``tokenizer.model``, the released checkpoints) -> ``TransNormerSPTokenizer``, which calls
  sentencepiece directly, as tnllm does.

No special token is added by ``encode`` (tnllm adds none; the released tokenizer neither), and ``padding_side`` is
``"left"``: batched prompts for generation are padded on the left, which is exact for TransNormerLLM.
"""
from __future__ import annotations

import os
import tempfile

from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from tnllm.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ``tokenizers`` ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: b + ByteTokenizer.offset for b, ch in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class TransNormerSPTokenizer(SentencePieceBackend):
    """A SentencePiece ``tokenizer.model`` as a transformers tokenizer, encoding and decoding exactly as
    ``tnllm.tokenizer.SentencePieceTokenizer`` (sentencepiece called directly, no special token added; ids past
    the tokenizer's pieces, which a padded model vocabulary can produce, decode to no text)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 padding_side="left", **kwargs):
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"TransNormerSPTokenizer needs a SentencePiece tokenizer.model, got "
                                    f"{vocab_file!r}")
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(vocab_file))

        def piece(i):
            return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None
        bos_token = bos_token if bos_token is not None else piece(sp.bos_id())
        eos_token = eos_token if eos_token is not None else piece(sp.eos_id())
        unk_token = unk_token if unk_token is not None else piece(sp.unk_id())
        pad_token = pad_token if pad_token is not None else (piece(sp.pad_id()) or piece(0))
        kwargs.setdefault("legacy", True)
        kwargs.setdefault("add_bos_token", False)
        kwargs.setdefault("add_eos_token", False)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(vocab_file=str(vocab_file), bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                         pad_token=pad_token, padding_side=padding_side, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 is not None else [])

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index) if 0 <= index < self.sp_model.get_piece_size() else ""

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode_pieces([t for t in tokens if t])


def to_hf_tokenizer(tok, model_max_length: int | None = None):
    """A transformers tokenizer equal to tnllm tokenizer ``tok`` (``ByteTokenizer``, ``HFTokenizer``,
    ``SentencePieceTokenizer``, or a path / ``"byte"`` that ``tnllm.tokenizer.load_tokenizer`` reads).

    ``save_pretrained(folder)`` on the result writes files that ``AutoTokenizer.from_pretrained(folder)`` reads
    back (with ``tnllm.hf`` imported for the SentencePiece one)."""
    if isinstance(tok, (str, os.PathLike)):
        tok = load_tokenizer(tok)
    extra = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    if isinstance(tok, ByteTokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=_byte_backend(), pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>", padding_side="left", clean_up_tokenization_spaces=False,
                                       **extra)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)                                    # the public way to reach the tokenizer's own file
        if isinstance(tok, HFTokenizer):
            from tokenizers import Tokenizer
            backend = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))

            def name(i):
                return None if i is None else backend.id_to_token(i)
            return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=name(tok.pad_id),
                                           bos_token=name(tok.bos_id), eos_token=name(tok.eos_id),
                                           padding_side="left", clean_up_tokenization_spaces=False, **extra)
        if isinstance(tok, SentencePieceTokenizer):
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))

            def piece(i):
                return sp.id_to_piece(i) if i is not None and 0 <= i < sp.get_piece_size() else None
            return TransNormerSPTokenizer(os.path.join(d, "tokenizer.model"), bos_token=piece(tok.bos_id),
                                          eos_token=piece(tok.eos_id), pad_token=piece(tok.pad_id), **extra)
    raise TypeError(f"to_hf_tokenizer expects a tnllm tokenizer (ByteTokenizer, HFTokenizer, SentencePieceTokenizer) "
                    f"or a path to one, got {type(tok).__name__}")
