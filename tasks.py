"""Synthetic tasks where attention matters, generated on the fly and scored on their answers only.

    mqar            multi-query associative recall (Zoology, arXiv 2312.04927): key-value pairs, then
                    queries of those keys at later positions; the answer to a query is its value.
    induction       a random segment, noise, and the segment again (Olsson et al. 2022): each token of
                    the repeat is answered by the segment's next token.
    selective_copy  marked tokens scattered in noise, a separator, then the marked tokens in order
                    (MAD, arXiv 2403.17844): each is answered by the next marked token.

An example is `seq_len` input tokens and as many targets, IGNORE_INDEX (model.py) wherever nothing is
scored, so the loss, accuracy and gradient see only the answers. Training examples are fresh every
step, drawn from a generator seeded by (seed, step): the same batches for every variant of a seed
(data/fingerprint proves it), never a pool to memorise, and a resumed run continues the same
stream. Validation and test examples are fixed streams seeded by constants (the same for every
run); a training example equal to one of them is replaced by a fresh draw, so the three are
disjoint (the test set is also kept out of validation). The layouts, for one example:

    mqar (P pairs, Q queries, vocab V): token 0 is filler, keys come from 1..(V-1)//2 (distinct within
        an example), values from the rest. Positions 0..2P-1 hold k1 v1 ... kP vP; Q distinct keys
        are placed at Q distinct random positions after them, the rest is filler; the target at a
        query is its key's value.
    induction (segment L): every token random in 0..V-1; the segment sits at a random start a in
        [0, seq_len - 2L] and again at the end (seq_len - L ...); the target at position seq_len-L+j
        is segment[j + 1] (j = 0 .. L-2): L-1 answers.
    selective_copy (K marked, N noise tokens): token 0 separates; the first seq_len-K-1 positions are
        noise (tokens 1..N) with K data tokens (N+1..V-1) at random positions, in order; then the
        separator, then the K data tokens. The target at the separator is the first data token, at
        data copy j the (j+1)-th: K answers.
"""
from dataclasses import dataclass, field

import torch

from config import TrainConfig
from model import IGNORE_INDEX

TASK_VALIDATION_SEED = 20260102  # fixed: validation examples must not depend on the run's seed
TASK_TEST_SEED = 20260103
TRAIN_STREAM = 1_000_003  # the training stream's generator: seed * TRAIN_STREAM + step


# --- one batch of each task, from a generator --------------------------------------------------

def _distinct(generator: torch.Generator, rows: int, n: int, k: int) -> torch.Tensor:
    """(rows, k): k distinct values of 0..n-1 per row, in random order."""
    return torch.rand(rows, n, generator=generator).argsort(dim=1)[:, :k]


def mqar(generator: torch.Generator, rows: int, length: int, vocab: int, pairs: int, queries: int):
    n_keys = (vocab - 1) // 2
    keys = 1 + _distinct(generator, rows, n_keys, pairs)
    values = 1 + n_keys + torch.randint(0, vocab - 1 - n_keys, (rows, pairs), generator=generator)
    inputs = torch.zeros(rows, length, dtype=torch.int64)
    inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2] = keys, values
    asked = _distinct(generator, rows, pairs, queries)  # which pairs are queried
    at = 2 * pairs + _distinct(generator, rows, length - 2 * pairs, queries)  # where
    inputs.scatter_(1, at, keys.gather(1, asked))
    targets = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, at, values.gather(1, asked))
    return inputs, targets


def induction(generator: torch.Generator, rows: int, length: int, vocab: int, segment: int):
    inputs = torch.randint(0, vocab, (rows, length), generator=generator)
    repeated = torch.randint(0, vocab, (rows, segment), generator=generator)
    start = torch.randint(0, length - 2 * segment + 1, (rows, 1), generator=generator)
    inputs.scatter_(1, start + torch.arange(segment), repeated)
    inputs[:, length - segment:] = repeated
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, length - segment:length - 1] = repeated[:, 1:]
    return inputs, targets


def selective_copy(generator: torch.Generator, rows: int, length: int, vocab: int, marked: int, noise: int):
    region = length - marked - 1  # noise and data, before the separator
    inputs = torch.randint(1, noise + 1, (rows, length), generator=generator)
    data = torch.randint(noise + 1, vocab, (rows, marked), generator=generator)
    at = _distinct(generator, rows, region, marked).sort(dim=1).values
    inputs.scatter_(1, at, data)
    inputs[:, region] = 0
    inputs[:, region + 1:] = data
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, region:length - 1] = data
    return inputs, targets


GENERATORS = {"mqar": mqar, "induction": induction, "selective_copy": selective_copy}


def generate(task: str, settings: dict, generator: torch.Generator, rows: int, length: int):
    """`rows` examples of `task` at context `length`, drawn from `generator`."""
    knobs = {name.removeprefix("task_"): value for name, value in settings.items()}  # task_vocab -> vocab, ...
    return GENERATORS[task](generator, rows, length, **knobs)


def scaled_settings(task: str, settings: dict, seq_len: int, length: int) -> dict:
    """A task's knobs for examples at another context length: mqar gets proportionally more pairs
    and queries (as many keys as its vocabulary allows); induction and selective_copy keep their
    segment / marked tokens, so their gaps grow with the length."""
    if task != "mqar" or length == seq_len:
        return settings
    scale = length / seq_len
    pairs = max(1, min(round(settings["task_pairs"] * scale), (settings["task_vocab"] - 1) // 2))
    queries = max(1, min(round(settings["task_queries"] * scale), pairs))
    while 2 * pairs + queries > length:  # a shorter context than trained on
        pairs, queries = max(1, pairs - 1), max(1, min(queries, pairs - 1))
    return {**settings, "task_pairs": pairs, "task_queries": queries}


def row_hashes(inputs: torch.Tensor) -> torch.Tensor:
    """One int64 hash per example: a dot product with fixed random int64 weights (wrapping), so
    two different examples share one with probability ~2**-64."""
    weights = torch.randint(-2 ** 62, 2 ** 62, (inputs.shape[1],), generator=torch.Generator().manual_seed(7))
    return (inputs * weights).sum(dim=1)


# --- the batches train.py reads ------------------------------------------------------------------

@dataclass
class TaskBatches:
    """Training batches fresh every step from (seed, step); validation and test batches fixed."""
    task: str
    settings: dict
    seq_len: int
    batch_size: int
    seed: int
    n_heldout: int  # examples in each of the validation and test sets
    val: tuple = field(init=False, repr=False)
    test: tuple = field(init=False, repr=False)
    heldout_hashes: torch.Tensor = field(init=False, repr=False)
    rejected: int = field(init=False, default=0)  # training draws replaced because they were held out

    def __post_init__(self):
        self.val = self._draw(TASK_VALIDATION_SEED, self.n_heldout, torch.empty(0, dtype=torch.int64))
        self.test = self._draw(TASK_TEST_SEED, self.n_heldout, row_hashes(self.val[0]))
        self.heldout_hashes = torch.cat([row_hashes(self.val[0]), row_hashes(self.test[0])])

    def _draw(self, seed: int, rows: int, excluded: torch.Tensor, length: int | None = None):
        """`rows` examples from the stream of `seed`, redrawing any whose hash is in `excluded`."""
        length = length or self.seq_len
        settings = scaled_settings(self.task, self.settings, self.seq_len, length)
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = generate(self.task, settings, generator, rows, length)
        for _ in range(1000):
            clash = torch.isin(row_hashes(inputs), excluded)
            if not clash.any():
                return inputs, targets
            self.rejected += int(clash.sum())
            fresh = generate(self.task, settings, generator, int(clash.sum()), length)
            inputs[clash], targets[clash] = fresh
        raise RuntimeError(f"--task={self.task}: the held-out examples cover nearly every possible example; "
                           f"make the task larger (--task_vocab, seq_len)")

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._draw(self.seed * TRAIN_STREAM + step, self.batch_size, self.heldout_hashes)

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.val[0][rows], self.val[1][rows]

    def test_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.test[0][rows], self.test[1][rows]

    def at_length(self, length: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch `index` at context `length` (scaled_settings: more pairs, longer gaps),
        from a fixed stream per length; examples of another length than training's never equal one."""
        return self._draw(TASK_VALIDATION_SEED * 7919 + length * 100_003 + index, self.batch_size,
                          self.heldout_hashes if length == self.seq_len else torch.empty(0, dtype=torch.int64),
                          length)


def make_task_batches(cfg: TrainConfig) -> TaskBatches:
    return TaskBatches(task=cfg.task, settings=cfg.task_settings(), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                       seed=cfg.seed, n_heldout=cfg.eval_batches * cfg.batch_size)
