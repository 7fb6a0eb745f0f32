"""Measurement primitives for ``benchmarks.speed``: compiled steps, FLOPs, memory, interleaved timing.

Every step is compiled ahead of time (``jit(...).lower(...).compile()``) so the
compile time is measured on its own, and timed one call at a time with
``block_until_ready``. Steps that are compared are timed in interleaved rounds
(A B C A B C ...) and summarised by their median, so a load spike from other
jobs on a shared machine hits every contender alike. An eager PyTorch step (timm)
is one more contender in the same rounds: it has no compile time, and its stepper
returns only when the step is done.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

Stepper = Callable[[], Any]  # runs one step; returns arrays to block on


@dataclasses.dataclass
class Timed:
  """One compiled computation under test and what was measured about it."""

  name: str
  call: Stepper
  compile_s: float | None       # None: not compiled (an eager PyTorch step)
  items: int                    # images or tokens processed per call
  flops: float | None = None    # per call, from XLA's cost analysis
  xla_bytes: int | None = None  # XLA buffer assignment: arguments + outputs + temporaries - donated
  rss_bytes: int | None = None  # process RSS high-water mark over compile + first call
  attention: str | None = None  # "cuDNN" where the compiled program calls cuDNN's fused attention, else "XLA"
  times: list[float] = dataclasses.field(default_factory=list)

  @property
  def seconds(self) -> float:
    return statistics.median(self.times)

  @property
  def rate(self) -> float:
    return self.items / self.seconds


# --------------------------------------------------------------------------- memory


def reset_rss_peak() -> bool:
  """Reset this process's RSS high-water mark (Linux ``clear_refs``); False where unsupported."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def rss_peak_bytes() -> int | None:
  """This process's RSS high-water mark (``VmHWM``), or None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def xla_bytes(compiled) -> int | None:
  """Bytes XLA assigned to one call of ``compiled`` (None where the backend does not say)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def device_peak_bytes() -> int | None:
  """Peak device memory in use since start (GPU/TPU allocators report it; CPU does not)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


# --------------------------------------------------------------------------- FLOPs

# Dense bfloat16 peaks from the vendors' datasheets (FLOP/s), by a substring of ``device_kind``.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_flops(dtype: str) -> float | None:
  """The device's datasheet peak for ``dtype`` matmuls (bfloat16 only; None where not known)."""
  if dtype != "bfloat16":
    return None
  kind = jax.devices()[0].device_kind
  return next((v for k, v in BF16_PEAK_FLOPS.items() if k in kind), None)


def attention_kernel(compiled) -> str:
  """Which attention the compiled program runs: cuDNN's fused kernel (a custom call) or XLA's ops."""
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001 - a backend that cannot print its program
    return "?"
  return "cuDNN" if "__cudnn$fmha" in text else "XLA"


def xla_flops(lowered_or_compiled) -> float | None:
  """FLOPs XLA's cost analysis counts for one call (a loop body counts once)."""
  analysis = lowered_or_compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


# --------------------------------------------------------------------------- compiling and timing


def compile_timed(name: str, jitted, args: tuple, items: int, make_call: Callable[[Any], Stepper],
                  flops: float | None = None) -> Timed:
  """Lower + compile ``jitted(*args)`` (timed), run it once, and measure its memory.

  ``make_call(compiled)`` returns the stepper that calls the compiled function
  with its (possibly donated) state. ``flops`` defaults to XLA's count for the
  lowered program.
  """
  reset_rss_peak()
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  call = make_call(compiled)
  jax.block_until_ready(call())  # first call: allocation, and warm caches
  return Timed(name, call, seconds, items, flops if flops is not None else xla_flops(lowered),
               xla_bytes(compiled), rss_peak_bytes(), attention_kernel(compiled))


def eager_timed(name: str, call: Stepper, items: int) -> Timed:
  """An eager (PyTorch) step: nothing is compiled; the first call warms caches and allocators."""
  reset_rss_peak()
  jax.block_until_ready(call())
  return Timed(name, call, None, items, rss_bytes=rss_peak_bytes())


def rate(call: Callable[[], Any], n: int) -> float:
  """Calls per second of ``call``, made ``n`` times in a row (an input pipeline's batches)."""
  start = time.perf_counter()
  for _ in range(n):
    call()
  return n / (time.perf_counter() - start)


def time_interleaved(entries: list[Timed], rounds: int, calls_per_round: int = 1,
                     on_round: Callable[[int], None] | None = None, settle: bool = False) -> None:
  """Append per-call seconds to each entry's ``times``, round-robin over ``entries``.

  ``settle``: one untimed call of each entry before its timed ones, every round. For entries from
  different runtimes (XLA and torch): the first XLA call after a torch step is slow (their thread
  pools hand the cores over), which would be charged to whichever entry follows torch.
  """
  for r in range(rounds):
    for entry in entries:
      if settle:
        jax.block_until_ready(entry.call())
      for _ in range(calls_per_round):
        start = time.perf_counter()
        jax.block_until_ready(entry.call())
        entry.times.append(time.perf_counter() - start)
    if on_round is not None:
      on_round(r)


def matmul_reference(n: int, dtype=jnp.float32) -> Timed:
  """A ``[n, n] @ [n, n]`` matmul through ``jax.jit``: the machine's dense-FLOP rate."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  jitted = jax.jit(jnp.matmul)
  return compile_timed(f"matmul {n}x{n} {jnp.dtype(dtype).name}", jitted, (a, b), n * n,
                       lambda compiled: lambda: compiled(a, b), flops=2.0 * n ** 3)


def dot_timed(name: str, lhs: tuple, rhs: tuple, contract: tuple, dtype=jnp.float32) -> Timed:
  """``lax.dot_general(lhs, rhs)`` contracting ``contract = (lhs dim, rhs dim)``, through ``jax.jit``."""
  a = jax.random.normal(jax.random.key(0), lhs, dtype)
  b = jax.random.normal(jax.random.key(1), rhs, dtype)
  dims = (((contract[0],), (contract[1],)), ((), ()))
  jitted = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
  out = [n for i, n in enumerate(lhs) if i != contract[0]] + [n for i, n in enumerate(rhs) if i != contract[1]]
  flops = 2.0 * lhs[contract[0]] * out[0] * out[1]
  return compile_timed(name, jitted, (a, b), out[0], lambda compiled: lambda: compiled(a, b), flops=flops)


def projection_matmuls(rows: int, width: int, mlp_dim: int, dtype=jnp.float32) -> list[Timed]:
  """The matmuls of one pre-LN transformer layer's projections, at its shapes, in one train step.

  ``rows`` = batch x tokens (M), ``width`` = D. Each projection ``y = x W`` (W [K, N]: q/k/v
  [D, 3D], attention output [D, D], MLP in [D, mlp], MLP out [mlp, D]) costs three products per
  step, as autodiff writes them: forward ``[M, K] x [K, N]``, input gradient ``dy W^T``
  (``[M, N] x [K, N]``, contracting N) and weight gradient ``x^T dy`` (``[M, K] x [M, N]``,
  contracting M). Together they are nearly all of a ViT step's FLOPs; the rate at which XLA runs
  them (``ceiling_rate``) is the shape-limited ceiling of the step.
  """
  m, d = rows, width
  out = []
  for role, k, n in (("qkv", d, 3 * d), ("attn out", d, d), ("mlp in", d, mlp_dim), ("mlp out", mlp_dim, d)):
    out.append(dot_timed(f"{role} fwd [{m},{k}]x[{k},{n}]", (m, k), (k, n), (1, 0), dtype))
    out.append(dot_timed(f"{role} dx [{m},{n}]x[{k},{n}]^T", (m, n), (k, n), (1, 1), dtype))
    out.append(dot_timed(f"{role} dW [{m},{k}]^T x[{m},{n}]", (m, k), (m, n), (0, 0), dtype))
  return out


def ceiling_rate(entries: list[Timed], round_index: int | None = None) -> float:
  """FLOP/s of ``entries`` run one after another: total FLOPs over total time (their medians, or
  their times in round ``round_index``)."""
  seconds = [e.seconds if round_index is None else e.times[round_index] for e in entries]
  return sum(e.flops for e in entries) / sum(seconds)


def cpu_model() -> str:
  """The host CPU's model name (Linux /proc/cpuinfo), the portable context of every CPU figure."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
  except OSError:
    return "?"


def machine_lines() -> list[str]:
  """Where the numbers come from: devices, cores, versions, load, XLA flags."""
  import flax
  import jaxlib
  import optax
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return [
      f"devices: {len(devices)} x {', '.join(kinds)} ({devices[0].platform}); host CPU: {cpu_model()}, "
      f"{os.cpu_count()} cores",
      f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"flax {flax.__version__}, optax {optax.__version__}",
      f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '(none)')}",
      "JAX persistent compilation cache: " + (f"{jax.config.jax_compilation_cache_dir} (compile times of "
                                               f"programs found there are cache reads)"
                                               if jax.config.jax_compilation_cache_dir else "off"),
      f"load average at start (1/5/15 min): {', '.join(f'{x:.1f}' for x in load) if load else '?'}",
  ]
