"""The one training configuration: its fields, how `--name=value` arguments become one (exactly
as `wandb agent` passes `${args}`), and the validation that runs before any heavy work.

Defaults are the seed report's "fast" setup and recipe; the data defaults are the embedded corpus.
"""
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from attention.registry import KERNELS, KINDS, KNOBS, VARIANTS, AttentionSpec, kinds_with, knob_help

ROOT = Path(__file__).resolve().parent
DEFAULT_CORPUS = str(ROOT / "corpus" / "corpus.txt.gz")
DEFAULT_TOKENIZER = str(ROOT / "corpus" / "tokenizer.json")

# The knobs a sweep may set to explore between the named variants (attention/registry.py's KNOBS,
# one TrainConfig field each); None keeps the variant's value.
ATTENTION_KNOBS = tuple(KNOBS)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
AUX_LOSS_REDUCTIONS = ("mean", "sum")

# --task: "lm" trains on --dataset; the others are synthetic tasks generated on the fly (tasks.py)
# where only the answer positions are scored. Each task's knobs and their defaults (a knob is a
# TrainConfig field, None by default: the task's value below; a knob the task lacks is refused).
TASKS = {
    "lm": {},
    "mqar": {"task_vocab": 64, "task_pairs": 4, "task_queries": None},  # queries None: one per pair
    "induction": {"task_vocab": 64, "task_segment": 8},
    "selective_copy": {"task_vocab": 64, "task_marked": 8, "task_noise": 1},
}
TASK_KNOBS = ("task_vocab", "task_pairs", "task_queries", "task_segment", "task_marked", "task_noise")

# A recipe is a preset: it sets these fields unless the command line (or the sweep, which passes
# its values on the command line) sets them too. "default" is ours (README: "Where this deliberately
# differs from the seed's recipe"); "seed" is the seed's exact model and optimisation
# (vukrosic/blueberry-llm-kimi-deepseek b61d942: embeddings x sqrt(d_model), 0.01 x the balance
# loss summed over layers, dropout inside each expert and after the final norm, every Linear at
# std 0.02, no gradient clipping). The resolved values are what the record and W&B config show.
RECIPES = {
    "default": {},
    "seed": {"embed_scale": True, "aux_loss_reduction": "sum", "expert_dropout": 0.1, "final_dropout": 0.1,
             "init_residual_scaling": False, "grad_clip": 0.0},
}


class ConfigError(ValueError):
    """Bad input: one line naming the value and what is allowed."""


@dataclass
class TrainConfig:
    # what is compared
    attention: str = "baseline"
    seed: int = 0
    # the model (the seed's 512d / 8L / 8H / 2048ff MoE)
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int = 2048
    n_experts: int = 8
    top_k: int = 2
    vocab_size: int | None = None  # None: the tokenizer's
    seq_len: int = 512
    dropout: float = 0.1
    router_noise_std: float = 0.1
    aux_loss_weight: float = 0.01
    rope_theta: float = 10000.0
    # recipe knobs (--recipe=seed sets them to the seed's values; see RECIPES)
    recipe: str = "default"
    embed_scale: bool = False  # token embeddings x sqrt(d_model)
    aux_loss_reduction: str = "mean"  # the per-layer balance losses: mean, or sum (the seed)
    expert_dropout: float = 0.0  # inside each expert, after SiLU
    final_dropout: float = 0.0  # after the final norm, before the LM head
    init_residual_scaling: bool = True  # o_proj/down_proj start at 0.02/sqrt(2 n_layers) instead of 0.02
    # attention knobs, overriding the named variant's values when given: one field per entry of
    # attention/registry.py's KNOBS, typed `cli_type | None` (None: the variant's value)
    for _knob in KNOBS.values():
        __annotations__[_knob.name] = (_knob.cli_type or _knob.type) | None
        vars()[_knob.name] = None
    del _knob
    # the recipe (the seed's: AdamW 1e-4, wd 0.01, 50 steps of batch 16, eval every 10 on 10 batches)
    batch_size: int = 16
    steps: int = 50
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine schedule's floor, as a fraction of lr
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 10
    eval_batches: int = 10
    eval_test: bool = False  # evaluate on the test set once, after the last step (stage 2 only)
    # context lengths to evaluate at after training, "128,256" (one length may come as an integer)
    eval_lengths: int | str | None = None
    probes: bool = False  # mechanism probes at each evaluation (probes.py); training steps unchanged
    # stage 2 of the tuning protocol: "variant@lr" sets attention and lr together (analysis/tuning.py)
    variant_lr: str | None = None
    # the task (TASKS above, tasks.py): lm, or a synthetic task and its knobs (None: the task's default)
    task: str = "lm"
    task_vocab: int | None = None
    task_pairs: int | None = None
    task_queries: int | None = None
    task_segment: int | None = None
    task_marked: int | None = None
    task_noise: int | None = None
    # data
    dataset: str = DEFAULT_CORPUS  # a .txt/.txt.gz file, a local dataset directory, or a hub name
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_revision: str | None = None  # hub datasets: a branch, tag or commit; None: the newest
    text_column: str = "text"
    max_documents: int | None = None  # hub datasets: stream only the first N documents
    tokenizer: str = DEFAULT_TOKENIZER  # a tokenizer.json file, or a hub tokenizer name
    trust_remote_code: bool = False
    val_fraction: float = 0.05
    test_fraction: float = 0.05  # held out from training for the final comparison; 0: no test set
    cache_dir: str = str(ROOT / ".cache")
    # runtime
    mixed_precision: str = "auto"  # auto: accelerate launch's choice, else bf16 on CUDA, fp32 on CPU
    compile: bool = False
    attention_kernel: str = "auto"  # how softmax attention runs (attention/kernels.py): the same function
    results_dir: str = "results"
    group: str | None = None  # None: the sweep id under an agent, else "local"
    project: str = "attnsweep"
    checkpoint_every: int = 0
    checkpoint_artifact: bool = False  # W&B: log each checkpoint as an Artifact, restore it on another machine
    resume: bool = False
    dry_run: bool = False

    # --- derived ---------------------------------------------------------------------------

    def attention_spec(self) -> AttentionSpec:
        """The named variant with any knob overrides applied, and its sizes resolved (integers); a
        hybrid's interval as it is at --n_layers (AttentionSpec.interval_at), so the record shows the
        pattern the model has."""
        changes = {}
        for name in ATTENTION_KNOBS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = KNOBS[name].aliases.get(value, value) if isinstance(value, str) else value
        spec = VARIANTS[self.attention]
        if spec.full_attention and not spec.hybrid_problem():
            changes["full_attention_interval"] = spec.interval_at(self.n_layers)
        return spec.with_overrides(**changes).resolved(self.d_model, self.n_heads, self.seq_len)

    @property
    def lengths(self) -> tuple[int, ...]:
        """--eval_lengths as integers, ascending, each once ("256,128" -> (128, 256)); () for None."""
        if self.eval_lengths is None:
            return ()
        words = [word.strip() for word in str(self.eval_lengths).split(",")]
        if not all(word.isdigit() and int(word) > 0 for word in words):
            raise ConfigError(f"--eval_lengths={self.eval_lengths}: expected context lengths, integers greater "
                              f"than 0 separated by commas, e.g. 128,256")
        return tuple(sorted({int(word) for word in words}))

    @property
    def family(self) -> str:
        return VARIANTS[self.attention].family

    @property
    def run_name(self) -> str:
        return f"{self.attention}-s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def task_settings(self) -> dict:
        """The task's knobs with its defaults filled in ({} for lm); mqar's queries default to its pairs."""
        settings = {name: getattr(self, name) if getattr(self, name) is not None else default
                    for name, default in TASKS[self.task].items()}
        if self.task == "mqar" and settings["task_queries"] is None:
            settings["task_queries"] = settings["task_pairs"]
        return settings

    # --- validation ------------------------------------------------------------------------

    def validate(self) -> "TrainConfig":
        """Raise ConfigError on the first bad value; returns self so calls chain."""
        if self.attention not in VARIANTS:
            raise ConfigError(f"unknown attention variant {self.attention!r}{did_you_mean(self.attention, VARIANTS)}; "
                              f"allowed: {', '.join(VARIANTS)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name}={value}: must be a finite number")
        positive = ["d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k", "seq_len", "batch_size",
                    "steps", "eval_every", "eval_batches", "vocab_size", "max_documents", "rope_theta"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name}={value}: must be greater than 0")
        non_negative = ["lr", "weight_decay", "warmup_steps", "grad_clip", "checkpoint_every",
                        "router_noise_std", "aux_loss_weight"]
        for name in non_negative:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name}={value}: must be 0 or greater")
        for name in ("dropout", "expert_dropout", "final_dropout", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be between 0 and 1")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val_fraction={self.val_fraction}: must be between 0 and 1 (exclusive)")
        if not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"--test_fraction={self.test_fraction}: must be 0 or more, and below 1 together "
                              f"with --val_fraction={self.val_fraction}")
        if self.eval_test and not self.test_fraction:
            raise ConfigError("--eval_test=True needs a test set: --test_fraction must be greater than 0")
        if self.d_model % self.n_heads:
            raise ConfigError(f"--d_model={self.d_model} is not divisible by --n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"--top_k={self.top_k} exceeds --n_experts={self.n_experts}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"--mixed_precision={self.mixed_precision}: allowed: {', '.join(MIXED_PRECISION)}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"--recipe={self.recipe}: allowed: {', '.join(RECIPES)}")
        if self.aux_loss_reduction not in AUX_LOSS_REDUCTIONS:
            raise ConfigError(f"--aux_loss_reduction={self.aux_loss_reduction}: allowed: {', '.join(AUX_LOSS_REDUCTIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr_schedule={self.lr_schedule}: allowed: {', '.join(LR_SCHEDULES)}")
        if self.attention_kernel not in KERNELS:
            raise ConfigError(f"--attention_kernel={self.attention_kernel}: allowed: {', '.join(KERNELS)}")
        self.lengths  # parsing --eval_lengths is its validation: a bad value raises here
        self._validate_attention()
        self._validate_task()
        return self

    def _validate_task(self) -> None:
        """A known task; each knob given belongs to it and is positive; lm's data settings are not
        given to a task (it reads no corpus, its vocabulary is --task_vocab); the example fits seq_len."""
        if self.task not in TASKS:
            raise ConfigError(f"--task={self.task}: allowed: {', '.join(TASKS)}")
        for name in TASK_KNOBS:
            value = getattr(self, name)
            if value is None:
                continue
            if value <= 0:
                raise ConfigError(f"--{name}={value}: must be greater than 0")
            if name not in TASKS[self.task]:
                having = " or ".join(task for task, knobs in TASKS.items() if name in knobs)
                raise ConfigError(f"--{name}={value}: only --task={having} has it, not --task={self.task}")
        if self.task == "lm":
            return
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("vocab_size", "dataset", "dataset_config", "tokenizer", "max_documents", "dataset_revision"):
            if getattr(self, name) != defaults[name]:
                raise ConfigError(f"--{name}={getattr(self, name)}: --task={self.task} reads no corpus or tokenizer "
                                  f"(its vocabulary is --task_vocab)")
        problem = task_problem(self.task, self.task_settings(), self.seq_len)
        if problem:
            raise ConfigError(problem)

    def _validate_attention(self) -> None:
        """Each knob given: its rule, and that the variant's kind has it (refused, not ignored);
        then what the kind refuses of the resolved combination (attention/registry.py)."""
        kind = KINDS[VARIANTS[self.attention].kind]
        problem = VARIANTS[self.attention].hybrid_problem()
        if problem:
            raise ConfigError(problem)
        for name in ATTENTION_KNOBS:
            value = getattr(self, name)
            if value is None:
                continue
            problem = KNOBS[name].rule and KNOBS[name].rule(value)  # a bad value alone first
            if problem:
                raise ConfigError(f"--{name}={value}: {problem}")
            if name not in kind.knobs:
                having = " or ".join(KINDS[k].label for k in kinds_with(name))
                raise ConfigError(f"--{name}={value}: only {having} variants have it, not --attention={self.attention}")
        spec = self.attention_spec()
        for name in kind.knobs:  # resolved values too: a head dim filled in from d_model/n_heads must be even
            value = getattr(spec, name)
            problem = value is not None and KNOBS[name].rule and KNOBS[name].rule(value)
            if problem:
                raise ConfigError(f"--{name}={value}: {problem}")
        problem = kind.refuse(spec, self.d_model // self.n_heads, self.n_heads)
        if problem:
            raise ConfigError(problem)
        with_sinks_or_cap = [s for s in (spec, spec.full_attention and VARIANTS[spec.full_attention])
                     if s and (s.attention_sinks or s.attn_softcap)]
        if self.attention_kernel == "sdpa" and with_sinks_or_cap:
            raise ConfigError(f"--attention_kernel=sdpa: SDPA has no attention sinks or soft-cap, which "
                              f"--attention={self.attention} has; use auto, explicit or flex")
        if spec.full_attention:  # a hybrid: its full layers' variant must fit this size too
            full = VARIANTS[spec.full_attention].resolved(self.d_model, self.n_heads, self.seq_len)
            problem = KINDS[full.kind].refuse(full, self.d_model // self.n_heads, self.n_heads)
            if problem:
                raise ConfigError(f"--attention={self.attention}: its full-attention layers ({full.name}): {problem}")


def task_problem(task: str, settings: dict, seq_len: int) -> str | None:
    """Why a task's example cannot be built at this length and vocabulary (tasks.py's layouts), or None."""
    vocab = settings["task_vocab"]
    if task == "mqar":
        pairs, queries = settings["task_pairs"], settings["task_queries"]
        if queries > pairs:
            return f"--task_queries={queries}: at most --task_pairs={pairs} (each query asks a different key)"
        if pairs > (vocab - 1) // 2:
            return (f"--task_pairs={pairs}: at most {(vocab - 1) // 2} distinct keys with --task_vocab={vocab} "
                    f"(token 0 is filler, keys and values split the rest)")
        if 2 * pairs + queries > seq_len:
            return f"--seq_len={seq_len}: mqar needs 2 x task_pairs + task_queries = {2 * pairs + queries} positions"
    if task == "induction":
        segment = settings["task_segment"]
        if segment < 2:
            return f"--task_segment={segment}: must be at least 2 (its first token only cues the rest)"
        if 2 * segment > seq_len:
            return f"--seq_len={seq_len}: induction needs 2 x task_segment = {2 * segment} positions"
        if vocab < 2:
            return f"--task_vocab={vocab}: must be at least 2"
    if task == "selective_copy":
        marked, noise = settings["task_marked"], settings["task_noise"]
        if vocab < noise + 3:
            return (f"--task_vocab={vocab}: selective_copy needs at least task_noise + 3 = {noise + 3} tokens "
                    f"(a separator, the noise tokens, two or more data tokens)")
        if 2 * marked + 1 > seq_len:
            return f"--seq_len={seq_len}: selective_copy needs 2 x task_marked + 1 = {2 * marked + 1} positions"
    return None


# --- what each option means -------------------------------------------------------------------

# One line per TrainConfig field, in the groups `python train.py --help` and README's option table
# show (both are rendered from here; tests/test_config.py fails on a field without its line). A new
# option is its field above plus one line here.
OPTION_HELP = {
    "model": {
        "d_model": "width of the residual stream",
        "n_layers": "number of transformer blocks",
        "n_heads": "attention heads per block (d_model must divide by it)",
        "d_ff": "hidden width of each expert's feed-forward network",
        "n_experts": "experts in each block's mixture-of-experts FFN",
        "top_k": "experts each token is routed to",
        "vocab_size": "embedding rows; None: the tokenizer's size (must not be smaller)",
        "seq_len": "tokens per training sequence",
        "dropout": "dropout on embeddings, attention and block outputs (0 to 1)",
        "router_noise_std": "std of the noise added to router logits while training",
        "rope_theta": "RoPE base frequency",
    },
    "attention": {
        "attention": "the attention variant compared (see the list below)",
        **{name: knob_help(name) for name in KNOBS},  # the knobs' lines live in attention/registry.py
    },
    "recipe": {
        "recipe": "a preset: default (ours) or seed (the seed's exact model and optimisation; see below)",
        "embed_scale": "multiply token embeddings by sqrt(d_model) (the seed does)",
        "aux_loss_reduction": "the per-layer balance losses: mean (ours) or sum over layers (the seed's)",
        "expert_dropout": "dropout inside each expert, after SiLU (0 to 1; the seed: 0.1)",
        "final_dropout": "dropout after the final norm, before the LM head (0 to 1; the seed: 0.1)",
        "init_residual_scaling": "o_proj/down_proj start at std 0.02/sqrt(2 n_layers) instead of 0.02",
        "batch_size": "sequences per optimizer step, over all processes together",
        "steps": "optimizer steps",
        "lr": "AdamW peak learning rate",
        "weight_decay": "AdamW weight decay",
        "lr_schedule": "constant or cosine, after the warmup",
        "warmup_steps": "linear warmup steps from 0 to lr",
        "min_lr_ratio": "the cosine schedule's floor, as a fraction of lr",
        "grad_clip": "clip the gradient norm to this; 0 disables clipping",
        "aux_loss_weight": "weight of the MoE load-balancing loss",
        "eval_every": "evaluate on the validation set every N steps (and after the last)",
        "eval_batches": "validation batches per evaluation (the same for every run)",
        "eval_test": "after the last step, evaluate once on eval_batches test batches (test/loss); tuning's stage 2",
        "eval_lengths": "after the last step, evaluate eval_batches validation batches at each of these context "
                        "lengths, e.g. 128,256 (val_len128/loss, ..); None: none",
        "probes": "at each evaluation, measure attention entropy/sink/max logit, residual max/kurtosis, "
                  "expert load, gate openness (probe/*; evaluation batches only)",
        "variant_lr": "'variant@lr', e.g. rope_small@0.003: sets attention and lr together (tuning's stage 2)",
    },
    "task": {
        "task": "lm (next-token training on --dataset) or a synthetic task scored on its answers only: "
                "mqar, induction, selective_copy (tasks.py)",
        "task_vocab": "a task's vocabulary, which is the model's (None: 64)",
        "task_pairs": "mqar: key-value pairs per example (None: 4)",
        "task_queries": "mqar: keys queried after the pairs, each a different one, at random later positions "
                        "(None: one per pair)",
        "task_segment": "induction: length of the random segment that is repeated (None: 8)",
        "task_marked": "selective_copy: marked tokens to copy, in order (None: 8)",
        "task_noise": "selective_copy: distinct noise tokens around the marked ones (None: 1)",
    },
    "data": {
        "dataset": "a .txt/.txt.gz file, a local dataset directory, or a hub dataset name (streamed)",
        "dataset_config": "the dataset's configuration (subset) name",
        "dataset_split": "the split to read",
        "dataset_revision": "hub datasets: pin a branch, tag or commit; None: the newest",
        "text_column": "the column holding the text",
        "max_documents": "hub datasets: read only the first N documents; None: all",
        "tokenizer": "a tokenizer.json file or a hub tokenizer name",
        "trust_remote_code": "hub tokenizers only: run the tokenizer's own Python code (off by default)",
        "val_fraction": "fraction of the token blocks held out for validation (0 to 1)",
        "test_fraction": "fraction held out as the test set, never trained on (0: none; seed-independent)",
        "cache_dir": "where tokenized data is cached",
    },
    "run": {
        "seed": "initial weights, data order, dropout; all variants of a seed see the same data and init",
        "mixed_precision": "auto (the launcher's choice, else bf16 on CUDA, fp32 on CPU), no, bf16 or fp16",
        "compile": "torch.compile the model",
        "attention_kernel": "how attention is computed, the same function on each: auto (sdpa, or explicit with "
                            "sinks or a soft-cap), sdpa, explicit (materialised scores) or flex (FlexAttention)",
        "results_dir": "where the run's JSON record, checkpoints and offline W&B runs go",
        "checkpoint_every": "save a resumable checkpoint every N steps; 0: only when stopped by a signal",
        "checkpoint_artifact": "also log each checkpoint as a W&B Artifact; a requeued run restores it on another machine",
        "resume": "continue from this run's checkpoint",
        "dry_run": "print the model's sizes and FLOPs as JSON and exit (needs --vocab_size; no data)",
    },
    "W&B": {
        "project": "the W&B project",
        "group": "the W&B group and results subdirectory; None: the sweep id under an agent, else local",
    },
}


def _shown_default(value) -> str:
    """A default as the user would type it; paths inside the repository relative to it, so the
    README's table is the same on every machine."""
    text = str(value)
    return text[len(str(ROOT)) + 1:] if text.startswith(str(ROOT) + "/") else text


def option_rows() -> list[tuple[str, str, str, str]]:
    """(group, name, default, description) for every option, in help order."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return [(group, name, _shown_default(defaults[name]), text)
            for group, options in OPTION_HELP.items() for name, text in options.items()]


def help_text() -> str:
    lines = ["usage: python train.py [--name=value ...]",
             "Booleans are True/False; a bare --flag means True. Defaults in brackets."]
    for group in OPTION_HELP:
        lines += ["", f"{group}:"]
        for _, name, default, text in (row for row in option_rows() if row[0] == group):
            lines.append(f"  --{name:<20} {text} [{default}]")
    lines += ["", "recipes (presets; an option given explicitly wins over its recipe's value):"]
    for name, preset in RECIPES.items():
        lines.append(f"  --recipe={name}: " + (" ".join(f"--{k}={v}" for k, v in preset.items())
                                              or "the defaults above"))
    lines += ["", f"attention variants: {', '.join(VARIANTS)}"]
    return "\n".join(lines)


def options_markdown() -> str:
    """README's option table, rendered from OPTION_HELP (`python config.py --markdown`)."""
    lines = ["| group | option | default | what it sets |", "|---|---|---|---|"]
    for group, name, default, text in option_rows():
        cell = text.replace("|", "\\|")  # a pipe would end the cell
        lines.append(f"| {group} | `--{name}` | `{default}` | {cell} |")
    return "\n".join(lines)


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """" (did you mean --X?)" for a likely misspelling (difflib's closest match), else nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def unknown_option(name: str) -> ConfigError:
    return ConfigError(f"unknown option --{name}{did_you_mean(name, FIELD_TYPES, '--')}; "
                       f"`python train.py --help` lists them all")


# --- parsing `--name=value` ---------------------------------------------------------------------

FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _allowed_types(annotation) -> tuple:
    """`int | str | None` -> (int, str, NoneType); a plain `int` -> (int,)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _parse_bool(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ValueError


def parse_value(name: str, text) -> object:
    """Turn one value (a string from the command line, or already typed from a sweep's YAML)
    into the field's type, or raise ConfigError naming it."""
    allowed = _allowed_types(FIELD_TYPES[name])
    if text is None or (isinstance(text, str) and text.lower() in ("none", "null") and type(None) in allowed):
        if type(None) in allowed:
            return None
    parsers = {bool: _parse_bool, int: int, float: float, str: str}
    for kind in (bool, int, float, str):  # most specific first: "1" for an int|str field is an int
        if kind not in allowed:
            continue
        if not isinstance(text, str):
            if kind is float and isinstance(text, int) and not isinstance(text, bool):
                return float(text)
            if isinstance(text, kind) and not (kind is int and isinstance(text, bool)):
                return text
            continue
        try:
            return parsers[kind](text)
        except ValueError:
            continue
    expected = " or ".join({bool: "True/False", int: "an integer", float: "a number", str: "text",
                            type(None): "None"}[k] for k in allowed)
    raise ConfigError(f"--{name}={text}: expected {expected}")


def parse_args(argv: list[str]) -> dict:
    """`--name=value`, `--name value` and a bare `--flag` (true) -> {name: typed value}."""
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; arguments look like --name=value")
        name, has_value, text = arg[2:].partition("=")
        if name not in FIELD_TYPES:
            raise unknown_option(name)
        if not has_value:
            is_flag = bool in _allowed_types(FIELD_TYPES[name])
            if is_flag and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                text = "True"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i, text = i + 1, argv[i + 1]
            else:
                raise ConfigError(f"--{name} needs a value")
        values[name] = parse_value(name, text)
        i += 1
    return values


def split_variant_lr(text: str) -> tuple[str, float]:
    """'rope_small@0.003' -> ("rope_small", 0.003): one sweep value that ties a variant to its own
    learning rate, which a W&B grid over two independent parameters cannot express."""
    variant, at, lr = str(text).partition("@")
    try:
        rate = float(lr)
    except ValueError:
        rate = math.nan
    if not at or not variant or not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"--variant_lr={text}: expected VARIANT@LR, e.g. rope_small@0.003")
    return variant, rate


def config_from_values(values: dict) -> TrainConfig:
    """A validated config from {name: value}; values may be strings or already typed (a sweep)."""
    for name in values:
        if name not in FIELD_TYPES:
            raise unknown_option(name)
    typed = {name: parse_value(name, value) for name, value in values.items()}
    if typed.get("variant_lr") is not None:
        for name, value in zip(("attention", "lr"), split_variant_lr(typed["variant_lr"])):
            if typed.get(name, value) != value:
                raise ConfigError(f"--variant_lr={typed['variant_lr']} disagrees with --{name}={typed[name]}")
            typed[name] = value
    recipe = typed.get("recipe", TrainConfig.recipe)
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe={recipe}: allowed: {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[recipe], **typed}).validate()  # explicit values win over the preset



README_OPTIONS = ("<!-- options: rendered from config.py's OPTION_HELP by `python config.py --readme` -->",
                  "<!-- /options -->")


def readme_with_options(readme: str) -> str:
    """README's text with the table between the README_OPTIONS markers rendered afresh."""
    start, end = README_OPTIONS
    before, _, rest = readme.partition(start + "\n")
    _, found, after = rest.partition(end)
    if not found:
        raise ValueError(f"README.md lacks the markers {start} ... {end}")
    return f"{before}{start}\n{options_markdown()}\n{end}{after}"


if __name__ == "__main__":
    # python config.py --readme: rewrite README.md's option table; --markdown: print it; else --help
    import sys

    if sys.argv[1:] == ["--readme"]:
        readme = ROOT / "README.md"
        readme.write_text(readme_with_options(readme.read_text()))
    else:
        print(options_markdown() if sys.argv[1:] == ["--markdown"] else help_text())
