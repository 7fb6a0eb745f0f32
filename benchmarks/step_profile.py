"""Where posenc's train step spends its time on this backend, by XLA thunk (issue 31's table).

    python -m benchmarks.step_profile                 # ViT-Ti/4 32 px, batch 128 (speed.py's cpu headline)
    python -m benchmarks.step_profile --quick         # tiny: the plumbing only (CI)

The real train step (``setup(config).train_step``, as ``benchmarks.speed`` times it) runs ``--steps``
times under ``jax.profiler.trace``. XLA:CPU records one trace event per thunk, named after its HLO
instruction (a fusion, a matmul, a copy); ``jax.profiler.ProfileData`` reads them back. Each
instruction gets a category from the optimised HLO (``compiled.as_text()``): the opcodes it fuses,
its ``op_name`` (``transpose(jvp(...))``: the backward pass; outside ``jvp``: the update after the
gradients) and the posenc function its stack frame names. Writes ``OUT/step_profile.{md,json}``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import tempfile
import time

import jax

from benchmarks import timing
from benchmarks.speed_entries import first_batch
from benchmarks.speed_profiles import PROFILES, TINY, vit_config
from posenc.training import setup, sharding

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results")
LAYOUT_OPS = {"parameter", "constant", "bitcast", "copy", "transpose", "slice", "concatenate", "broadcast",
              "reshape", "pad", "dynamic-slice", "dynamic-update-slice", "tuple", "get-tuple-element", "iota"}
# (category, rule), first match wins; a rule sees the instruction's opcodes, op_name and stack functions.
CATEGORIES = (
    ("attention products (QKᵀ, PV, and what XLA fuses into them)",
     lambda i: i.dot and i.calls("_per_head_attention", "attend")),
    ("projection and MLP matmuls", lambda i: i.dot),
    ("softmax", lambda i: i.calls("_softmax")),
    ("position encoding", lambda i: i.in_file("/encodings/") or i.calls("_add_to_positions")),
    ("GELU (with the MLP's bias)", lambda i: "tanh" in i.ops or "erf" in i.ops or i.calls("Mlp.__call__", "gelu")),
    ("q, k, v: split, scale, bias", lambda i: i.calls("Attention._qkv")),
    ("layer norms and residual adds", lambda i: "rsqrt" in i.ops or i.calls("Block._residuals", "ViT.__call__")),
    ("projection biases and their gradients", lambda i: i.calls("dense")),
    ("loss and metrics", lambda i: i.calls("cross_entropy", "metrics", "classify")),
    ("optimizer update, gradient norm, finiteness", lambda i: not i.differentiated),
    ("layout: copies, slices, transposes, concatenations", lambda i: i.ops <= LAYOUT_OPS),
    ("other elementwise and reductions", lambda i: True),
)


@dataclasses.dataclass
class Instruction:
  """One thunk's HLO instruction: what it fuses and where its ops came from."""
  name: str
  ops: set[str]
  op_name: str
  functions: tuple[str, ...]
  files: tuple[str, ...]

  @property
  def dot(self) -> bool:
    return bool(self.ops & {"dot", "convolution"}) or "dot_general" in self.op_name

  @property
  def differentiated(self) -> bool:
    return "jvp(" in self.op_name

  def calls(self, *names: str) -> bool:
    return any(n in f for f in self.functions for n in names)

  def in_file(self, part: str) -> bool:
    return any(part in f for f in self.files)

  def category(self) -> str:
    return next(name for name, rule in CATEGORIES if rule(self))


def _table(text: str, header: str) -> dict[int, str]:
  """A numbered section of the HLO text's stack-frame tables: id -> its line's rest."""
  found = re.search(rf"^{header}\n(.*?)(?:\n\n|\n[A-Z])", text, re.S | re.M)
  return {int(k): v for k, v in re.findall(r"^(\d+) (.*)$", found.group(1), re.M)} if found else {}


def stack_frames(text: str) -> dict[int, tuple[tuple[str, ...], tuple[str, ...]]]:
  """stack_frame_id -> (function names, file names) of the frame and its parents."""
  files = {k: v.strip('"') for k, v in _table(text, "FileNames").items()}
  functions = {k: v.strip('"') for k, v in _table(text, "FunctionNames").items()}
  locations = {k: tuple(int(x) for x in re.findall(r"(?:file_name_id|function_name_id)=(\d+)", v))
               for k, v in _table(text, "FileLocations").items()}
  parents = {k: tuple(int(x) for x in re.findall(r"(?:file_location_id|parent_frame_id)=(\d+)", v))
             for k, v in _table(text, "StackFrames").items()}
  out = {}
  for start in parents:
    fns, fls, frame, seen = [], [], start, set()
    while frame in parents and frame not in seen:  # a frame that is its own parent is a root
      seen.add(frame)
      location, parent = (parents[frame] + (0,))[:2]
      file_id, function_id = locations.get(location, (0, 0))
      fns.append(functions.get(function_id, "?"))
      fls.append(files.get(file_id, "?"))
      frame = parent
    out[start] = (tuple(fns), tuple(fls))
  return out


INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")


def instructions(text: str) -> dict[str, Instruction]:
  """Every instruction of the optimised module, by name, with the opcodes, functions and files of
  everything it fuses (its called computation's instructions, and its own)."""
  frames = stack_frames(text)
  computations, current = {}, None
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      current = computations.setdefault(head.group(1), [])
    elif current is not None and INSTRUCTION.match(line):
      current.append(line)

  def origin(line: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    opcode = INSTRUCTION.match(line).group(2)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    return (opcode, *frames.get(int(frame.group(1)), ((), ()))) if frame else (opcode, (), ())

  out = {}
  for lines in computations.values():
    for line in lines:
      called = re.search(r"calls=%([\w.\-]+)", line)
      parts = [origin(line)] + [origin(l) for l in computations.get(called.group(1), [])] if called else [origin(line)]
      op_name = re.search(r'op_name="([^"]*)"', line)
      out[INSTRUCTION.match(line).group(1)] = Instruction(
          INSTRUCTION.match(line).group(1), {p[0] for p in parts} - ({"fusion"} if called else set()),
          op_name.group(1) if op_name else "", tuple(f for p in parts for f in p[1]), tuple(f for p in parts for f in p[2]))
  return out


def passes(op_name: str) -> str:
  """Which part of the step an instruction belongs to: forward, backward, or after the gradients."""
  return "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "update"


def thunk_times(trace_dir: str, module: str) -> dict[str, list[float]]:
  """Seconds of each thunk of ``module`` in the trace, per run of it (its hlo_op -> durations)."""
  from jax.profiler import ProfileData
  times = collections.defaultdict(list)
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if stats.get("hlo_module") == module and "hlo_op" in stats:
            times[stats["hlo_op"]].append(event.duration_ns * 1e-9)
  return times


def profile(config, steps: int) -> dict:
  """The step of ``config``: its median untraced time, and per category and pass, the thunk time per step."""
  run = setup(config)
  batch = sharding.global_batch(first_batch(run, "train", True), run.batch_sharding)
  holder = {"state": run.spec.init()}
  compiled = run.train_step.lower(holder["state"], batch).compile()

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  for _ in range(2):
    step()
  walls = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    walls.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        step()
    times = thunk_times(trace_dir, compiled.as_text().split(",", 1)[0].split()[-1])
  found = instructions(compiled.as_text())
  rows = collections.defaultdict(lambda: collections.defaultdict(float))
  top = []
  for name, durations in times.items():
    ins = found.get(name) or Instruction(name, set(), "", (), ())
    per_step = sum(durations) / steps
    rows[ins.category()][passes(ins.op_name)] += per_step
    top.append((per_step, name, ins.category(), passes(ins.op_name), sorted(ins.ops - {"parameter", "constant"})))
  top.sort(reverse=True)
  return dict(step_s=sorted(walls)[len(walls) // 2], steps=steps, thunks=len(times),
              categories={c: dict(rows[c]) for c, _ in CATEGORIES if c in rows},
              top=[dict(seconds=s, name=n, category=c, part=p, ops=o) for s, n, c, p, o in top[:15]])


def table(result: dict) -> list[str]:
  """The step's thunk time by part and pass (what RESULTS.md shows), after a line on what was measured."""
  total = sum(sum(v.values()) for v in result["categories"].values())
  lines = [f"Median step, untraced: {result['step_s'] * 1e3:,.0f} ms. Thunk time per step (traced, "
           f"{result['steps']} steps, {result['thunks']} thunks): {total * 1e3:,.0f} ms; thunks may overlap on "
           "the intra-op threads, and what the step spends outside them (the executor, waits) is the rest.", "",
           "| where | forward ms | backward ms | update ms | total ms | share of thunk time |",
           "|---|---:|---:|---:|---:|---:|"]
  for category, parts in sorted(result["categories"].items(), key=lambda kv: -sum(kv[1].values())):
    t = sum(parts.values())
    lines.append(f"| {category} | " + " | ".join(f"{parts.get(p, 0) * 1e3:,.1f}" for p in ("forward", "backward", "update"))
                 + f" | {t * 1e3:,.1f} | {t / total:.0%} |")
  return lines


def markdown(result: dict, title: str, command: str) -> str:
  lines = [f"# Where the train step's time goes: {title}", "",
           f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
           *(f"- {line}" for line in result["machine"]), "", *table(result)]
  lines += ["", "The 15 slowest thunks:", "", "| thunk | where | part | ms per step | fuses |", "|---|---|---|---:|---|"]
  lines += [f"| `{r['name']}` | {r['category']} | {r['part']} | {r['seconds'] * 1e3:,.1f} | {', '.join(r['ops'])} |"
            for r in result["top"]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny ViT (the plumbing, for CI)")
  parser.add_argument("--steps", type=int, default=5, help="steps timed, and steps traced")
  parser.add_argument("--posenc", default="learned")
  parser.add_argument("--out", default=DEFAULT_OUT, help="directory for step_profile.md and step_profile.json")
  args = parser.parse_args(argv)
  p = PROFILES["quick" if args.quick else "cpu"]
  model, size, batch = p.headline[0]
  config = vit_config(p, args.posenc, size, batch, model)
  if args.quick:
    config.model_options.update(TINY)
  machine = timing.machine_lines()  # the load before measuring
  result = profile(config, args.steps)
  title = f"`{model}`/{p.patch} {size} px, batch {batch}, `{args.posenc}`, {p.dtype}"
  result.update(title=title, machine=machine)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "step_profile.json"), "w") as f:
    json.dump(result, f, indent=1)
  command = "python -m benchmarks.step_profile" + (" --quick" if args.quick else "")
  text = markdown(result, title, command)
  with open(os.path.join(args.out, "step_profile.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
