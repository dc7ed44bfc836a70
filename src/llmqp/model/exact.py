"""Reductions whose result for one row does not depend on how many rows are computed with it.

XLA:CPU vectorises a row reduction (`jnp.mean(x, axis=-1)`) differently for different numbers of rows, so
the same token's RMS norm could differ in the last bits between a one-token step and a chunk of 8 or 64
positions (measured on SmolLM2's 576-wide rows: equal up to 7 rows, different from 8). Draft verification,
forced runs and chunked prefill rely on a chunk of T positions giving exactly the hidden states of T
one-token steps, so the norms sum in an order written out here: element-wise adds, which XLA computes as
written (it does not reassociate floating-point adds), the same way whatever the shape around them.
"""

from __future__ import annotations

import jax.numpy as jnp


def mean_square(x32):
    """mean(x32 ** 2) over the last axis, keepdims, summed in a fixed order: halves added element-wise while
    the width is even (576 -> 288 -> ... -> 9), then the rest left to right."""
    d = x32.shape[-1]
    v, n = x32 * x32, d
    while n % 2 == 0:
        v = v.reshape(*v.shape[:-1], 2, n // 2)
        v = v[..., 0, :] + v[..., 1, :]
        n //= 2
    total = v[..., 0]
    for j in range(1, n):
        total = total + v[..., j]
    return (total / d)[..., None]
