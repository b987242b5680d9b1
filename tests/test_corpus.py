"""The embedded default corpus and tokenizer under corpus/ (see corpus/README.md)."""
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
GZ = CORPUS / "corpus.txt.gz"
TOKENIZER = CORPUS / "tokenizer.json"
EOS = "<|endoftext|>"
SAMPLE = ('"It is a truth universally acknowledged," said Mr. Bennet -- in 1813!\n'
          "  In the beginning, God created the heavens and the earth. Caf\u00e9 \u2014 na\u00efve \u201cquotes\u201d \U0001F600")


@pytest.fixture(scope="module")
def text():
    return gzip.decompress(GZ.read_bytes()).decode("utf-8")  # strict: must be valid UTF-8


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(TOKENIZER))


def test_files_exist():
    for name in ("corpus.txt.gz", "tokenizer.json", "tokenizer_config.json", "build.py", "README.md"):
        assert (CORPUS / name).is_file(), name
    assert GZ.stat().st_size < 4 * 1024 * 1024


def test_sha256_matches_readme():
    readme = (CORPUS / "README.md").read_text()
    m = re.search(r"corpus\.txt\.gz`: \*\*sha256 `([0-9a-f]{64})`", readme)
    assert m, "README.md must state the sha256 of corpus.txt.gz"
    assert hashlib.sha256(GZ.read_bytes()).hexdigest() == m.group(1)


def test_text_shape(text):
    lines = text.split("\n")
    assert lines[-1] == "" and all(lines[:-1]), "newline-terminated, no empty lines"
    assert len(lines) - 1 > 20_000
    assert "\r" not in text
    assert lines[0] == "SENSE AND SENSIBILITY"
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife." in text
    assert "In the beginning, God created the heavens and the earth." in text
    assert "<" not in text and ">" not in text, "no markup left"


def test_tokenizer_vocab_and_roundtrip(tok):
    assert tok.get_vocab_size() == 8192
    assert tok.token_to_id(EOS) == 0
    ids = tok.encode(SAMPLE).ids
    assert tok.decode(ids) == SAMPLE
    with_eos = SAMPLE + EOS + "next"
    ids = tok.encode(with_eos).ids
    assert 0 in ids
    assert tok.decode(ids, skip_special_tokens=False) == with_eos
    assert len(tok.encode("Mr. Darcy and Elizabeth").ids) <= 6  # learned merges, not bytes


def test_transformers_loads_it():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    ids = fast(SAMPLE)["input_ids"]
    assert fast.decode(ids) == SAMPLE
    auto = AutoTokenizer.from_pretrained(str(CORPUS))
    assert auto(SAMPLE)["input_ids"] == ids
    assert auto.eos_token == EOS and auto.eos_token_id == 0
    assert json.loads((CORPUS / "tokenizer_config.json").read_text())["eos_token"] == EOS


def test_corpus_has_enough_tokens(text, tok):
    lines = text.splitlines()
    n = sum(len(e.ids) for i in range(0, len(lines), 4096) for e in tok.encode_batch(lines[i:i + 4096]))
    assert n >= 1_000_000


def test_loads_with_datasets(tmp_path):
    import datasets
    ds = datasets.load_dataset("text", data_files=str(GZ), split="train", cache_dir=str(tmp_path))
    assert ds.num_rows > 20_000 and ds[0]["text"] == "SENSE AND SENSIBILITY"
