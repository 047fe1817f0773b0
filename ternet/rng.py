"""Named, seeded random streams: host-side key derivation for the counter-based generator.

A key is a uint64 made from (seed, stream name, counter). Kernels draw
ternet.kernels.scalar.uniform(key, index); numpy generators for the host (initialisation,
shuffling, augmentation) are seeded from the same (seed, name, counter) triple. Nothing here keeps
state, so a checkpoint only needs the seed and the step counter to reproduce every draw.
"""
import zlib

import numpy as np

_MASK = (1 << 64) - 1


def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def stream_base(seed, name):
    """The stream's key before its counters (an int): stream_key(seed, name, t, i) is
    SplitMix64(SplitMix64(base ^ t) ^ i), which the GPU computes from it too
    (kernels.transitions.step_keys)."""
    return _splitmix64(_splitmix64(int(seed) & _MASK) ^ zlib.crc32(name.encode()))


def stream_key(seed, name, *counters):
    """uint64 key for the stream `name` of run seed `seed` at the given counters (e.g. step)."""
    z = stream_base(seed, name)
    for c in counters:
        z = _splitmix64(z ^ (int(c) & _MASK))
    return np.uint64(z)


def generator(seed, name, *counters):
    """A numpy Generator for the host-side stream `name` at the given counters."""
    return np.random.Generator(np.random.PCG64(int(stream_key(seed, name, *counters))))
