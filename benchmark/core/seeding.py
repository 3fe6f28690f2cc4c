"""Seeds derived from a run's seed, and the global RNG states a checkpoint carries."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int):
    """Run a block under torch's global RNG seeded with `seed`, leaving the outer state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
