"""The CPU kernels' cache of kept-tensor blocks: how much it holds, its bound, releasing it.

The CPU forward keeps tensors for its backward (states, stage values, blended weights; tens
of MB a call at large widths). Blocks of 1 MiB and more freed by the backward are held for
the next call of the same shapes, as a GPU caching allocator does, up to a bound: 64 MiB by
default, ``SPLINET_KEPT_CACHE_MB`` (read at the cache's first use; 0 turns the cache
off), or :func:`set_kept_cache_limit`. The blocks in use by live tensors are not counted.
"""
from __future__ import annotations

import operator

from . import _ext

ENV_VAR = "SPLINET_KEPT_CACHE_MB"


def _stats() -> tuple:
    """(bytes held, blocks held, limit in bytes); zeros without the compiled library."""
    if _ext.LOAD_ERROR is not None:
        return 0, 0, 0
    return _ext._C.kept_cache_stats()


def kept_cache_bytes() -> int:
    """Bytes held by the CPU kernels' cache of kept-tensor blocks: freed blocks of the tensors
    a CPU forward keeps for its backward, held for the next call instead of going back to the
    OS (like the memory ``torch.cuda.memory_reserved()`` counts beyond the allocated).

    Never more than :func:`kept_cache_limit`; 0 without the compiled library.

    Raises:
        ValueError: ``SPLINET_KEPT_CACHE_MB`` is set to something other than a whole
            number of MiB.
    """
    return _stats()[0]


def kept_cache_limit() -> int:
    """The bound, in bytes, on what the kept-tensor cache holds (see :func:`kept_cache_bytes`):
    64 MiB by default (one training step's kept blocks at width 1024, batch 256, 10 steps),
    ``SPLINET_KEPT_CACHE_MB`` MiB when that is set, or the last
    :func:`set_kept_cache_limit`. 0 without the compiled library.

    Raises:
        ValueError: ``SPLINET_KEPT_CACHE_MB`` is not a whole number of MiB.
    """
    return _stats()[2]


def set_kept_cache_limit(nbytes: int) -> None:
    """Sets the bound, in bytes, on what the kept-tensor cache holds, in place of the default
    or ``SPLINET_KEPT_CACHE_MB``; blocks held beyond it are released at once. 0 turns the
    cache off: every block goes back to the OS when its tensor is freed.

    Args:
        nbytes: the bound in bytes, an int >= 0.

    Raises:
        TypeError: nbytes is not an int.
        ValueError: nbytes is negative.
    """
    if isinstance(nbytes, bool):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    try:
        nbytes = operator.index(nbytes)
    except TypeError:
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}") from None
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if _ext.LOAD_ERROR is None:
        _ext._C.set_kept_cache_limit(min(nbytes, 2**64 - 1))


def empty_kept_cache() -> None:
    """Releases every block the kept-tensor cache holds to the OS, like
    ``torch.cuda.empty_cache()``; the bound stays. Tensors still alive (a forward's outputs
    awaiting their backward) keep their blocks, which return to the cache when freed."""
    if _ext.LOAD_ERROR is None:
        _ext._C.empty_kept_cache()


def describe() -> str:
    """One line for ``python -m splinet_cuda info``."""
    try:
        held, blocks, limit = _stats()
    except ValueError as exc:
        return f"kept-tensor cache: {exc}"
    if _ext.LOAD_ERROR is not None:
        return "kept-tensor cache: none (the C++ library did not load)"
    return (f"kept-tensor cache (CPU): {held / 2**20:.1f} MiB held in {blocks} blocks, limit "
            f"{limit / 2**20:g} MiB ({ENV_VAR} or set_kept_cache_limit; 0 turns it off)")
