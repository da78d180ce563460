"""Running a computation one sample at a time, so that a sample's numbers do not depend on its batch.

CPU kernels choose their algorithm, blocking and threading by the shapes and addresses they are
given. Measured on tiny configurations: the oneDNN convolutions of the CNN decoder round
differently for every batch size, the Performer's batched products by the number of matrices
and by where a sample starts in memory, and the encoder's matrix products when one sample has
only a few rows (decoding steps). A sample's estimate logits then differed alone and in a batch
of 3 by up to 1.4e-5 (3.5e-5 in decoding steps), and the grouped top-k, which compares scores
exactly, can decide a near-tie the other way. Run per sample, on aligned memory, every kernel
sees the same shapes and alignment whatever the batch, so at a given thread count a sample is
estimated bitwise alike alone and in any batch (``tests/test_batch_invariance.py``).

The price is one call per sample. In prefill and training each sample's products are large and
the difference was within the noise of a shared 2-core machine; batched decoding steps (a few
rows per sample) pay B times the kernels' fixed cost: one SEA layer's step (9 heads, d=64, 1k
keys, 1 thread) took 21-31 ms at B=8 against 18-21 ms before, 91-135 ms at B=32 against 83-108.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

Result = TypeVar("Result")
ALIGNMENT = 64  # bytes; PyTorch's CPU allocator aligns every new tensor to this


def _aligned(part: Tensor) -> Tensor:
    """``part``, copied to fresh memory when it does not start on an ALIGNMENT boundary: the
    Performer's products rounded differently for a sample that starts mid-batch (measured), and a
    sample inside a batch starts wherever the samples before it end."""
    return part if part.data_ptr() % ALIGNMENT == 0 else part.clone()


def _split(arg: Any, runs: int) -> list[Any]:
    """A tensor (or a tuple of them, nested) cut into ``runs`` equal, aligned parts along the
    leading axis; None and anything else that is not a tensor go unchanged to every run."""
    if isinstance(arg, Tensor):
        if arg.shape[0] % runs:
            raise ValueError(f"per_sample: a leading axis of {arg.shape[0]} does not split into {runs} equal runs")
        return [_aligned(part) for part in arg.chunk(runs)]
    if isinstance(arg, tuple):
        return [tuple(parts) for parts in zip(*(_split(a, runs) for a in arg))]
    return [arg] * runs


def _join(results: list[Any]) -> Any:
    """The runs' results put back together: tensors concatenated, tuples element by element."""
    first = results[0]
    if isinstance(first, Tensor):
        return torch.cat(results)
    if isinstance(first, tuple):
        return tuple(_join(list(parts)) for parts in zip(*results))
    raise TypeError(f"per_sample: cannot join results of type {type(first).__name__}; expected tensors or tuples")


def _all_aligned(args: tuple[Any, ...]) -> bool:
    """Whether every tensor among ``args`` (also inside tuples) starts on an ALIGNMENT boundary."""
    return all(_all_aligned(arg) if isinstance(arg, tuple) else
               not isinstance(arg, Tensor) or arg.data_ptr() % ALIGNMENT == 0 for arg in args)


def _leading_size(args: tuple[Any, ...]) -> int | None:
    """The leading size of the first tensor among ``args`` (looking inside tuples), else None."""
    for arg in args:
        size = arg.shape[0] if isinstance(arg, Tensor) else _leading_size(arg) if isinstance(arg, tuple) else None
        if size is not None:
            return size
    return None


def per_sample(fn: Callable[..., Result], *args: Any, runs: int | None = None, **kwargs: Any) -> Result:
    """``fn(*args, **kwargs)`` on one run of the samples at a time, the results concatenated.

    Every tensor argument (positional or keyword, also inside tuples) is cut along its leading
    axis, the batch; other arguments go unchanged to every run. ``runs`` defaults to the batch
    size (one sample per run); a smaller number keeps several rows of the leading axis together,
    for a sample that owns several images (``AttentionEstimator._decode_rows``' windows).
    A run's tensors that do not start on an aligned address are copied first (``_aligned``), so
    a sample's numbers depend on neither its batch nor where its caller's tensor starts.
    """
    runs = _leading_size((*args, *kwargs.values())) if runs is None else runs
    if runs is None:
        raise ValueError("per_sample: no tensor argument to split")
    if runs < 1:
        raise ValueError(f"per_sample: runs must be a positive integer, got {runs}")
    if runs == 1 and _all_aligned((*args, *kwargs.values())):  # one run, as it came: nothing to cut or copy
        return fn(*args, **kwargs)
    split_args = [_split(arg, runs) for arg in args]
    split_kwargs = {name: _split(value, runs) for name, value in kwargs.items()}
    results = [fn(*(arg[i] for arg in split_args), **{name: value[i] for name, value in split_kwargs.items()})
               for i in range(runs)]
    return results[0] if runs == 1 else _join(results)


def sample_wise(fn: Callable[..., Result]) -> Callable[..., Result]:
    """Decorator: ``fn`` always runs through ``per_sample`` (it accepts ``runs=`` too)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, runs: int | None = None, **kwargs: Any) -> Result:
        return per_sample(fn, *args, runs=runs, **kwargs)

    return wrapper
