"""Section 3 of issue 18: what the language models learned. The n-gram baselines of the validation
tokens (data.ngram_losses, by hand), the context gain from per-position losses (against materialised
logits), and the report's regime statement both ways."""
import math

import numpy as np
import pytest
import torch

import record
from data import IGNORE_INDEX, cached_ngram_losses, ngram_losses


def test_ngram_losses_by_hand():
    # Training block 0 1 0 1: pairs (0,1) (1,0) (0,1), targets 1 0 1. V = 3.
    # unigram, add-one: c = (1, 2, 0), N = 3 -> P = (2/6, 3/6, 1/6)
    # bigram, Witten-Bell: c(0,1) = 2, c(1,0) = 1; c(0) = 2, c(1) = 1; T(0) = T(1) = 1, c(2) = 0
    #   1 after 0: (2 + 1 * 1/2) / (2 + 1) = 5/6;  1 after 1: (0 + 1 * 1/2) / (1 + 1) = 1/4
    #   0 after 2: never a previous token -> P(0) = 1/3
    train = np.array([[0, 1, 0, 1]])
    inputs, targets = np.array([[0, 1, 2, 2]]), np.array([[1, 1, 0, IGNORE_INDEX]])
    losses = ngram_losses(train, inputs, targets, vocab_size=3)
    assert losses[record.DATA_UNIGRAM_LOSS] == pytest.approx(-(math.log(1 / 2) * 2 + math.log(1 / 3)) / 3)
    assert losses[record.DATA_BIGRAM_LOSS] == pytest.approx(-(math.log(5 / 6) + math.log(1 / 4) + math.log(1 / 3)) / 3)


def test_ngram_probabilities_sum_to_one():
    """Both smoothed models are distributions over the vocabulary, for every previous token."""
    rng = np.random.default_rng(0)
    vocab = 7
    train = rng.integers(0, vocab - 1, size=(5, 9))  # token 6 never appears: smoothing must cover it
    for previous in range(vocab):
        unigram = bigram = 0.0
        for token in range(vocab):
            losses = ngram_losses(train, np.array([[previous]]), np.array([[token]]), vocab)
            unigram += math.exp(-losses[record.DATA_UNIGRAM_LOSS])
            bigram += math.exp(-losses[record.DATA_BIGRAM_LOSS])
        assert unigram == pytest.approx(1.0) and bigram == pytest.approx(1.0)


def test_ngram_cache_beside_the_token_cache(tmp_path):
    """Computed once: a second call reads the file beside the token cache (keyed by the split's
    tokens), and another split gets its own file."""
    from config import TrainConfig
    from data import token_cache_paths

    cfg = TrainConfig(cache_dir=str(tmp_path))
    train = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 2]])
    val = [(torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 0]]))]
    first = cached_ngram_losses(cfg, train.numpy(), val, 3)
    tokens, _ = token_cache_paths(cfg)
    (cached,) = tmp_path.glob(f"{tokens.stem}.ngram-*.json")
    assert first == ngram_losses(train.numpy(), val[0][0].numpy(), val[0][1].numpy(), 3)
    cached.write_text('{"data/unigram_loss": 1.5, "data/bigram_loss": 0.5}')  # the file is what is read
    assert cached_ngram_losses(cfg, train.numpy(), val, 3) == {record.DATA_UNIGRAM_LOSS: 1.5, record.DATA_BIGRAM_LOSS: 0.5}
    cached_ngram_losses(cfg, train[:1].numpy(), val, 3)
    assert len(list(tmp_path.glob(f"{tokens.stem}.ngram-*.json"))) == 2
