"""How many candidates one worker relaxes at once (``relax.batch_size``), decided on the worker.

A batched potential call costs little more for several small cells than for one (batch_relax.py), but
every structure in flight is also a candidate the search has handed out before learning the results of
the others, so the batch should be as large as helps and no larger.

* A potential that cannot batch (EMT, CHGNet, an ASE calculator without ``calculate_batch``) relaxes one
  structure at a time: the size is 1.
* ``batch_size: auto`` on a CPU is :data:`CPU_BATCH`, where the measured gain per structure levels off
  for the 2-20-atom cells of a search or a screen (docs/throughput.md).
* ``auto`` on a GPU holds up to :data:`GPU_MAX_BATCH` structures, and no more atoms than a share of the
  device's free memory allows at :data:`BYTES_PER_ATOM` (a batch of large cells is therefore smaller).
* A number in the config is used as given (the memory limit still applies on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

# relax.batch_size: auto on a CPU (docs/throughput.md: relaxations per core-hour against batch size)
CPU_BATCH = 8
# relax.batch_size: auto on a GPU: structures in flight at most ...
GPU_MAX_BATCH = 256
# ... and atoms in flight at most this share of the free device memory over the memory one atom needs
GPU_MEMORY_SHARE = 0.5
# peak memory of M3GNet's forward and backward pass per atom of a batch (float32, 5 Å cutoff: the graph,
# three-body terms and autograd buffers): an estimate chosen generous, not yet measured on a GPU
BYTES_PER_ATOM = 2_000_000


@dataclass(frozen=True)
class BatchLimits:
    """At most ``structures`` relaxations in flight, holding at most ``atoms`` atoms (None: no limit)."""

    structures: int
    atoms: int | None = None

    @property
    def batched(self) -> bool:
        return self.structures > 1


def batch_limits(configured: int | None, can_batch: bool, device: str) -> BatchLimits:
    """The limits for a worker; ``configured`` is relax.batch_size (None: auto)."""
    if not can_batch:
        return BatchLimits(1)
    if not device.startswith("cuda"):
        return BatchLimits(configured or CPU_BATCH)
    atoms = gpu_atom_budget(device)
    return BatchLimits(configured or GPU_MAX_BATCH, atoms)


def gpu_atom_budget(device: str) -> int:
    """Atoms a batch may hold on this CUDA device: a share of its free memory (needs torch and the device)."""
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, int(GPU_MEMORY_SHARE * free / BYTES_PER_ATOM))
