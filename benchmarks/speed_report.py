"""Markdown tables, JSON and plots for benchmarks/speed.py's measurements."""
from __future__ import annotations

import json
import os
import statistics
import time

from timing import Timed, ceiling_rate

UNITS = {"vit": ("img/s", "image side"), "bert": ("tok/s", "max_len"), "gpt": ("tok/s", "max_len")}
FAMILIES = {"vit": "ViT (configs/vit_tiny.py:full)", "bert": "BERT (configs/bert_small.py:full)",
            "gpt": "GPT (configs/gpt_tiny.py)"}


def stem(profile: str) -> str:
  """File name stem of a profile's report: speed.* for the CPU (and CI's quick), speed_<profile>.* else."""
  return "speed" if profile in ("cpu", "quick") else f"speed_{profile}"


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


POSENC, LINEN, TIMM = "posenc", "Flax linen reference", "timm"  # benchmarks/speed.py's entry names
LABELS = {POSENC: "posenc (`learned`, real train step of `setup(config)`)",
          LINEN: "Flax linen reference (benchmarks/linen_vit.py)",
          TIMM: "timm `VisionTransformer`, PyTorch eager (benchmarks/timm_vit.py)"}


def ratio(ours: Timed, other: Timed | None) -> tuple[float, float, float] | None:
  """(ratio of median images/s, lowest and highest per-round ratio); None without ``other``."""
  if other is None:
    return None
  per_round = [(ours.items / o) / (other.items / t) for o, t in zip(ours.times, other.times)]
  return ours.rate / other.rate, min(per_round), max(per_round)


def ceiling_fraction(entry: Timed, ceiling: list[Timed]) -> tuple[float, float, float] | None:
  """FLOP/s of ``entry`` (XLA's count) over the ceiling's (median; lowest and highest per round)."""
  if not entry.flops or not ceiling:
    return None
  per_round = [(entry.flops / t) / ceiling_rate(ceiling, r) for r, t in enumerate(entry.times)]
  return (entry.flops / entry.seconds) / ceiling_rate(ceiling), min(per_round), max(per_round)


def _x(r) -> str:
  return "—" if r is None else f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f})"


def _verdict(met: bool) -> str:
  return "met" if met else "**not met**"


def _group_name(g: dict) -> str:
  return f"`{g['model']}`/{g['patch']} {g['size']} px, batch {g['batch']}"


def headline(section: dict, goals: dict | None, dataset: str | None = None) -> list[str]:
  """Section 1: posenc vs timm vs linen per headline group, the ceiling, compile times."""
  groups = section["groups"]
  if not groups:
    return []
  if section.get("timm"):
    timm_line = (f"timm: {section['timm']}, on {section['device']}"
                 + (f" with {section['threads']} torch threads "
                    + (f"(= the host's {section['cores']} cores)" if section["threads"] == section["cores"] else
                       f"(`--torch-threads`; the host has {section['cores']} cores)")
                    if section.get("threads") else "") + ".")
  else:
    timm_line = f"**timm skipped**: {section.get('timm_note')}."
  load, cores = section.get("load_start"), section.get("cores") or 1
  if section.get("timm") and section["device"] == "cpu" and load is not None and load > cores / 2:
    timm_line += (f" The load average was {load:.1f} on {cores} cores when this section started: torch's "
                  f"OpenMP threads wait at every op's barrier for a thread the OS has descheduled, so on a busy "
                  f"machine timm loses far more than the XLA steps do, and posenc / timm overstates the lead; "
                  f"measure it on an idle machine (or see `--torch-threads 1`).")
  lines = ["## 1. posenc vs timm and a Flax linen ViT", "",
           "The same ViT (learned position table, class token, pre-LN, tanh-GELU; "
           + ("synthetic 3-channel images, 1,000 classes" if dataset == "synthetic" else
              "1-channel Fashion-MNIST images, 10 classes") + "; the model's width, depth, heads and MLP width) trained by three "
           "implementations on the same batch with AdamW, float32 unless the profile says otherwise "
           f"({groups[0]['dtype']} here): posenc's real step (which also clips gradients, follows its LR "
           "schedule and computes accuracy, gradient norm and a finiteness check), a straightforward Flax "
           "linen one, and timm's `VisionTransformer` in a plain PyTorch eager loop. All of a group's "
           "contenders, and its ceiling matmuls, are timed in the same interleaved rounds. " + timm_line, "",
           "| model | implementation | img/s | step ms (median) | compile s | GFLOP/step | % of ceiling | XLA MB |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for g in groups:
    for e in g["entries"]:
      label = LABELS.get(e.name, e.name)
      compiled = "— (eager)" if e.compile_s is None else _num(e.compile_s)
      frac = ceiling_fraction(e, g["ceiling"])
      lines.append(f"| {_group_name(g)} | {label} | {_num(e.rate)} | {_num(1e3 * e.seconds, 0)} | {compiled} | "
                   f"{_num(e.flops and e.flops / 1e9)} | {_pct(frac and frac[0])} | {_mb(e.xla_bytes)} |")
  lines += ["", "Ratios of images/s (median over rounds; in brackets the lowest and highest per-round ratio) and "
            "the shape-limited ceiling:", "",
            "| model | posenc / timm | posenc / linen | ceiling GFLOP/s | posenc GFLOP/s | posenc % of ceiling "
            "| step ms at the ceiling | left on the table, ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for g in groups:
    ours = _entry(g, POSENC)
    ceiling = ceiling_rate(g["ceiling"]) if g["ceiling"] else None
    frac = ceiling_fraction(ours, g["ceiling"])
    at_ceiling = ours.flops / ceiling if ceiling and ours.flops else None
    lines.append(f"| {_group_name(g)} | {_x(ratio(ours, _entry(g, TIMM)))} | {_x(ratio(ours, _entry(g, LINEN)))} | "
                 f"{_num(ceiling and ceiling / 1e9)} | {_num(ours.flops and ours.flops / ours.seconds / 1e9)} | "
                 f"{_pct(frac and frac[0])} ({_pct(frac and frac[1])}–{_pct(frac and frac[2])}) | "
                 f"{_num(at_ceiling and 1e3 * at_ceiling, 0)} | "
                 f"{_num(at_ceiling and 1e3 * (ours.seconds - at_ceiling), 0)} |")
  first = groups[0]
  ours = _entry(first, POSENC)
  vs_timm, vs_linen = ratio(ours, _entry(first, TIMM)), ratio(ours, _entry(first, LINEN))
  bold = [f"posenc / timm = {vs_timm[0]:.2f}×" if vs_timm else "posenc / timm: not measured",
          f"posenc / linen = {vs_linen[0]:.2f}×" if vs_linen else "posenc / linen: not measured"]
  lines += ["", f"**{', '.join(bold)} images/s** at {_group_name(first)} (ratio of medians over "
            f"{len(ours.times)} interleaved rounds).", ""]
  shapes = ", ".join(f"`{e.name}`" for e in first["ceiling"][:3])
  lines += [f"*Ceiling*: the matmuls of one layer's projections at the model's shapes (M = batch × tokens = "
            f"{first['batch']} × {first['tokens']} for the first group): for each of q/k/v, attention output, "
            f"MLP in and MLP out, the forward product, the input gradient and the weight gradient as autodiff "
            f"writes them (e.g. {shapes}), 12 matmuls through `jax.jit` timed in the same rounds; the ceiling "
            f"is their total FLOPs over their total time. *% of ceiling* = the step's FLOPs (XLA's cost "
            f"analysis) per second over the ceiling's. *Step ms at the ceiling* = the step's FLOPs at the "
            f"ceiling's rate; *left on the table* = the measured step minus that. The step's attention "
            f"products, softmax, norms, GELU and optimizer update run below matmul speed, so a whole step "
            f"stays below 100%; the gap bounds what any implementation could still gain.", ""]
  if goals:
    lines += goal_lines(groups, goals) + [""]
  lines += compile_lines(first, goals)
  return lines


def goal_lines(groups: list[dict], goals: dict) -> list[str]:
  out = []
  for i, g in enumerate(groups):
    ours = _entry(g, POSENC)
    vs_timm, vs_linen = ratio(ours, _entry(g, TIMM)), ratio(ours, _entry(g, LINEN))
    parts = []
    for name, r, goal in (("timm", vs_timm, goals["timm"]), ("linen", vs_linen, goals["linen"])):
      if r is None:
        parts.append(f"vs {name}: not measured")
      elif i == 0:
        parts.append(f"≥ {goal:.2f}× {name}: {_verdict(r[0] >= goal)} ({r[0]:.2f}×)")
      else:
        parts.append(f"ahead of {name}: {_verdict(r[0] > 1.0)} ({r[0]:.2f}×)")
    which = "the issue's goal" if i == 0 else "the same order (posenc first)"
    out.append(f"- {_group_name(g)}, {which}: " + "; ".join(parts) + ".")
  return ["Goals of the issue (2 CPU cores):", ""] + out


DEVICE_GOALS = dict(vit_mfu=0.45, gpt_tokens=400e3, overhead=0.10)  # H100/H200-class, bfloat16


def device_goal_lines(results: dict) -> list[str]:
  """The accelerator goals: ViT-B/16 224 px at >= 45 % MFU, GPT-2 small >= 400k tok/s, every
  encoding within 10 % of `none`."""
  out, peak = [], results.get("peak_flops")
  for g in results.get("vit", [])[:1]:
    e = _entry(g, "learned") or g["entries"][0]
    if peak and e.flops:
      frac = e.flops / e.seconds / peak
      out.append(f"- `{g['model']}` {g['size']} px (`{e.name}`) at ≥ {DEVICE_GOALS['vit_mfu']:.0%} MFU of peak: "
                 f"{_verdict(frac >= DEVICE_GOALS['vit_mfu'])} ({frac:.1%}).")
  for g in results.get("gpt", [])[:1]:
    e = _entry(g, "learned") or g["entries"][0]
    out.append(f"- `{g['model']}` at {g['size']} tokens (`{e.name}`) ≥ {DEVICE_GOALS['gpt_tokens'] / 1e3:,.0f}k tok/s: "
               f"{_verdict(e.rate >= DEVICE_GOALS['gpt_tokens'])} ({e.rate / 1e3:,.0f}k).")
  for family in ("vit", "gpt"):
    for g in results.get(family, []):
      none = _entry(g, "none")
      if none is None:
        continue
      worst = max(g["entries"], key=lambda e: e.seconds)
      over = worst.seconds / none.seconds - 1
      out.append(f"- {family} {g['size']}: every encoding within {DEVICE_GOALS['overhead']:.0%} of `none`: "
                 f"{_verdict(over <= DEVICE_GOALS['overhead'])} (slowest `{worst.name}`, {over:+.0%}).")
  return ["Goals of the issue (H100/H200-class GPU, bfloat16):", ""] + out + [""] if out else []


def compile_lines(group: dict, goals: dict | None) -> list[str]:
  """Compile time of the first group's train step with its layers scanned and unrolled."""
  ours = _entry(group, POSENC)
  mode = "scanned" if group["scan_layers"] else "unrolled"
  other = next((e for e in group["entries"] if e.name.startswith(f"{POSENC}, ")), None)
  linen = _entry(group, LINEN)
  rows = [(f"posenc, {mode} layers (this backend's default)", ours)]
  if other is not None:
    rows.append((f"posenc, {other.name.split(', ')[1]}", other))
  if linen is not None:
    rows.append(("Flax linen reference (Python loop: unrolled)", linen))
  lines = [f"### Compile time of the train step ({_group_name(group)}, depth {group['depth']})", "",
           "Lowering + XLA compilation (`jit(...).lower(...).compile()`), timed once per step; the steps run in "
           "the rounds above.", "",
           "| train step | compile s | step ms (median) | img/s |", "|---|---:|---:|---:|"]
  for label, e in rows:
    lines.append(f"| {label} | {_num(e.compile_s)} | {_num(1e3 * e.seconds, 0)} | {_num(e.rate)} |")
  lines.append("")
  if other is not None:
    scanned, unrolled = (ours, other) if group["scan_layers"] else (other, ours)
    text = (f"Scanned: {scanned.compile_s:.1f} s to compile; unrolled: {unrolled.compile_s:.1f} s "
            f"({unrolled.compile_s / scanned.compile_s:.1f}× the scanned compile), for "
            f"{scanned.seconds / unrolled.seconds:.2f}× the scanned step's images/s.")
    if goals:
      text += (f" Goal ≤ {goals['compile_scanned_s']:.0f} s scanned: "
               f"{_verdict(scanned.compile_s <= goals['compile_scanned_s'])}.")
    lines += [text, ""]
  return lines


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.0f}%"


def train_table(family: str, groups: list[dict], peak: float | None = None) -> list[str]:
  unit, size_name = UNITS[family]
  lines = [f"| {size_name} | batch | posenc | {unit} | step ms | vs `none` | compile s | GFLOP/step | MFU "
           f"| MFU of peak | attention | XLA MB | RSS peak MB | loader {unit} |", "|---:|---:|---|" + "---:|" * 11]
  for g in groups:
    none = _entry(g, "none")
    for e in g["entries"]:
      if e.name == LINEN:  # reports written before the headline was its own section
        continue
      overhead = "—" if none is None else f"{100 * (e.seconds / none.seconds - 1):+.0f}%"
      loader = g.get("loader")
      starved = " (starved)" if loader is not None and loader < e.rate else ""
      of_peak = peak and e.flops and e.flops / e.seconds / peak
      lines.append(f"| {g['size']} | {g['batch']} | `{e.name}` | {_num(e.rate)} | {_num(1e3 * e.seconds, 0)} | "
                   f"{overhead} | {_num(e.compile_s)} | {_num(e.flops and e.flops / 1e9)} | "
                   f"{_pct(mfu(e, g['matmul']))} | {_pct(of_peak)} | {e.attention or '—'} | {_mb(e.xla_bytes)} | "
                   f"{_mb(e.rss_bytes)} | {'synthetic' if loader is None else _num(loader, 0)}{starved} |")
  return lines


def matmul_line(groups: list[dict]) -> str:
  rates = [g["matmul"].flops / g["matmul"].seconds / 1e9 for g in groups]
  return (f"Reference: {groups[0]['matmul'].name} matmul through `jax.jit`, timed in the same rounds as each "
          f"group: {', '.join(f'{r:,.1f}' for r in rates)} GFLOP/s (one number per row group, in order).")


def markdown(results: dict) -> str:
  load = results.get("load_end")  # as measured (a report re-rendered elsewhere keeps its machine's)
  cores = results.get("cores") or os.cpu_count() or 1
  lines = ["# posenc speed", "", f"Profile `{results['profile']}`, measured {max(results['measured'].values())} "
           f"in {results['seconds'] / 60:.1f} min (`python benchmarks/speed.py"
           f"{' --quick' if results['profile'] == 'quick' else ''}`).", ""]
  lines += [f"- {h}" for h in results["header"]] + [f"- load average at end: {_num(load)}", ""]
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
  for family, title in FAMILIES.items():
    if results.get(family):
      groups = results[family]
      lines += [f"### {title}, model `{groups[0]['model']}`", "", matmul_line(groups), ""]
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
      again = "—" if r["transfer_s"] is None else _num(1e3 * r["transfer_s"], 2)
      first = "— (built at this size)" if r["transfer_first_s"] is None else _num(r["transfer_first_s"], 2)
      lines.append(f"| {r['size']} | {r['tokens']} | {first} | {again} | {_num(r['eval'].compile_s)} | "
                   f"{_num(r['eval'].rate)} | {'synthetic' if r['loader'] is None else _num(r['loader'], 0)} |")
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
    lines.append(f"| `{r['posenc']}` | {r['source']} → {r['target']} | {changed} | {_num(r['save_s'], 2)} | "
                 f"{_num(r['first_s'], 2)} | {_num(r['again_s'], 2)} | "
                 f"{_num(plain and 1e3 * statistics.median(plain))} | "
                 f"{_num(moved and 1e3 * statistics.median(moved))} | {_x(restore)} | {_num(r['megabytes'])} |")
  lines.append("")
  measured = [(r, restore_ratio(r)) for r in rows if r["changed"] and restore_ratio(r)]
  if measured:
    text = "; ".join(f"`{r['posenc']}` {x[0]:.2f}×" for r, x in measured)
    goal = goals and goals.get("restore_ratio")
    verdict = "" if not goal else (f" Goal ≤ {goal:.1f}×: "
                                   f"{_verdict(all(x[0] <= goal for _, x in measured))}.")
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
      none = _entry(g, "none")
      rel = [(_entry(g, n).rate / none.rate) if none else _entry(g, n).rate for n in names]
      ax.bar([j + i * width for j in range(len(names))], rel, width, label=f"{UNITS[family][1]} {g['size']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel(f"{UNITS[family][0]} relative to `none`")
    ax.set_title(f"{family}: {groups[0]['model']}")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
  ax = axes[0][0]
  group = results["headline"]["groups"][0] if results.get("headline") else None
  found = [(name, _entry(group, name)) for name in (POSENC, LINEN, TIMM)] if group else []
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
