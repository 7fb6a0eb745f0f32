"""Markdown tables, JSON and plots for ``benchmarks.speed``'s measurements."""
from __future__ import annotations

import json
import os
import statistics

from benchmarks.speed_headline import (LINEN, POSENC, TIMM, find_entry, headline, mb_text, number_text, pct_text,
                                       ratio_text, verdict_text)
from benchmarks.speed_profiles import FAMILIES
from benchmarks.timing import Timed


def stem(profile: str) -> str:
  """File name stem of a profile's report: speed.* for the CPU (and CI's quick), speed_<profile>.* else."""
  return "speed" if profile in ("cpu", "quick") else f"speed_{profile}"


def mfu(entry: Timed, matmul: Timed) -> float | None:
  """Model FLOPs per second over the matmul's FLOPs per second (same rounds)."""
  if not entry.flops:
    return None
  return (entry.flops / entry.seconds) / (matmul.flops / matmul.seconds)


DEVICE_GOALS = dict(vit_mfu=0.45, gpt_tokens=400e3, overhead=0.10)  # H100/H200-class, bfloat16


def device_goal_lines(results: dict) -> list[str]:
  """The accelerator goals: ViT-B/16 224 px at >= 45 % MFU, GPT-2 small >= 400k tok/s, every
  encoding within 10 % of `none`."""
  out, peak = [], results.get("peak_flops")
  for g in results.get("vit", [])[:1]:
    e = find_entry(g, "learned") or g["entries"][0]
    if peak and e.flops:
      frac = e.flops / e.seconds / peak
      out.append(f"- `{g['model']}` {g['size']} px (`{e.name}`) at ≥ {DEVICE_GOALS['vit_mfu']:.0%} MFU of peak: "
                 f"{verdict_text(frac >= DEVICE_GOALS['vit_mfu'])} ({frac:.1%}).")
  for g in results.get("gpt", [])[:1]:
    e = find_entry(g, "learned") or g["entries"][0]
    out.append(f"- `{g['model']}` at {g['size']} tokens (`{e.name}`) ≥ {DEVICE_GOALS['gpt_tokens'] / 1e3:,.0f}k tok/s: "
               f"{verdict_text(e.rate >= DEVICE_GOALS['gpt_tokens'])} ({e.rate / 1e3:,.0f}k).")
  for family in ("vit", "gpt"):
    for g in results.get(family, []):
      none = find_entry(g, "none")
      if none is None:
        continue
      worst = max(g["entries"], key=lambda e: e.seconds)
      over = worst.seconds / none.seconds - 1
      out.append(f"- {family} {g['size']}: every encoding within {DEVICE_GOALS['overhead']:.0%} of `none`: "
                 f"{verdict_text(over <= DEVICE_GOALS['overhead'])} (slowest `{worst.name}`, {over:+.0%}).")
  return ["Goals of the issue (H100/H200-class GPU, bfloat16):", ""] + out + [""] if out else []


def train_table(family: str, groups: list[dict], peak: float | None = None) -> list[str]:
  unit, size_name = FAMILIES[family].unit, FAMILIES[family].size_name
  lines = [f"| {size_name} | batch | posenc | {unit} | step ms | vs `none` | compile s | GFLOP/step | MFU "
           f"| MFU of peak | attention | XLA MB | RSS peak MB | loader {unit} |", "|---:|---:|---|" + "---:|" * 11]
  for g in groups:
    none = find_entry(g, "none")
    for e in g["entries"]:
      if e.name == LINEN:  # reports written before the headline was its own section
        continue
      overhead = "—" if none is None else f"{100 * (e.seconds / none.seconds - 1):+.0f}%"
      loader = g.get("loader")
      starved = " (starved)" if loader is not None and loader < e.rate else ""
      of_peak = peak and e.flops and e.flops / e.seconds / peak
      lines.append(f"| {g['size']} | {g['batch']} | `{e.name}` | {number_text(e.rate)} | {number_text(1e3 * e.seconds, 0)} | "
                   f"{overhead} | {number_text(e.compile_s)} | {number_text(e.flops and e.flops / 1e9)} | "
                   f"{pct_text(mfu(e, g['matmul']))} | {pct_text(of_peak)} | {e.attention or '—'} | {mb_text(e.xla_bytes)} | "
                   f"{mb_text(e.rss_bytes)} | {'synthetic' if loader is None else number_text(loader, 0)}{starved} |")
  return lines


def matmul_line(groups: list[dict]) -> str:
  rates = [g["matmul"].flops / g["matmul"].seconds / 1e9 for g in groups]
  return (f"Reference: {groups[0]['matmul'].name} matmul through `jax.jit`, timed in the same rounds as each "
          f"group: {', '.join(f'{r:,.1f}' for r in rates)} GFLOP/s (one number per row group, in order).")


def markdown(results: dict) -> str:
  load = results.get("load_end")  # as measured (a report re-rendered elsewhere keeps its machine's)
  cores = results.get("cores") or os.cpu_count() or 1
  lines = ["# posenc speed", "", f"Profile `{results['profile']}`, measured {max(results['measured'].values())} "
           f"in {results['seconds'] / 60:.1f} min (`python -m benchmarks.speed"
           f"{' --quick' if results['profile'] == 'quick' else ''}`).", ""]
  lines += [f"- {h}" for h in results["header"]] + [f"- load average at end: {number_text(load)}", ""]
  if results.get("flops_note"):
    lines += [results["flops_note"], ""]
  if len(set(results["measured"].values())) > 1:
    lines += ["Sections measured at different times (`--sections` re-measures some and keeps the rest): "
              + ", ".join(f"{k} {v}" for k, v in results["measured"].items()) + ".", ""]
  lines += [f"**This machine ({cores} cores) was shared with other jobs while measuring**, so absolute times "
            f"are noisy. Everything that is compared is timed in interleaved rounds (one call of each "
            f"contender per round) and reported as the median over rounds, so a load spike hits every "
            f"contender alike and the ratios stay fair.", ""]
  if results.get("headline"):
    lines += headline(results["headline"], results.get("goals"), results.get("dataset"))
  if any(results.get(f) for f in FAMILIES):
    lines += ["## 2. Train step per position encoding", ""]
    if results.get("dataset") == "synthetic":
      lines += ["Batches are synthetic (`--config.dataset=synthetic`: random data of the real batches' shapes; "
                "images 3-channel, 1,000 classes): no dataset is installed on the device.", ""]
    if results.get("peak_flops"):
      lines += [f"*MFU of peak* = the step's FLOPs (XLA's cost analysis) per second over the device's datasheet "
                f"peak, {results['peak_flops'] / 1e12:,.0f} TFLOP/s dense bfloat16.", ""]
  for family, spec in FAMILIES.items():
    if results.get(family):
      groups = results[family]
      lines += [f"### {spec.title}, model `{groups[0]['model']}`", "", matmul_line(groups), ""]
      lines += train_table(family, groups, results.get("peak_flops")) + [""]
  if results.get("profile") == "gpu":
    lines += device_goal_lines(results)
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
      again = "—" if r["transfer_s"] is None else number_text(1e3 * r["transfer_s"], 2)
      first = "— (built at this size)" if r["transfer_first_s"] is None else number_text(r["transfer_first_s"], 2)
      lines.append(f"| {r['size']} | {r['tokens']} | {first} | {again} | {number_text(r['eval'].compile_s)} | "
                   f"{number_text(r['eval'].rate)} | {'synthetic' if r['loader'] is None else number_text(r['loader'], 0)} |")
    lines.append("")
  if results.get("restore"):
    lines += restore_lines(results["restore"], results.get("goals"))
  lines += ["Definitions: *items/s* = batch items / median step time. *compile s* = lowering + XLA "
            "compilation of the jitted step (*— (eager)*: a PyTorch step compiles nothing). *GFLOP/step* = XLA's "
            "cost analysis of the lowered step, with scanned layers unrolled for the count (XLA counts a loop "
            "body once). *MFU* = model FLOP/s over the matmul's FLOP/s measured in the same rounds. *vs `none`* = step "
            "time relative to `none` at the same size. *XLA MB* = the compiled step's buffer assignment "
            "(arguments + outputs + temporaries − donated). *RSS peak MB* = the process's resident-set "
            "high-water mark (Linux VmHWM, reset before each compile, read after the first step; it includes "
            "everything the process holds). *loader* = the run's own input pipeline "
            "(`run.loader`) alone, in-process; *(starved)* marks a step faster than its input pipeline. *attention* = "
            "whether the compiled step calls cuDNN's fused attention kernel or runs XLA's own ops."]
  return "\n".join(lines) + "\n"


def restore_lines(rows: list[dict], goals: dict | None) -> list[str]:
  lines = ["## 4. Transfer on restore", "",
           "An Orbax checkpoint (`posenc.training.checkpoint.Checkpointer`) saved at one resolution and "
           "restored into the model at another as `init_from` does it: `posenc.transfer.jit_transfer` from "
           "the geometry recorded in the checkpoint's metadata to the target run's, and "
           "`Checkpointer.restore_params`: unchanged leaves load straight into their target sharding, "
           "changed ones are transferred under `jit` (in *restore s (first / again)* each restore builds, "
           "traces and compiles it, as a new run does). *Plain* restores the same checkpoint at the size it "
           "was saved at (nothing to transfer); *with transfer* restores it at the new size through the one "
           "jitted transfer built (and compiled) once; the two alternate, and *with transfer / plain* is the "
           "ratio of their medians (in brackets the lowest and highest per-repeat ratio).", "",
           "| posenc | from → to | parameters transferred | save s | restore s (first) | restore s (again) "
           "| plain ms | with transfer ms | with transfer / plain | params MB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    changed = ", ".join(f"`{c}`" for c in r["changed"]) or "none (plain restore)"
    plain, moved = r.get("plain_times"), r.get("transfer_times")
    restore = restore_ratio(r)
    lines.append(f"| `{r['posenc']}` | {r['source']} → {r['target']} | {changed} | {number_text(r['save_s'], 2)} | "
                 f"{number_text(r['first_s'], 2)} | {number_text(r['again_s'], 2)} | "
                 f"{number_text(plain and 1e3 * statistics.median(plain))} | "
                 f"{number_text(moved and 1e3 * statistics.median(moved))} | {ratio_text(restore)} | {number_text(r['megabytes'])} |")
  lines.append("")
  measured = [(r, restore_ratio(r)) for r in rows if r["changed"] and restore_ratio(r)]
  if measured:
    text = "; ".join(f"`{r['posenc']}` {x[0]:.2f}×" for r, x in measured)
    goal = goals and goals.get("restore_ratio")
    verdict = "" if not goal else (f" Goal ≤ {goal:.1f}×: "
                                   f"{verdict_text(all(x[0] <= goal for _, x in measured))}.")
    lines += [f"**Restore with transfer / plain restore: {text}** (medians over {len(measured[0][0]['plain_times'])} "
              f"repeats each).{verdict}", ""]
  return lines


def restore_ratio(row: dict) -> tuple[float, float, float] | None:
  """Median restore with the transfer built once over median plain restore, and the per-repeat range."""
  plain, moved = row.get("plain_times"), row.get("transfer_times")
  if not plain or not moved:
    return None
  per = [m / p for p, m in zip(plain, moved)]
  return statistics.median(moved) / statistics.median(plain), min(per), max(per)


def _timed(e: Timed) -> dict:
  return dict(name=e.name, compile_s=e.compile_s, items=e.items, flops=e.flops, xla_bytes=e.xla_bytes,
              rss_bytes=e.rss_bytes, attention=e.attention, times=e.times)


def to_json(results: dict) -> dict:
  out = {k: results[k] for k in ("profile", "header", "seconds", "measured")}
  out.update({k: results.get(k) for k in ("dataset", "peak_flops", "flops_note", "cores", "load_end")})
  for family in FAMILIES:
    out[family] = [dict(g, entries=[_timed(e) for e in g["entries"]], matmul=_timed(g["matmul"]))
                   for g in results.get(family, [])]
  if results.get("headline"):
    out["headline"] = dict(results["headline"], groups=[
        dict(g, entries=[_timed(e) for e in g["entries"]], ceiling=[_timed(e) for e in g["ceiling"]])
        for g in results["headline"]["groups"]])
  out["goals"] = results.get("goals")
  out["eval"] = [dict(r, eval=_timed(r["eval"])) for r in results.get("eval", [])]
  out["restore"] = results.get("restore", [])
  return out


def from_json(data: dict) -> dict:
  """``to_json``'s inverse (the entries come back without their callables)."""
  timed = lambda d: Timed(call=None, **d)  # noqa: E731
  out = dict(data)
  for family in FAMILIES:
    out[family] = [dict(g, entries=[timed(e) for e in g["entries"]], matmul=timed(g["matmul"]))
                   for g in data.get(family, [])]
  if data.get("headline"):
    out["headline"] = dict(data["headline"], groups=[
        dict(g, entries=[timed(e) for e in g["entries"]], ceiling=[timed(e) for e in g["ceiling"]])
        for g in data["headline"]["groups"]])
  out["eval"] = [dict(r, eval=timed(r["eval"])) for r in data.get("eval", [])]
  return out


def plot(results: dict, path: str) -> None:
  """Items/s per encoding (one bar per size) and, if measured, posenc vs linen vs timm."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  families = [f for f in FAMILIES if results.get(f)]
  fig, axes = plt.subplots(1, len(families) + 1, figsize=(6 * (len(families) + 1), 4), squeeze=False)
  for ax, family in zip(axes[0][1:], families):
    groups = results[family]
    names = [e.name for e in groups[0]["entries"] if e.name != LINEN]
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
      none = find_entry(g, "none")
      rel = [(find_entry(g, n).rate / none.rate) if none else find_entry(g, n).rate for n in names]
      ax.bar([j + i * width for j in range(len(names))], rel, width, label=f"{FAMILIES[family].size_name} {g['size']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel(f"{FAMILIES[family].unit} relative to `none`")
    ax.set_title(f"{family}: {groups[0]['model']}")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
  ax = axes[0][0]
  group = results["headline"]["groups"][0] if results.get("headline") else None
  found = [(name, find_entry(group, name)) for name in (POSENC, LINEN, TIMM)] if group else []
  found = [(name, e) for name, e in found if e is not None]
  if len(found) >= 2:
    ax.bar([{POSENC: "posenc", LINEN: "Flax linen", TIMM: "timm"}[n] for n, _ in found], [e.rate for _, e in found],
           color=["C0", "C7", "C1"][:len(found)])
    ax.set_ylabel("images/s")
    ax.set_title(f"{group['model']} {group['size']}px, batch {group['batch']}")
  else:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(results: dict, text: str, directory: str, name: str = "speed") -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{name}.md"), "w") as f:
    f.write(text)
  with open(os.path.join(directory, f"{name}.json"), "w") as f:
    json.dump(to_json(results), f, indent=1, default=str)
  plot(results, os.path.join(directory, f"{name}.png"))
