"""Multi-host start-up: ``jax.distributed.initialize`` when a cluster is present.

A cluster is present when the caller passes a coordinator address, or the
environment has one of: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``), a multi-task SLURM job, an Open MPI launch, or a
multi-host Cloud TPU slice. JAX's own cluster detection then fills in whatever
was not given.
"""
from __future__ import annotations

import os

import jax


def cluster_detected(env=os.environ) -> bool:
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  if env.get("OMPI_MCA_orte_hnp_uri"):
    return True
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initialize ``jax.distributed`` if a cluster is present; return whether it did.

  Must run before anything touches a JAX device.
  """
  if not coordinator_address and not cluster_detected():
    return False
  env = os.environ
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  # CPU processes need a collectives library to talk to each other (no-op on GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes, process_id=process_id)
  return True
