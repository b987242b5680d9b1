"""How an attention module says its parameters start (its `parameter_init`): each parameter a
Normal (drawn), a Constant, or a Drawn rule of its own. model.init_weights does the drawing, each
parameter from its own generator seeded by (seed, the parameter's full name), so a parameter two
variants share starts from the same values in both, whichever kind declares it.
"""
from dataclasses import dataclass
from typing import Callable

import torch


class Init:
    """One parameter's starting values: `draw(shape, generator)` -> a float32 CPU tensor."""

    def draw(self, shape, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Normal(Init):
    """N(0, std^2), from the parameter's own generator."""
    std: float

    def draw(self, shape, generator):
        return torch.empty(shape).normal_(0.0, self.std, generator=generator)


@dataclass(frozen=True)
class Constant(Init):
    """Every value `value` (norm weights 1, biases 0); no draw."""
    value: float

    def draw(self, shape, generator):
        return torch.full(shape, float(self.value))


@dataclass(frozen=True)
class Drawn(Init):
    """Any other rule, `fn(shape, generator)` -> values (e.g. a log-uniform decay rate); it must draw
    from `generator` only, so the values depend on the seed and the name alone."""
    fn: Callable

    def draw(self, shape, generator):
        return self.fn(shape, generator)
