"""A model spread over several devices with JAX's own sharding: the vocabulary split, the trunk replicated.

`place_params(params, devices)` puts the params pytree (`llmqp.model.transformer` layout) on a 1-D mesh:

    embed        (V, d)  sharded over the mesh axis on V: device i holds rows [i*V/N, (i+1)*V/N)
    unembed_rows (V, d)  the same (one copy when tied: it *is* `embed`)
    unembed      (d, V)  sharded on V (columns)
    everything else      replicated

The vocabulary matrices are the part that grows with the model family's vocabulary (Gemma 3: 262k rows)
and the part whose work the plans change, so they are what is split. The trunk runs replicated with the
sharding GSPMD propagates from its inputs (the embedding gather from a vocab-sharded table is GSPMD's
masked gather + all-reduce): no tensor parallelism of the layers, hence no speed-up of the trunk.

Heads over a sharded vocabulary (same contracts as `llmqp.model.transformer`):

- `sharded_sparse_logits(head, hidden, ids, mesh)` — every device gathers only the requested ids that fall
  in its own vocabulary range (the others are masked to 0) and scores them; a `psum` over the mesh axis
  combines the shards. Each logit comes from exactly one device and the others add exact zeros, so the
  values equal the single-device `sparse_logits` computed the same way.
- `sharded_dense_logits(head, hidden, mesh)` — every device scores its V/N columns; the (B, V) result
  stays sharded on V, so reading the allowed ids out of it moves only (B, K) values.

`dense_logits` / `sparse_logits` from `transformer` also work unchanged on placed params (GSPMD inserts the
collectives); the explicit versions above pin down where the work and the communication happen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmqp.model import transformer
from llmqp.sampling import InvalidArgument

VOCAB_AXIS = "vocab"  # the mesh axis name `make_mesh` uses


def make_mesh(devices: int) -> Mesh:
    """A 1-D mesh over the first `devices` JAX devices, axis named `VOCAB_AXIS`.

    Raises InvalidArgument when fewer devices are visible (on CPU, simulate more with
    XLA_FLAGS=--xla_force_host_platform_device_count=N, set before JAX is imported)."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise InvalidArgument(f"devices must be a positive integer or a jax.sharding.Mesh, got {devices!r}")
    available = jax.devices()
    if devices > len(available):
        hint = (" (CPU: set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX is imported)"
                if available[0].platform == "cpu" else "")
        raise InvalidArgument(f"devices={devices} but JAX sees {len(available)} "
                              f"{available[0].platform} device(s){hint}")
    return Mesh(np.array(available[:devices]), (VOCAB_AXIS,))


def _mesh_axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise InvalidArgument(f"the mesh must be 1-D (the vocabulary is split over one axis); got axes "
                              f"{mesh.axis_names} of shape {tuple(mesh.devices.shape)}")
    return mesh.axis_names[0]


def place_params(params: dict, devices: int | Mesh) -> tuple[dict, Mesh]:
    """Place `params` over `devices` (a device count or a 1-D `jax.sharding.Mesh`). Returns (params, mesh).

    The vocabulary dimension of embed / unembed_rows / unembed is sharded over the mesh axis, the rest is
    replicated (see the module docstring). A tied unembedding keeps one copy. Raises InvalidArgument when
    the vocabulary size is not a multiple of the number of devices (shards must be equal). Copies the
    arrays to the devices; the input pytree is not modified."""
    mesh = devices if isinstance(devices, Mesh) else make_mesh(devices)
    axis = _mesh_axis(mesh)
    n = mesh.devices.size
    vocab = params["embed"].shape[0]
    if vocab % n:
        raise InvalidArgument(f"the vocabulary ({vocab} tokens) must split evenly over {n} devices")
    rows_sharding = NamedSharding(mesh, P(axis, None))  # (V, d)
    cols_sharding = NamedSharding(mesh, P(None, axis))  # (d, V)
    replicated = NamedSharding(mesh, P())
    tied = params["unembed_rows"] is params["embed"]
    placed = {key: jax.device_put(value, replicated) for key, value in params.items()
              if key not in ("embed", "unembed_rows", "unembed", "layers")}
    placed["layers"] = jax.device_put(params["layers"], replicated)
    placed["embed"] = jax.device_put(params["embed"], rows_sharding)
    placed["unembed_rows"] = placed["embed"] if tied else jax.device_put(params["unembed_rows"], rows_sharding)
    placed["unembed"] = jax.device_put(params["unembed"], cols_sharding)
    return placed, mesh


def _local_sparse(rows, hidden, ids, *, axis: str):
    # rows: (V/N, d) this device's vocabulary range; hidden: (B, d); ids: (B, K) global ids.
    local_vocab = rows.shape[0]
    local = ids - jax.lax.axis_index(axis) * local_vocab  # (B, K)
    mine = (local >= 0) & (local < local_vocab)
    # Out-of-range ids gather row 0 (any valid row) and are zeroed below: the psum then adds exact zeros.
    logits = transformer.sparse_logits({"unembed_rows": rows}, hidden, jnp.where(mine, local, 0))
    return jax.lax.psum(jnp.where(mine, logits, 0.0), axis)


def sharded_sparse_logits(head: dict, hidden, ids, mesh: Mesh):
    """hidden: (B, d); ids: (B, K) int32 global ids -> logits (B, K) f32, replicated on every device.

    `head["unembed_rows"]` is (V, d) sharded over the mesh axis (as `place_params` leaves it). Each device
    gathers and scores only the ids in its range; one psum of (B, K) floats combines them. Works eagerly
    and inside `jit`."""
    axis = _mesh_axis(mesh)
    fn = jax.shard_map(functools.partial(_local_sparse, axis=axis), mesh=mesh,
                       in_specs=(P(axis, None), P(), P()), out_specs=P())
    return fn(head["unembed_rows"], hidden, ids)


def _local_dense(unembed, hidden):
    # unembed: (d, V/N) this device's columns -> (B, V/N).
    return transformer.dense_logits({"unembed": unembed}, hidden)


def sharded_dense_logits(head: dict, hidden, mesh: Mesh):
    """hidden: (B, d) -> logits (B, V) f32 over the whole vocabulary, sharded on V like `head["unembed"]`.

    Each device scores its own V/N columns; nothing is communicated. Reading the allowed ids out of the
    result (`take_along_axis` inside `jit`) lets GSPMD move only those (B, K) values; `np.asarray` on the
    result gathers the full rows to the host."""
    axis = _mesh_axis(mesh)
    fn = jax.shard_map(_local_dense, mesh=mesh, in_specs=(P(None, axis), P()),
                       out_specs=P(None, axis))
    return fn(head["unembed"], hidden)
