"""The device mesh and how arrays lie on it: the only module that names mesh axes.

Two axes: `data` (replicas that split the batch) and `fsdp` (devices that also split the
batch and, in addition, shard every large parameter and its AdamW moments). The global
batch is split over both axes together. Inside the train step (jax.shard_map) each device
gathers the full parameters over `fsdp` for compute; the gradients come back reduce-
scattered over `fsdp` (the transpose of the gather) and are averaged over `data` with an
explicit pmean.
"""

import functools
import itertools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax.errors import UserError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
# Arrays below this many elements stay replicated: sharding them saves nothing.
MIN_SHARDED_SIZE = 2**10


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, int]:
    """Returns (data, fsdp) sizes from the config; one of them may be -1 (the rest)."""
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if data == -1 and fsdp == -1 or data == 0 or fsdp == 0 or min(data, fsdp) < -1:
        raise UserError(f"mesh.data={data}, mesh.fsdp={fsdp}: give positive sizes, at most one "
                        "of them -1 (fill the remaining devices)")
    if data == -1:
        data = n_devices // fsdp if n_devices % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n_devices // data if n_devices % data == 0 else 0
    if data * fsdp != n_devices:
        raise UserError(f"mesh.data × mesh.fsdp must equal the {n_devices} device(s), got "
                        f"{mesh_config.data} × {mesh_config.fsdp}: e.g. --config.mesh.data=-1")
    return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Returns the (data, fsdp) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return mesh_of(mesh_shape(mesh_config, len(devices)), devices)


def mesh_of(shape: tuple[int, int], devices) -> Mesh:
    """Returns a (data, fsdp) mesh of `shape` over `devices`, with automatic (GSPMD) axes."""
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(shape, BATCH_AXES, axis_types=auto, devices=devices)


def n_batch_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Raises UserError unless every device gets the same whole number of rows per micro-batch."""
    shards = n_batch_shards(mesh)
    if batch_size % (shards * grad_accum_steps):
        raise UserError(
            f"batch_size={batch_size} does not split evenly over {shards} device(s) × "
            f"{grad_accum_steps} micro-batch(es): make it a multiple of "
            f"{shards * grad_accum_steps}")


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Returns where one parameter (or AdamW moment) lies: its largest dimension divisible by
    fsdp is split over the fsdp axis; small arrays and vectors are replicated."""
    if fsdp == 1 or len(shape) < 2 or math.prod(shape) < MIN_SHARDED_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*[FSDP if d == dim else None for d in range(len(shape))])
    return P()


def tree_specs(tree, mesh: Mesh):
    """Returns the PartitionSpec of every leaf of a params / optimizer-state / train-state tree."""
    return jax.tree.map(lambda x: param_spec(tuple(np.shape(x)), mesh.shape[FSDP]), tree)


def tree_shardings(tree, mesh: Mesh):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, mesh),
                        is_leaf=_is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def gather(x: jax.Array, spec: P) -> jax.Array:
    """Inside shard_map: returns the full array of a parameter shard laid out by `spec`."""
    for dim, axis in enumerate(spec):
        if axis == FSDP:
            return jax.lax.all_gather(x, FSDP, axis=dim, tiled=True)
    return x


def reduce_gradient(g: jax.Array, spec: P, mesh: Mesh) -> jax.Array:
    """Inside shard_map: returns the gradient of the global mean loss for one parameter.

    A sharded parameter's gradient arrives summed over fsdp (the transpose of `gather` is a
    reduce-scatter); a replicated one's is still this device's own. Either way the result is
    the mean over every device's micro-batch.
    """
    if FSDP in spec:
        return _pmean(g, (DATA,), mesh) / mesh.shape[FSDP]
    return batch_mean(g, mesh)


def gather_tree(tree_local, specs):
    """Inside shard_map: returns the full parameters of this device's shards (see `gather`)."""
    return jax.tree.map(gather, tree_local, specs, is_leaf=_is_spec)


def reduce_gradients(grads_local, specs, mesh: Mesh):
    """Inside shard_map: returns the gradients of the global mean loss (see `reduce_gradient`)."""
    return jax.tree.map(lambda g, s: reduce_gradient(g, s, mesh), grads_local, specs,
                        is_leaf=_is_spec)


def over_batch(local, mesh: Mesh, params, batch, *replicated, returns_grads: bool = False):
    """Returns local(params_local, batch_local, *replicated, specs=...) run by jax.shard_map.

    Each device gets its shards of `params` (laid out by tree_specs, passed as `specs`), its
    rows of `batch` and the `replicated` arguments whole. `local` returns a replicated value,
    or (value, gradients laid out like params) when returns_grads.
    """
    specs = tree_specs(params, mesh)
    out_specs = (P(), specs) if returns_grads else P()
    return jax.shard_map(functools.partial(local, specs=specs), mesh=mesh,
                         in_specs=(specs, P(BATCH_AXES), *[P()] * len(replicated)),
                         out_specs=out_specs, check_vma=False)(params, batch, *replicated)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def batch_mean(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside shard_map: returns the mean of x over every device that holds batch rows."""
    return _pmean(x, BATCH_AXES, mesh)


def batch_sum(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside shard_map: returns the sum of x over every device that holds batch rows."""
    if math.prod(mesh.shape[axis] for axis in BATCH_AXES) == 1:
        return x
    return jax.lax.psum(x, BATCH_AXES)


def _pmean(x: jax.Array, axes: tuple[str, ...], mesh: Mesh) -> jax.Array:
    # Over axes that span one device there is nothing to average, and XLA:CPU would still run
    # a one-participant all-reduce (0.3 ms of a CPU-recipe step on one device).
    if math.prod(mesh.shape[axis] for axis in axes) == 1:
        return x
    return jax.lax.pmean(x, axes)


def local_rows(mesh: Mesh, batch_size: int) -> slice:
    """Returns the rows of the global batch that this process's devices hold (contiguous)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop)
                   for i in index_map.values()})
    for (_, stop), (start, _) in itertools.pairwise(rows):
        if start != stop:
            raise UserError("this process's devices hold non-contiguous rows of the batch: "
                            "order the devices so that each process's are adjacent")
    return slice(rows[0][0], rows[-1][1])


def put_batch(batch, mesh: Mesh, batch_size: int):
    """Returns the global (batch_size, ...) arrays split over the mesh from this process's rows.

    Single-process runs pass the whole batch; in multi-process runs each process passes only
    the rows local_rows() names.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, x, (batch_size, *x.shape[1:])), batch)


def memory_report(state, mesh: Mesh) -> str:
    """Returns one line: the bytes of params + optimizer state that each device holds."""
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    return (f"mesh: data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}; params + optimizer state "
            f"{per_device / 2**20:,.1f} MiB per device ({total / 2**20:,.1f} MiB in all)")
