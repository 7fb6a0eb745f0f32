"""Section 1 of the speed report: posenc vs timm vs a Flax linen ViT, the ceiling, compile times;
and the number formats every section shares."""
from __future__ import annotations

from benchmarks.timing import Timed, ceiling_rate


def number_text(x, digits=1) -> str:
  if x is None:
    return "—"
  return f"{x:,.{digits}f}"


def mb_text(x) -> str:
  return "—" if x is None else f"{x / 2**20:,.0f}"


def find_entry(group: dict, name: str) -> Timed | None:
  return next((e for e in group["entries"] if e.name == name), None)


POSENC, LINEN, TIMM = "posenc", "Flax linen reference", "timm"  # benchmarks.speed's entry names
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


def ratio_text(r) -> str:
  return "—" if r is None else f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f})"


def verdict_text(met: bool) -> str:
  return "met" if met else "**not met**"


def group_name(g: dict) -> str:
  return f"`{g['model']}`/{g['patch']} {g['size']} px, batch {g['batch']}"


def headline(section: dict, goals: dict | None, dataset: str | None = None) -> list[str]:
  """Section 1: posenc vs timm vs linen per headline group, the ceiling, compile times."""
  groups = section["groups"]
  if not groups:
    return []
  if section.get("timm"):
    timm_line = (f"timm: {section['timm']}, on {section['device']}, timed in-process beside the JAX contenders "
                 "(torch's threads and XLA's share the cores)"
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
      compiled = "— (eager)" if e.compile_s is None else number_text(e.compile_s)
      frac = ceiling_fraction(e, g["ceiling"])
      lines.append(f"| {group_name(g)} | {label} | {number_text(e.rate)} | {number_text(1e3 * e.seconds, 0)} | {compiled} | "
                   f"{number_text(e.flops and e.flops / 1e9)} | {pct_text(frac and frac[0])} | {mb_text(e.xla_bytes)} |")
  lines += ["", "Ratios of images/s (median over rounds; in brackets the lowest and highest per-round ratio) and "
            "the shape-limited ceiling:", "",
            "| model | posenc / timm | posenc / linen | ceiling GFLOP/s | posenc GFLOP/s | posenc % of ceiling "
            "| step ms at the ceiling | left on the table, ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for g in groups:
    ours = find_entry(g, POSENC)
    ceiling = ceiling_rate(g["ceiling"]) if g["ceiling"] else None
    frac = ceiling_fraction(ours, g["ceiling"])
    at_ceiling = ours.flops / ceiling if ceiling and ours.flops else None
    lines.append(f"| {group_name(g)} | {ratio_text(ratio(ours, find_entry(g, TIMM)))} | {ratio_text(ratio(ours, find_entry(g, LINEN)))} | "
                 f"{number_text(ceiling and ceiling / 1e9)} | {number_text(ours.flops and ours.flops / ours.seconds / 1e9)} | "
                 f"{pct_text(frac and frac[0])} ({pct_text(frac and frac[1])}–{pct_text(frac and frac[2])}) | "
                 f"{number_text(at_ceiling and 1e3 * at_ceiling, 0)} | "
                 f"{number_text(at_ceiling and 1e3 * (ours.seconds - at_ceiling), 0)} |")
  first = groups[0]
  ours = find_entry(first, POSENC)
  vs_timm, vs_linen = ratio(ours, find_entry(first, TIMM)), ratio(ours, find_entry(first, LINEN))
  bold = [f"posenc / timm = {vs_timm[0]:.2f}×" if vs_timm else "posenc / timm: not measured",
          f"posenc / linen = {vs_linen[0]:.2f}×" if vs_linen else "posenc / linen: not measured"]
  lines += ["", f"**{', '.join(bold)} images/s** at {group_name(first)} (ratio of medians over "
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
    ours = find_entry(g, POSENC)
    vs_timm, vs_linen = ratio(ours, find_entry(g, TIMM)), ratio(ours, find_entry(g, LINEN))
    parts = []
    for name, r, goal in (("timm", vs_timm, goals["timm"]), ("linen", vs_linen, goals["linen"])):
      if r is None:
        parts.append(f"vs {name}: not measured")
      elif i == 0:
        parts.append(f"≥ {goal:.2f}× {name}: {verdict_text(r[0] >= goal)} ({r[0]:.2f}×)")
      else:
        parts.append(f"ahead of {name}: {verdict_text(r[0] > 1.0)} ({r[0]:.2f}×)")
    which = "the issue's goal" if i == 0 else "the same order (posenc first)"
    out.append(f"- {group_name(g)}, {which}: " + "; ".join(parts) + ".")
  return ["Goals of the issue (2 CPU cores):", ""] + out


def compile_lines(group: dict, goals: dict | None) -> list[str]:
  """Compile time of the first group's train step with its layers scanned and unrolled."""
  ours = find_entry(group, POSENC)
  mode = "scanned" if group["scan_layers"] else "unrolled"
  other = next((e for e in group["entries"] if e.name.startswith(f"{POSENC}, ")), None)
  linen = find_entry(group, LINEN)
  rows = [(f"posenc, {mode} layers (this backend's default)", ours)]
  if other is not None:
    rows.append((f"posenc, {other.name.split(', ')[1]}", other))
  if linen is not None:
    rows.append(("Flax linen reference (Python loop: unrolled)", linen))
  lines = [f"### Compile time of the train step ({group_name(group)}, depth {group['depth']})", "",
           "Lowering + XLA compilation (`jit(...).lower(...).compile()`), timed once per step; the steps run in "
           "the rounds above.", "",
           "| train step | compile s | step ms (median) | img/s |", "|---|---:|---:|---:|"]
  for label, e in rows:
    lines.append(f"| {label} | {number_text(e.compile_s)} | {number_text(1e3 * e.seconds, 0)} | {number_text(e.rate)} |")
  lines.append("")
  if other is not None:
    scanned, unrolled = (ours, other) if group["scan_layers"] else (other, ours)
    text = (f"Scanned: {scanned.compile_s:.1f} s to compile; unrolled: {unrolled.compile_s:.1f} s "
            f"({unrolled.compile_s / scanned.compile_s:.1f}× the scanned compile), for "
            f"{scanned.seconds / unrolled.seconds:.2f}× the scanned step's images/s.")
    if goals:
      text += (f" Goal ≤ {goals['compile_scanned_s']:.0f} s scanned: "
               f"{verdict_text(scanned.compile_s <= goals['compile_scanned_s'])}.")
    lines += [text, ""]
  return lines


def pct_text(x) -> str:
  return "—" if x is None else f"{100 * x:.0f}%"
