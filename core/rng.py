"""Counter-based seeds: every random stream in sslrun is keyed by a hash of *where* it is used (seed, epoch, step,
batch, rank, view), never by how many numbers were drawn before.

That is what makes resume exact and augmentations independent of the number of workers: a resumed run, or a run on
another number of ranks, derives the same key for the same sample and draws the same numbers. The hash is the
splitmix64 finaliser (Steele, Lea, Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014): a
bijective 64-bit mix with full avalanche, so neighbouring inputs (step 7, step 8) give unrelated outputs.
:func:`sslrun.core.data.ops.mix64` is the same function compiled with numba for the FFCV pipeline.
"""

from __future__ import annotations

__all__ = ["MASK64", "batch_seed", "mix64", "seed_from", "step_seed"]

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finaliser on Python ints (all arithmetic modulo 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seed_from(seed: int, *parts: int) -> int:
    """A 63-bit generator seed keyed by ``seed`` and ``parts`` (valid for ``torch.Generator.manual_seed``, which
    takes a signed 64-bit value)."""
    h = mix64(seed & MASK64)
    for part in parts:
        h = mix64(h ^ (part & MASK64))
    return h >> 1


def batch_seed(seed: int, epoch: int, batch: int, rank: int, view: int = 0) -> int:
    """Seed of the colour-augmentation generator for one batch of one view on one rank."""
    return seed_from(seed, epoch, batch, rank, view)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of one training step on one rank (pretext masks, permutations). Ranks get different streams for their
    different images; the same (seed, step, rank) always gives the same."""
    return seed_from(seed, step, rank)
