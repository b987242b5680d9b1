"""Text -> token blocks -> the batches every variant of a seed sees, in the same order.

One loading path for every source (`datasets`): a .txt/.txt.gz file (the embedded corpus) through
`load_dataset("text", ...)`, a local dataset directory, or a hub dataset streamed by name. The
token stream is cached on disk, keyed by everything that changes it, so a 13-run sweep tokenizes
once. The stream is cut into non-overlapping blocks of seq_len + 1 tokens; a fixed, seed-free
random permutation of the blocks gives the validation set (its head), then the test set (the next
blocks), and training (the rest): three disjoint sets, the first two the same for every run.
Training never reads a test block; only a run with --eval_test=True evaluates on them, once, at
the end (stage 2 of the tuning protocol, analysis/tuning.py).
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import record
from config import ConfigError, TrainConfig
from model import IGNORE_INDEX  # (a batch's unscored target; its home is the loss, model.py)
from record import one_line

VALIDATION_SPLIT_SEED = 20260101  # fixed: the validation and test sets must not depend on the run's seed
CACHE_FORMAT = 1  # bump when the tokenization code changes what it produces


# --- tokenizer ---------------------------------------------------------------------------------

def load_tokenizer(cfg: TrainConfig):
    """A `transformers` fast tokenizer from a tokenizer.json file or a hub name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(cfg.tokenizer)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"--tokenizer={cfg.tokenizer}: no such file")
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    try:
        return AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer={cfg.tokenizer}: cannot load it ({one_line(err, 300)})") from None


# --- the token stream, cached ------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_identity(cfg: TrainConfig) -> dict:
    """What determines the tokens: content hashes for local files, names for hub sources."""
    dataset, tokenizer = Path(cfg.dataset), Path(cfg.tokenizer)
    if dataset.is_file():
        data_id = _file_digest(dataset)
    elif dataset.is_dir():
        files = sorted(p for p in dataset.rglob("*") if p.is_file())
        data_id = hashlib.sha256("".join(f"{p.relative_to(dataset)}:{p.stat().st_size}:{p.stat().st_mtime_ns};"
                                         for p in files).encode()).hexdigest()
    else:
        data_id = cfg.dataset
    return {
        "format": CACHE_FORMAT, "dataset": data_id, "dataset_config": cfg.dataset_config,
        "split": cfg.dataset_split, "revision": cfg.dataset_revision, "text_column": cfg.text_column,
        "max_documents": cfg.max_documents,
        "tokenizer": _file_digest(tokenizer) if tokenizer.is_file() else cfg.tokenizer,
    }


def load_texts(cfg: TrainConfig):
    """The documents as a `datasets` dataset (or a streamed iterable of the first max_documents)."""
    from datasets import load_dataset, load_from_disk

    path = Path(cfg.dataset)
    if cfg.dataset_revision is not None and path.exists():
        raise ConfigError(f"--dataset_revision={cfg.dataset_revision}: only hub datasets have revisions, "
                          f"--dataset={cfg.dataset} is a local path")
    if path.is_file():
        if not path.name.endswith((".txt", ".txt.gz")):
            raise ConfigError(f"--dataset={cfg.dataset}: a file must be .txt or .txt.gz")
        check_text_file(path)
        return load_dataset("text", data_files=str(path), split="train", cache_dir=str(Path(cfg.cache_dir) / "hf"))
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
            return loaded[cfg.dataset_split] if hasattr(loaded, "keys") else loaded
        try:
            return load_dataset(str(path), cfg.dataset_config, split=cfg.dataset_split,
                                cache_dir=str(Path(cfg.cache_dir) / "hf"))
        except FileNotFoundError as err:  # datasets' "no (supported) data files" errors
            raise ConfigError(f"--dataset={cfg.dataset}: a directory without a dataset in it ({one_line(err, 300)})") from None
    if looks_like_path(cfg.dataset):
        raise ConfigError(f"--dataset={cfg.dataset}: no such file or directory")
    # No trust_remote_code: datasets 5 runs no loading scripts (it logs an error and drops the
    # argument), so a script-based hub dataset fails below whatever we pass.
    try:
        stream = load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split, streaming=True,
                              revision=cfg.dataset_revision)
    except Exception as err:  # offline, unknown name, bad config name: all end the same way
        raise ConfigError(f"--dataset={cfg.dataset}: cannot load it from the hub ({one_line(err, 300)})") from None
    return stream.take(cfg.max_documents) if cfg.max_documents else stream


def looks_like_path(name: str) -> bool:
    """A hub name is `name` or `owner/name`; anything else that does not exist is a missing path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.endswith((".txt", ".gz", ".json", ".jsonl", ".parquet", ".csv")))


def check_text_file(path: Path) -> None:
    """Refuse an empty, unreadable or non-UTF-8 corpus with one clear line."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            while chunk := f.read(1 << 20):
                if chunk.strip():
                    break
            else:
                raise ConfigError(f"--dataset={path}: the file holds no text")
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError as err:
        raise ConfigError(f"--dataset={path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError) as err:
        raise ConfigError(f"--dataset={path}: cannot read it ({one_line(err, 300)})") from None


def tokenize(cfg: TrainConfig) -> np.ndarray:
    """All documents as one token stream, each document followed by the end-of-text token."""
    tokenizer = load_tokenizer(cfg)
    texts = load_texts(cfg)
    columns = texts.column_names or []
    if cfg.text_column not in columns and columns:
        raise ConfigError(f"--text_column={cfg.text_column}: the dataset has columns {', '.join(columns)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"--tokenizer={cfg.tokenizer}: it has no end-of-text token to separate documents")

    def encode(batch):
        ids = tokenizer([t for t in batch[cfg.text_column] if t and t.strip()], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    encoded = texts.map(encode, batched=True, remove_columns=columns or None)
    pieces = [np.asarray(ids, dtype=dtype) for row in encoded.iter(batch_size=1000) for ids in row["ids"]]
    if not pieces:
        raise ConfigError(f"--dataset={cfg.dataset}: no text in column {cfg.text_column!r}")
    return np.concatenate(pieces)


def token_cache_paths(cfg: TrainConfig) -> tuple[Path, Path]:
    """The cached token stream (.npy) and its description (.json): all a run needs on a cache hit
    (no `datasets`, no tokenizer), so these two files are what a machine without them is sent."""
    identity = source_identity(cfg)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cfg.cache_dir) / f"tokens-{key}.npy"
    return cache, cache.with_suffix(".json")


def load_tokens(cfg: TrainConfig) -> tuple[np.ndarray, int]:
    """(the token stream, the tokenizer's vocabulary size), from the cache when it is there."""
    identity = source_identity(cfg)
    cache, meta = token_cache_paths(cfg)
    if cache.exists() and meta.exists():
        return np.load(cache, mmap_mode="r"), json.loads(meta.read_text())["vocab_size"]
    tokens = tokenize(cfg)
    vocab_size = len(load_tokenizer(cfg))
    cache.parent.mkdir(parents=True, exist_ok=True)
    # temp file + rename: a concurrent run or a kill never leaves a half-written cache behind
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cache)
    tmp_meta = meta.with_name(f"{meta.stem}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps({**identity, "vocab_size": vocab_size, "tokens": int(len(tokens))}))
    os.replace(tmp_meta, meta)
    return tokens, vocab_size


# --- what frequencies alone predict: the n-gram baselines --------------------------------------

NGRAM_FORMAT = 1  # bump when ngram_losses changes what it computes (the cache beside the tokens)
UNIGRAM_ALPHA = 1.0  # add-one (Laplace) smoothing of the unigram


def ngram_losses(train_blocks: np.ndarray, val_inputs: np.ndarray, val_targets: np.ndarray,
                 vocab_size: int) -> dict:
    """The mean cross-entropy (nats) of the validation targets under the training blocks' own
    unigram and bigram counts: what a model that knows only token frequencies (unigram) or only
    the previous token (bigram) would score, on the tokens val/loss scores.

    Counts come from what training predicts: every (previous token, token) pair inside a training
    block, i.e. its tokens but the first, each with the token before it. Smoothing, both standard:
      unigram  P(w) = (c(w) + 1) / (N + V)                  add-one (Laplace) over the V = vocab_size tokens
      bigram   P(w | v) = (c(v, w) + T(v) P(w)) / (c(v) + T(v))   Witten-Bell, interpolated with P(w)
    where c(v) counts v as a previous token and T(v) the distinct tokens seen after it (a v never
    seen as a previous token, T(v) = 0, gets P(w)). A validation target at IGNORE_INDEX is not scored.
    """
    blocks = np.asarray(train_blocks, dtype=np.int64)
    previous, following = blocks[:, :-1].ravel(), blocks[:, 1:].ravel()
    unigram = (np.bincount(following, minlength=vocab_size) + UNIGRAM_ALPHA) / (len(following) + UNIGRAM_ALPHA * vocab_size)
    pairs, pair_counts = np.unique(previous * vocab_size + following, return_counts=True)  # sorted codes
    context_counts = np.bincount(previous, minlength=vocab_size)  # c(v)
    successors = np.bincount(pairs // vocab_size, minlength=vocab_size)  # T(v)

    inputs, targets = np.asarray(val_inputs, dtype=np.int64).ravel(), np.asarray(val_targets, dtype=np.int64).ravel()
    scored = targets != IGNORE_INDEX
    inputs, targets = inputs[scored], targets[scored]
    codes = inputs * vocab_size + targets
    where = np.minimum(np.searchsorted(pairs, codes), len(pairs) - 1)
    seen = np.where(pairs[where] == codes, pair_counts[where], 0)
    p_unigram = unigram[targets]
    p_bigram = np.where(context_counts[inputs] > 0,
                        (seen + successors[inputs] * p_unigram) / np.maximum(context_counts[inputs] + successors[inputs], 1),
                        p_unigram)
    return {record.DATA_UNIGRAM_LOSS: float(-np.log(p_unigram).mean()),
            record.DATA_BIGRAM_LOSS: float(-np.log(p_bigram).mean())}


def cached_ngram_losses(cfg: TrainConfig, train_blocks: np.ndarray, val_pairs: list, vocab_size: int) -> dict:
    """ngram_losses, computed once per token cache and split: cached as JSON beside the token cache,
    under its key plus a digest of the split itself (the training blocks' and the scored validation
    examples' tokens), so every run of a sweep reads the one file."""
    val_inputs = np.concatenate([inputs.numpy() for inputs, _ in val_pairs])
    val_targets = np.concatenate([targets.numpy() for _, targets in val_pairs])
    digest = hashlib.sha256(f"{NGRAM_FORMAT}:{vocab_size}:{train_blocks.shape}".encode())
    for array in (train_blocks, val_inputs, val_targets):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    tokens, _ = token_cache_paths(cfg)
    path = tokens.with_name(f"{tokens.stem}.ngram-{digest.hexdigest()[:16]}.json")
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # a damaged cache is recomputed, not trusted
            pass
    losses = ngram_losses(train_blocks, val_inputs, val_targets, vocab_size)
    try:
        record.write_json_atomic(path, losses)
    except OSError:  # an unwritable cache directory costs a recomputation next time, nothing else
        pass
    return losses


# --- blocks and batches ------------------------------------------------------------------------

@dataclass
class Batches:
    """Training, validation and test blocks, and the deterministic order in which training uses them."""
    blocks: torch.Tensor  # (n_blocks, seq_len + 1), int64
    train_ids: torch.Tensor  # block indices for training
    val_ids: torch.Tensor  # block indices for validation
    test_ids: torch.Tensor  # block indices held out for the final comparison (never trained on)
    batch_size: int
    seed: int
    _orders: dict = field(default_factory=dict, repr=False)  # {epoch: shuffled ids}, the current one

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of 0-based `step` as (inputs, targets): the same for every variant and
        every process count. Epoch e walks the training blocks in a permutation seeded by (seed, e)."""
        per_epoch = len(self.train_ids) // self.batch_size
        epoch, index = divmod(step, per_epoch)
        chosen = self.epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return next_token_pair(self.blocks[chosen])

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The training block ids of one epoch, shuffled once per epoch rather than once per step."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: self.train_ids[torch.randperm(len(self.train_ids), generator=generator)]}
        return self._orders[epoch]

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next_token_pair(self.blocks[self.val_ids[index * self.batch_size:(index + 1) * self.batch_size]])

    def test_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next_token_pair(self.blocks[self.test_ids[index * self.batch_size:(index + 1) * self.batch_size]])

    def at_length(self, length: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch `index` at a context of `length` tokens (--eval_lengths): (inputs, targets),
        each (batch_size, length). Example j is validation blocks k*j .. k*j + k - 1 (in validation
        order, k = ceil((length + 1) / (seq_len + 1))) laid end to end and cut to length + 1 tokens, so
        every token is a validation token and none of a training block; at length seq_len it is the
        ordinary validation block. The blocks are not neighbours in the corpus, so past seq_len a
        position's context holds earlier, unrelated validation passages: this measures whether a
        model keeps working at positions it was never trained at, not what a longer context adds."""
        per_example = -(-(length + 1) // self.blocks.shape[1])
        examples = len(self.val_ids) // per_example
        first, last = index * self.batch_size, (index + 1) * self.batch_size
        if last > examples:
            raise ConfigError(f"--eval_lengths={length}: the {len(self.val_ids)} validation blocks make {examples} "
                              f"examples of {length} tokens, fewer than batch {index + 1} of {self.batch_size} needs "
                              f"(raise --val_fraction or lower --eval_batches)")
        ids = self.val_ids[first * per_example:last * per_example].view(self.batch_size, per_example)
        return next_token_pair(self.blocks[ids].flatten(1)[:, :length + 1])


def next_token_pair(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (B, T + 1) -> (inputs, targets), each (B, T): every position scored, its target the next token.
    Every batch is such a pair; a task's (tasks.py) has IGNORE_INDEX targets where nothing is scored."""
    return blocks[:, :-1], blocks[:, 1:]


def make_batches(tokens: np.ndarray, cfg: TrainConfig) -> Batches:
    block = cfg.seq_len + 1
    n_blocks = len(tokens) // block
    n_val = max(cfg.eval_batches * cfg.batch_size, int(n_blocks * cfg.val_fraction))
    # as large as the validation set, so a test evaluation reads as many batches as a validation one
    n_test = max(cfg.eval_batches * cfg.batch_size, int(n_blocks * cfg.test_fraction)) if cfg.test_fraction else 0
    if n_blocks - n_val - n_test < cfg.batch_size:
        raise ConfigError(
            f"--dataset={cfg.dataset}: {len(tokens):,} tokens make {n_blocks} blocks of seq_len+1={block}, "
            f"too few for {n_val} validation and {n_test} test blocks plus one training batch of {cfg.batch_size}")
    blocks = torch.from_numpy(np.asarray(tokens[:n_blocks * block], dtype=np.int64).reshape(n_blocks, block))
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
    return Batches(blocks=blocks, train_ids=order[n_val + n_test:].sort().values,
                   val_ids=order[:n_val].sort().values, test_ids=order[n_val:n_val + n_test].sort().values,
                   batch_size=cfg.batch_size, seed=cfg.seed)
