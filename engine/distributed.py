"""Running the subset search on every local device and on several processes.

JAX's own runtime is the distributed engine. Inside a process, query rows
are split over the local devices with `jax.shard_map` on a one-axis `Mesh`.
Every device runs the same per-device program on a block of the same shape,
whatever the number of devices. Across processes (`jax.distributed`), each
process takes a contiguous, tile-aligned slice of the query rows, and
per-process results are combined with `multihost_utils.process_allgather`.

Determinism. Results are the same for every device and process count, bit
for bit, for three reasons:

1. Similarity rows are always computed in tiles of one row count, chosen from
   the memory budget and the problem size only. Each row therefore goes
   through the same XLA program, whatever the number of devices.
2. Everything after the similarities is int32 fixed point, which is exact in
   any order and block shape.
3. The moments behind the standardisation weights are gathered per row and
   combined on the host in one fixed order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "queries"
_PER_DEVICE: dict[Hashable, Callable] = {}


@dataclasses.dataclass(frozen=True)
class Topology:
    """The devices of this process and its place among the processes.

    Attributes:
      mesh: one-axis mesh (axis name `AXIS`) over this process's local devices.
      process_index, process_count: as `jax.process_index()` and `jax.process_count()`.
    """

    mesh: Mesh
    process_index: int = 0
    process_count: int = 1

    @property
    def num_shards(self) -> int:
        """Local devices that share each step."""
        return self.mesh.devices.size

    def row_range(self, num_rows: int, tile: int) -> tuple[int, int]:
        """Return this process's query rows [start, stop): whole tiles, contiguous, balanced."""
        num_tiles = -(-num_rows // tile)
        first = num_tiles * self.process_index // self.process_count
        last = num_tiles * (self.process_index + 1) // self.process_count
        return min(first * tile, num_rows), min(last * tile, num_rows)

    def leading(self, count: int) -> "Topology":
        """Return this topology restricted to its first `count` local devices (at least one).

        A step with fewer tiles than devices runs on fewer devices instead of
        computing padding tiles; each device still runs the same program.
        """
        count = max(1, min(count, self.num_shards))
        if count == self.num_shards:
            return self
        return dataclasses.replace(self, mesh=Mesh(self.mesh.devices[:count], (AXIS,)))

    def sharding(self, *spec) -> NamedSharding:
        return NamedSharding(self.mesh, P(*spec))

    def shard(self, array, *spec) -> jax.Array:
        """Place a host array on the local devices, partitioned by `spec`."""
        return jax.device_put(array, self.sharding(*spec))

    def per_device(self, fn: Callable, in_specs, out_specs, *, key: Hashable) -> Callable:
        """Return jit(shard_map(fn)): `fn` runs once per local device on its block.

        `key` names `fn` with its static settings; one compiled function per
        (mesh, key) is kept, so repeated sweeps do not compile again.
        """
        cache_key = (self.mesh, key)
        if cache_key not in _PER_DEVICE:
            _PER_DEVICE[cache_key] = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                                                           out_specs=out_specs, check_vma=False))
        return _PER_DEVICE[cache_key]

    def gather_rows(self, array: np.ndarray) -> np.ndarray:
        """Concatenate every process's array along axis 0, in process order.

        Rows may differ per process; int64 values travel as two int32 halves
        (JAX runs without 64-bit types), so nothing is truncated.
        """
        array = np.asarray(array)
        if self.process_count == 1:
            return array
        lengths = _allgather(np.array([array.shape[0]], np.int64), self).reshape(-1)
        padded = np.zeros((int(lengths.max()),) + array.shape[1:], array.dtype)
        padded[:array.shape[0]] = array
        gathered = _allgather(padded, self)
        return np.concatenate([gathered[p, :lengths[p]] for p in range(self.process_count)])

    def sum(self, array: np.ndarray) -> np.ndarray:
        """Sum an int64 or float64 array over processes (exact for integers)."""
        array = np.asarray(array)
        if self.process_count == 1:
            return array
        return _allgather(array, self).sum(axis=0)


def _allgather(array: np.ndarray, topology: Topology) -> np.ndarray:
    """process_allgather that keeps int64, bool and float64 values exact; returns [P, ...]."""
    if array.dtype == np.int64:
        low = (array & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
        high = (array >> 32).astype(np.int32)
        both = multihost_utils.process_allgather(np.stack([low, high]), tiled=False)
        both = np.asarray(both)
        return (both[:, 1].astype(np.int64) << 32) | both[:, 0].view(np.uint32).astype(np.int64)
    if array.dtype == np.float64:
        halves = array.view(np.int64)
        return _allgather(halves, topology).view(np.float64)
    if array.dtype == np.bool_:
        return _allgather(array.astype(np.int32), topology).astype(bool)
    return np.asarray(multihost_utils.process_allgather(array, tiled=False))


def local(devices: Sequence[jax.Device] | None = None) -> Topology:
    """Return the topology of this process: every local device (or `devices`)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    if not devices:
        raise ValueError("no local JAX device to run on.")
    return Topology(mesh=Mesh(np.array(devices), (AXIS,)), process_index=jax.process_index(),
                    process_count=jax.process_count())


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join a multi-process run with `jax.distributed.initialize`.

    Must run before anything else touches JAX. On CPU, cross-process
    collectives use gloo. With no arguments, JAX reads them from the cluster
    manager (SLURM, Open MPI).

    Args:
      coordinator_address: "host:port" of process 0, reachable by every process.
      num_processes: total number of processes.
      process_id: this process, 0 <= process_id < num_processes.
    """
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is outside [0, {num_processes}).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    logging.info("process %d of %d joined with %d local devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count())
