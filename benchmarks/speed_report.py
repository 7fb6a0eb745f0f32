"""Markdown tables, JSON and plots for benchmarks/speed.py's measurements."""
from __future__ import annotations

import json
import os
import time

from timing import Timed

UNITS = {"vit": ("img/s", "image side"), "bert": ("tok/s", "max_len")}


def _num(x, digits=1) -> str:
  if x is None:
    return "—"
  return f"{x:,.{digits}f}"


def _mb(x) -> str:
  return "—" if x is None else f"{x / 2**20:,.0f}"


def _entry(group: dict, name: str) -> Timed | None:
  return next((e for e in group["entries"] if e.name == name), None)


def mfu(entry: Timed, matmul: Timed) -> float | None:
  """Model FLOPs per second over the matmul's FLOPs per second (same rounds)."""
  if not entry.flops:
    return None
  return (entry.flops / entry.seconds) / (matmul.flops / matmul.seconds)


def headline(group: dict) -> list[str]:
  ours, ref = _entry(group, "learned"), _entry(group, "Flax linen reference")
  if ours is None or ref is None:
    return []
  per_round = [r / o for o, r in zip(ours.times, ref.times)]
  ratio = ours.rate / ref.rate
  rows = [("posenc (`learned`, real train step of `setup(config)`)", ours), ("Flax linen reference (benchmarks/linen_vit.py)", ref)]
  lines = [f"## 1. posenc vs a straightforward Flax linen ViT", "",
           f"Model `{group['model']}` (patch from the config), {group['size']}×{group['size']} Fashion-MNIST images, "
           f"batch {group['batch']}, AdamW, same batch for both. posenc's step also clips gradients, "
           f"follows its LR schedule and computes accuracy, gradient norm and a finiteness check.", "",
           "| implementation | img/s | step ms (median) | compile s | GFLOP/step | MFU | XLA MB |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for label, e in rows:
    lines.append(f"| {label} | {_num(e.rate)} | {_num(1e3 * e.seconds, 0)} | {_num(e.compile_s)} | "
                 f"{_num(e.flops and e.flops / 1e9)} | {_pct(mfu(e, group['matmul']))} | {_mb(e.xla_bytes)} |")
  lines += ["", f"**posenc / linen = {ratio:.2f}× images/s** (ratio of medians over {len(ours.times)} "
            f"interleaved rounds; per-round ratios {min(per_round):.2f}–{max(per_round):.2f}).", ""]
  return lines


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.0f}%"


def train_table(family: str, groups: list[dict]) -> list[str]:
  unit, size_name = UNITS[family]
  lines = [f"| {size_name} | batch | posenc | {unit} | step ms | vs `none` | compile s | GFLOP/step | MFU "
           f"| XLA MB | RSS peak MB | loader {unit} |", "|---:|---:|---|" + "---:|" * 9]
  for g in groups:
    none = _entry(g, "none")
    for e in g["entries"]:
      if e.name == "Flax linen reference":
        continue
      overhead = "—" if none is None else f"{100 * (e.seconds / none.seconds - 1):+.0f}%"
      starved = " (starved)" if g["loader"] < e.rate else ""
      lines.append(f"| {g['size']} | {g['batch']} | `{e.name}` | {_num(e.rate)} | {_num(1e3 * e.seconds, 0)} | "
                   f"{overhead} | {_num(e.compile_s)} | {_num(e.flops and e.flops / 1e9)} | "
                   f"{_pct(mfu(e, g['matmul']))} | {_mb(e.xla_bytes)} | {_mb(e.rss_bytes)} | "
                   f"{_num(g['loader'], 0)}{starved} |")
  return lines


def matmul_line(groups: list[dict]) -> str:
  rates = [g["matmul"].flops / g["matmul"].seconds / 1e9 for g in groups]
  return (f"Reference: {groups[0]['matmul'].name} matmul through `jax.jit`, timed in the same rounds as each "
          f"group: {', '.join(f'{r:,.1f}' for r in rates)} GFLOP/s (one number per row group, in order).")


def markdown(results: dict) -> str:
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
  cores = os.cpu_count() or 1
  lines = ["# posenc speed", "", f"Profile `{results['profile']}`, measured {max(results['measured'].values())} "
           f"in {results['seconds'] / 60:.1f} min (`python benchmarks/speed.py"
           f"{' --quick' if results['profile'] == 'quick' else ''}`).", ""]
  lines += [f"- {h}" for h in results["header"]] + [f"- load average at end: {load:.1f}", ""]
  if len(set(results["measured"].values())) > 1:
    lines += ["Sections measured at different times (`--sections` re-measures some and keeps the rest): "
              + ", ".join(f"{k} {v}" for k, v in results["measured"].items()) + ".", ""]
  lines += [f"**This machine ({cores} cores) was shared with other jobs while measuring**, so absolute times "
            f"are noisy. Everything that is compared is timed in interleaved rounds (one call of each "
            f"contender per round) and reported as the median over rounds, so a load spike hits every "
            f"contender alike and the ratios stay fair.", ""]
  if results.get("vit"):
    lines += headline(results["vit"][0])
  lines += ["## 2. Train step per position encoding", ""]
  for family, title in (("vit", "ViT (configs/vit_tiny.py:full)"), ("bert", "BERT (configs/bert_small.py:full)")):
    if results.get(family):
      groups = results[family]
      lines += [f"### {title}, model `{groups[0]['model']}`", "", matmul_line(groups), ""]
      lines += train_table(family, groups) + [""]
  if results.get("eval"):
    rows = results["eval"]
    lines += [f"## 3. Evaluation at several resolutions", "",
              f"ViT with a learned grid built at {rows[0]['train_size']} px, evaluated at each size as training "
              f"evaluates it (`eval_image_sizes`; the run's `evals` from `posenc.training.setup`): the jitted "
              f"parameter transfer (`posenc.transfer.jit_transfer`, bicubic; the first call compiles) and the "
              f"eval step.", "",
              "| image side | tokens | transfer s (first call) | transfer ms (again) | eval compile s "
              "| eval img/s | loader img/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
      again = "—" if r["transfer_s"] is None else _num(1e3 * r["transfer_s"], 2)
      first = "— (built at this size)" if r["transfer_first_s"] is None else _num(r["transfer_first_s"], 2)
      lines.append(f"| {r['size']} | {r['tokens']} | {first} | {again} | {_num(r['eval'].compile_s)} | "
                   f"{_num(r['eval'].rate)} | {_num(r['loader'], 0)} |")
    lines.append("")
  if results.get("restore"):
    lines += ["## 4. Transfer on restore", "",
              "An Orbax checkpoint (`posenc.training.checkpoint.Checkpointer`) saved at one resolution and "
              "restored into the model at another as `init_from` does it: `posenc.transfer.jit_transfer` from "
              "the geometry recorded in the checkpoint's metadata to the target run's, and "
              "`Checkpointer.restore_params`: unchanged leaves load straight into their target sharding, "
              "changed ones are transferred under `jit` (each restore builds, traces and compiles it).", "",
              "| posenc | from → to | parameters transferred | save s | restore s (first) | restore s (again) "
              "| params MB |", "|---|---|---|---:|---:|---:|---:|"]
    for r in results["restore"]:
      changed = ", ".join(f"`{c}`" for c in r["changed"]) or "none (plain restore)"
      lines.append(f"| `{r['posenc']}` | {r['source']} → {r['target']} | {changed} | {_num(r['save_s'], 2)} | "
                   f"{_num(r['first_s'], 2)} | {_num(r['again_s'], 2)} | {_num(r['megabytes'])} |")
    lines.append("")
  lines += ["Definitions: *items/s* = batch items / median step time. *GFLOP/step* = XLA's cost analysis of "
            "the lowered step, with scanned layers unrolled for the count (XLA counts a loop body once). "
            "*MFU* = model FLOP/s over the matmul's FLOP/s measured in the same rounds. *vs `none`* = step "
            "time relative to `none` at the same size. *XLA MB* = the compiled step's buffer assignment "
            "(arguments + outputs + temporaries − donated). *RSS peak MB* = the process's resident-set "
            "high-water mark (Linux VmHWM, reset before each compile, read after the first step; it includes "
            "everything the process holds). *loader* = `posenc.data.make_loader` alone, in-process "
            "(benchmarks/data_speed.py); *(starved)* marks a step faster than its input pipeline."]
  return "\n".join(lines) + "\n"


def _timed(e: Timed) -> dict:
  return dict(name=e.name, compile_s=e.compile_s, items=e.items, flops=e.flops, xla_bytes=e.xla_bytes,
              rss_bytes=e.rss_bytes, times=e.times)


def to_json(results: dict) -> dict:
  out = {k: results[k] for k in ("profile", "header", "seconds", "measured")}
  for family in ("vit", "bert"):
    out[family] = [dict(g, entries=[_timed(e) for e in g["entries"]], matmul=_timed(g["matmul"]))
                   for g in results.get(family, [])]
  out["eval"] = [dict(r, eval=_timed(r["eval"])) for r in results.get("eval", [])]
  out["restore"] = results.get("restore", [])
  return out


def from_json(data: dict) -> dict:
  """``to_json``'s inverse (the entries come back without their callables)."""
  timed = lambda d: Timed(call=None, **d)  # noqa: E731
  out = dict(data)
  for family in ("vit", "bert"):
    out[family] = [dict(g, entries=[timed(e) for e in g["entries"]], matmul=timed(g["matmul"]))
                   for g in data.get(family, [])]
  out["eval"] = [dict(r, eval=timed(r["eval"])) for r in data.get("eval", [])]
  return out


def plot(results: dict, path: str) -> None:
  """Items/s per encoding (one bar per size) and, if measured, posenc vs linen."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  families = [f for f in ("vit", "bert") if results.get(f)]
  fig, axes = plt.subplots(1, len(families) + 1, figsize=(6 * (len(families) + 1), 4), squeeze=False)
  for ax, family in zip(axes[0][1:], families):
    groups = results[family]
    names = [e.name for e in groups[0]["entries"] if e.name != "Flax linen reference"]
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
      none = _entry(g, "none")
      rel = [(_entry(g, n).rate / none.rate) if none else _entry(g, n).rate for n in names]
      ax.bar([j + i * width for j in range(len(names))], rel, width, label=f"{UNITS[family][1]} {g['size']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel(f"{UNITS[family][0]} relative to `none`")
    ax.set_title(f"{family}: {groups[0]['model']}")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
  ax = axes[0][0]
  group = results["vit"][0] if results.get("vit") else None
  pair = [e for e in (_entry(group, "learned"), _entry(group, "Flax linen reference")) if e] if group else []
  if len(pair) == 2:
    ax.bar(["posenc", "Flax linen"], [e.rate for e in pair], color=["C0", "C7"])
    ax.set_ylabel("images/s")
    ax.set_title(f"{group['model']} {group['size']}px, batch {group['batch']}: "
                 f"{pair[0].rate / pair[1].rate:.2f}×")
  else:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(results: dict, text: str, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "speed.md"), "w") as f:
    f.write(text)
  with open(os.path.join(directory, "speed.json"), "w") as f:
    json.dump(to_json(results), f, indent=1, default=str)
  plot(results, os.path.join(directory, "speed.png"))
