"""A released Hugging Face folder (config.json + weights + tokenizer.model) used end to end:
`tnllm generate --ckpt` picks up the SentencePiece tokenizer and the config's special ids."""
import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.cli import main
from tnllm.checkpoints import load_model

CODE = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class Point:\n    pass\n"] * 40


@pytest.fixture
def released(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(CODE))
    # no bos/eos pieces in the tokenizer: the config's ids must be used
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   bos_id=-1, eos_id=-1, unk_id=1, pad_id=0, minloglevel=2, hard_vocab_limit=False)
    folder = tmp_path / "TransNormerLLM-tiny"
    torch.manual_seed(0)
    # the model's vocabulary is padded past the tokenizer's, as in the releases
    cfg = TransNormerConfig(vocab_size=64, decoder_embed_dim=32, decoder_layers=2, decoder_attention_heads=2,
                            glu_dim=48, bos_token_id=5, eos_token_id=6)
    TransNormerLLM(cfg).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    return folder


def test_load_model_honours_config_ids(released):
    model, tok = load_model(released)
    assert isinstance(model, TransNormerLLM)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 5, 6)
    assert tok.decode(tok.encode("def add")) == "def add"
    assert tok.decode([63, 62]) == ""          # ids past the tokenizer's pieces carry no text


def test_generate_cli_on_released_folder(released, capsys):
    assert main(["generate", "--ckpt", str(released), "--prompt", "def add", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert "def add" in capsys.readouterr().out
