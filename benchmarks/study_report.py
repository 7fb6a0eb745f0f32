"""Markdown tables, JSON and a plot for benchmarks/study.py's cells."""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import time

from benchmarks.study_stats import diff_text, ordering, paired

MODES = {"transfer": "(a) no fine-tuning: the trained model, position parameters transferred",
         "finetune": "(b) after a short fine-tune at each geometry"}
LM_MODES = {"nonoverlap": "non-overlapping windows of the evaluated length",
            "sliding": "sliding windows of the evaluated length, scoring their last S tokens"}
TITLES = {"vit": ("ViT on Fashion-MNIST", "test accuracy (%) by image side", "×"),
          "bert": ("BERT-style encoder, masked language modelling", "test MLM accuracy (%) by sequence length", ""),
          "gpt": ("GPT-style causal LM, length extrapolation", "test perplexity by evaluated length", ""),
          "vit_crop35": ("ViT mechanism experiment, training crops of 35-100 % of the area",
                         "test accuracy (%) by image side", "×"),
          "vit_crop08": ("ViT mechanism experiment, training crops of 8-100 % of the area (DeiT / RoPE-ViT)",
                         "test accuracy (%) by image side", "×"),
          "algo": ("GPT-style decoder, algorithmic length generalisation", "test exact match (%) by problem size n",
                   "")}
CONFIGS = {"vit": "vit_tiny", "bert": "bert_small", "gpt": "gpt_tiny", "algo": "algo_tiny"}
ALGO_TASKS = {"copy": "copy: [BOS] x_1..x_n [SEP] x_1..x_n [EOS]",
              "reverse": "reverse: [BOS] x_1..x_n [SEP] x_n..x_1 [EOS]",
              "add": "add: [BOS] a [PLUS] b [SEP] a + b [EOS], n digits each, least-significant first",
              "lookup": "lookup: [BOS] k_1 v_1..k_n v_n [SEP] q v_q [EOS], n distinct keys, q one of them"}
PERCENT = ("accuracy", "exact_match")  # fractions, shown in percent
# Every line of a panel distinct in colour and in marker and line style (13 colours, 11 markers, 3 styles).
STYLES = list(itertools.islice(zip(itertools.cycle([f"C{i}" for i in range(10)] + ["tab:olive", "tab:cyan", "k"]),
                                   itertools.cycle("osD^v<>PX*h"), itertools.cycle(["-", "--", ":"])), 60))


def describe(family) -> dict:
  """What a report needs to know of a study.Family, study_lm.LMFamily, study_vit.ImageFamily or
  study_algo.AlgoFamily."""
  out = dict(name=family.name, overrides=family.overrides, base=family.base, sizes=list(family.sizes),
             encodings=list(family.encodings), failed=list(getattr(family, "failed", ())),
             superseded=dict(getattr(family, "superseded", ())))
  if hasattr(family, "protocols"):  # the image family: modes are evaluation protocols
    variants = {k: f"`{v}`" for k, v in family.variants if k in family.encodings}
    variants.update({label: f"evaluated from the `{base}` run with `{args}`"
                     for label, base, args in family.eval_variants})
    return dict(out, kind="image", field="image_size", protocols=list(family.protocols),
                finetune_sizes=list(family.finetune_sizes), finetune_steps=family.finetune_steps,
                finetune_lr_scale=family.finetune_lr_scale, posenc_lr_mult=family.posenc_lr_mult,
                variants=variants, reference="learned" if family.eval_variants else None)
  if hasattr(family, "tasks"):  # the algorithmic family: modes are tasks, sizes problem sizes n
    variants = {label: f"evaluated from the `{base}` run with `{args}`" for label, base, args in family.variants}
    variants.update({label: f"trained with `{args}`" for label, args in family.trained_variants})
    return dict(out, kind="algo", field="n", tasks=list(family.tasks), lengths=family.lengths(),
                variants={k: v for k, v in variants.items() if k in family.encodings})
  if hasattr(family, "stride"):  # a language-model family: modes are window kinds
    variants = {label: f"evaluated from the `{base}` run with `{args}`" for label, base, args in family.variants}
    variants.update({label: f"trained with `{args}`" for label, args in family.trained_variants})
    return dict(out, kind="lm", field="max_len", stride=family.stride, eval_tokens=family.eval_tokens,
                variants={k: v for k, v in variants.items() if k in family.encodings})
  return dict(out, kind="accuracy", field=family.field, finetune_steps=family.finetune_steps,
              finetune_lr_scale=family.finetune_lr_scale, posenc_lr_mult=family.posenc_lr_mult,
              variants=dict(family.variants))


def summary(cells: list[dict], family: str, posenc: str, mode: str, size: int,
            metric: str = "accuracy") -> tuple[float, float, int]:
  """(mean, sample std, count) over seeds of the accuracy or exact match in percent, or of the loss / perplexity."""
  scale = 100 if metric in PERCENT else 1
  values = [scale * c[metric] for c in cells
            if (c["family"], c["posenc"], c["mode"], c["size"]) == (family, posenc, mode, size)]
  if not values:
    return float("nan"), float("nan"), 0
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def cell_text(mean: float, std: float, count: int, digits: int = 1) -> str:
  if not count:
    return "—"
  return f"{mean:.{digits}f}" if count == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def lm_lines(results: dict, f: dict) -> list[str]:
  title, what, _ = TITLES[f["name"]]
  seeds = sorted({c["seed"] for c in results["cells"] if c["family"] == f["name"]})
  base = results.get("baselines", {}).get(f["name"], {})
  lines = [f"## {title}: trained at length {f['base']}, {what}", "",
           f"Seeds recorded: {', '.join(map(str, seeds)) or 'none'}. Config `configs/gpt_tiny.py:{f['overrides']}`; "
           f"every length and mode scores the same {f['eval_tokens']:,} test tokens; S = {f['stride']}."]
  lines += [f"`{label}`: {text}." for label, text in f.get("variants", {}).items()]
  if base:
    lines += ["", f"Baselines on the same tokens (train-split counts): unigram (no context) perplexity "
                  f"{base['unigram']:.1f}; bigram (the previous token only, interpolated with the unigram at "
                  f"weight {base['bigram_weight']:.2f}) {base['bigram']:.1f}."]
  lines.append("")
  for mode, caption in LM_MODES.items():
    if mode == "sliding":
      caption += f" (at {f['base']}, the trained length, the windows do not overlap: the same as above)"
    lines += [f"### {caption}: test perplexity", "",
              "| posenc | " + " | ".join(f"{n}" + (" (trained)" if n == f["base"] else "") for n in f["sizes"]) + " |",
              "|---|" + "---:|" * len(f["sizes"])]
    for posenc in f["encodings"] + list(f.get("superseded", {})):
      row = [cell_text(*summary(results["cells"], f["name"], posenc, mode, n, "perplexity"), 1) for n in f["sizes"]]
      lines.append(f"| {row_label(f, posenc)} | " + " | ".join(row) + " |")
    lines.append("")
  lines += notes(f) + ordering_lines(results, f, list(LM_MODES), "loss")
  return lines


def algo_lines(results: dict, f: dict) -> list[str]:
  """Per task, exact match (%) by n (mean ± sd over seeds), then the orderings by exact match."""
  title, what, _ = TITLES[f["name"]]
  seeds = sorted({c["seed"] for c in results["cells"] if c["family"] == f["name"]})
  lengths = ", ".join(f"{task} {n}" for task, n in f["lengths"].items())
  lines = [f"## {title}: trained at n ≤ {f['base']}, {what}", "",
           f"Seeds recorded: {', '.join(map(str, seeds)) or 'none'}. Config `configs/algo_tiny.py:{f['overrides']}`; "
           f"trained on n uniform in 1..{f['base']}, evaluated at exactly n on the same test examples for every "
           f"model. A row counts only if every answer token and EOS is the argmax under teacher forcing (what "
           f"greedy decoding reproduces)."
           + (f" `{{length}}`: the trained sequence length ({lengths} tokens)."
              if any("{length}" in text for text in f.get("variants", {}).values()) else "")]
  lines += [f"`{label}`: {text}." for label, text in f.get("variants", {}).items()] + [""]
  for task in f["tasks"]:
    lines += [f"### {ALGO_TASKS.get(task, task)}: test exact match (%)", "",
              "| posenc | " + " | ".join(f"{n}" + (" (trained)" if n <= f["base"] else "") for n in f["sizes"]) + " |",
              "|---|" + "---:|" * len(f["sizes"])]
    for posenc in f["encodings"] + list(f.get("superseded", {})):
      row = [cell_text(*summary(results["cells"], f["name"], posenc, task, n, "exact_match"), 1) for n in f["sizes"]]
      lines.append(f"| {row_label(f, posenc)} | " + " | ".join(row) + " |")
    lines.append("")
  return lines + notes(f) + ordering_lines(results, f, f["tasks"], "exact_match")


def row_label(f: dict, label: str) -> str:
  if label in f.get("failed", ()):
    return f"`{label}` (failed to train: not ranked)"
  if label in f.get("superseded", {}):
    return f"`{label}` (superseded setting: not ranked)"
  return f"`{label}`"


def notes(f: dict) -> list[str]:
  out = [f"`{label}`: {why}." for label, why in f.get("superseded", {}).items()]
  return out + [""] if out else []


def ordering_lines(results: dict, f: dict, modes, metric: str) -> list[str]:
  """Per mode and size, the ranked labels: ``≻`` where the 95 % CI of the paired difference of the
  neighbours (over the seeds both have) excludes zero, ``≈`` where it does not."""
  ranked = [e for e in f["encodings"] if e not in f.get("failed", ())]
  lines = [f"### Orderings ({metric}; `a ≻ b`: a better, the 95 % CI of the paired difference over seeds excludes "
           f"zero; `≈`: unresolved)", "", "| mode | " + f["field"] + " | ordering, best first |", "|---|---:|---|"]
  for mode in modes:
    for size in f["sizes"]:
      lines.append(f"| {mode} | {size} | {ordering(results['cells'], f['name'], ranked, mode, size, metric)} |")
  return lines + [""]


PROTOCOLS = {"zoom": "zoom: the image resampled to each size (the object grows with the grid)",
             "canvas": "canvas: the image at its trained scale on a larger canvas / cropped from a smaller one"}


def image_lines(results: dict, f: dict) -> list[str]:
  title, what, cross = TITLES[f["name"]]
  seeds = sorted({c["seed"] for c in results["cells"] if c["family"] == f["name"]})
  label = lambda s: f"{s}{cross}{s} ({s // 4}×{s // 4} grid)"  # noqa: E731
  lines = [f"## {title}: trained at {f['base']}{cross}{f['base']}, {what}", "",
           f"Seeds recorded: {', '.join(map(str, seeds)) or 'none'}. Config `configs/vit_tiny.py:{f['overrides']}`; "
           + (f"fine-tune: {f['finetune_steps']} steps at {f['finetune_lr_scale']}× the config's peak lr, position "
              f"parameters at {f['posenc_lr_mult']}× that, on the protocol's images at that size."
              if f["finetune_steps"] else "no fine-tuning.")]
  lines += [f"`{name}`: {args}." for name, args in f.get("variants", {}).items()] + [""]
  for protocol in f["protocols"]:
    for mode, sizes, caption in ((protocol, f["sizes"], "no fine-tuning"),
                                 (f"{protocol}+ft", f["finetune_sizes"], "after fine-tuning at that size")):
      if not sizes:
        continue
      lines += [f"### {PROTOCOLS[protocol]}; {caption}: test accuracy (%)", "",
                "| posenc | " + " | ".join(label(s) + (" (trained)" if s == f["base"] else "") for s in sizes) + " |",
                "|---|" + "---:|" * len(sizes)]
      for posenc in f["encodings"] + list(f.get("superseded", {})):
        row = [cell_text(*summary(results["cells"], f["name"], posenc, mode, s), 1) for s in sizes]
        lines.append(f"| {row_label(f, posenc)} | " + " | ".join(row) + " |")
      lines.append("")
  lines += notes(f)
  if f.get("reference"):
    lines += reference_lines(results, f)
  return lines + ordering_lines(results, f, f["protocols"], "accuracy")


def reference_lines(results: dict, f: dict) -> list[str]:
  """Each label minus the reference (``learned``) at each size, paired by seed: mean [95 % CI] in points."""
  ref, cells = f["reference"], results["cells"]
  lines = []
  for protocol in f["protocols"]:
    lines += [f"### {protocol}: accuracy minus `{ref}`'s, paired by seed (points, mean [95 % CI])", "",
              "| posenc | " + " | ".join(str(s) for s in f["sizes"]) + " |", "|---|" + "---:|" * len(f["sizes"])]
    for label in f["encodings"]:
      if label != ref:
        lines.append(f"| `{label}` | " + " | ".join(
            diff_text(paired(cells, f["name"], ref, label, protocol, s, "accuracy"), "accuracy")
            for s in f["sizes"]) + " |")
    lines.append("")
  return lines


def family_lines(results: dict, f: dict) -> list[str]:
  if f.get("kind") == "lm":
    return lm_lines(results, f)
  if f.get("kind") == "image":
    return image_lines(results, f)
  if f.get("kind") == "algo":
    return algo_lines(results, f)
  title, what, cross = TITLES[f["name"]]
  sizes = f["sizes"]
  label = lambda s: f"{s}{cross}{s}" if cross else str(s)
  seeds = sorted({c["seed"] for c in results["cells"] if c["family"] == f["name"]})
  lines = [f"## {title}: trained at {label(f['base'])}, {what}", "",
           f"Seeds recorded: {', '.join(map(str, seeds)) or 'none'}. Config `configs/{CONFIGS[f['name']]}.py:{f['overrides']}`; "
           f"fine-tune: {f['finetune_steps']} steps at {f['finetune_lr_scale']}× the config's peak lr, "
           f"position parameters at {f['posenc_lr_mult']}× that."]
  lines += [f"`{label}` is `{args}`." for label, args in f.get("variants", {}).items()] + [""]
  tables = [(mode, caption, "accuracy", 1) for mode, caption in MODES.items()]
  tables.append(("transfer", "(a) no fine-tuning, test loss (cross-entropy, nats)", "loss", 3))
  for mode, caption, metric, digits in tables:
    lines += [f"### {caption}", "",
              "| posenc | " + " | ".join(label(s) + (" (trained)" if s == f["base"] else "") for s in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    for posenc in f["encodings"]:
      cells = [cell_text(*summary(results["cells"], f["name"], posenc, mode, s, metric), digits) for s in sizes]
      lines.append(f"| `{posenc}` | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def markdown(results: dict) -> str:
  seeds = results["seeds"]
  minutes = sum(c.get("seconds", 0.0) for c in results["cells"]) / 60
  lines = ["# posenc study: position encodings across resolution and length", "",
           f"Profile `{results['profile']}`, reported {time.strftime('%Y-%m-%d %H:%M')}; "
           f"{minutes:.0f} min of runs, summed over processes (`python benchmarks/study.py"
           f"{' --quick' if results['profile'] == 'quick' else ''}`).", ""]
  lines += [f"- {line}" for line in results["header"]]
  lines += [f"- seeds: {'; '.join(f'{f} ' + ', '.join(map(str, s)) for f, s in seeds.items())}; each cell is the mean ± sample standard deviation over "
            f"the seeds recorded (a bare number: one seed); one model per encoding and seed, trained "
            f"once, evaluated at every size", ""]
  for f in results["families"]:
    lines += family_lines(results, f)
  return "\n".join(lines).rstrip() + "\n"


VARIANT_STYLES = {"multires": "--", "dinov3": ":", "cape": ":"}  # image variants' line styles


def plot_rows(f: dict) -> list[list[str]]:
  """The encodings drawn in each row of panels: images split their plain encodings from the
  labelled variants (drawn with their base encoding, thin, for reference); the others one row."""
  if f.get("kind") != "image" or not any("+" in e for e in f["encodings"]):
    return [f["encodings"]]
  variants = [e for e in f["encodings"] if "+" in e]
  bases = [e for e in f["encodings"] if "+" not in e]
  return [bases, [e for e in bases if any(v.split("+")[0] == e for v in variants)] + variants]


def plot_modes(f: dict) -> dict[str, str]:
  """A row's panels, one per mode: {mode: caption} (the caption's text before a colon titles the panel)."""
  if f.get("kind") == "image":
    return {p: PROTOCOLS[p] for p in f["protocols"]}
  if f.get("kind") == "algo":
    return {task: ALGO_TASKS.get(task, task) for task in f["tasks"]}
  return LM_MODES if f.get("kind") == "lm" else MODES


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [(f, names) for f in results["families"] for names in plot_rows(f)]
  if not rows:  # nothing recorded yet
    return
  columns = max(2, *(len(plot_modes(f)) for f, _ in rows))
  fig, axes = plt.subplots(len(rows), columns, figsize=(5.5 * columns, 4 * len(rows)), squeeze=False, sharey="row")
  for row, (f, names) in zip(axes, rows):
    lm, image, algo = f.get("kind") == "lm", f.get("kind") == "image", f.get("kind") == "algo"
    variant_row = image and any("+" in n for n in names)  # variants, each beside its base drawn thin
    modes = plot_modes(f)
    metric = "loss" if lm else "exact_match" if algo else "accuracy"
    for ax in row[len(modes):]:
      ax.set_visible(False)
    colours = {name: STYLES[i][0] for i, name in enumerate(f["encodings"])}
    markers = {name: STYLES[i][1] for i, name in enumerate(f["encodings"])}
    dashes = {name: STYLES[i][2] for i, name in enumerate(f["encodings"])}
    for ax, (mode, caption) in zip(row, modes.items()):
      for i, posenc in enumerate(names):
        reference = variant_row and "+" not in posenc
        style, colour, marker = dashes[posenc], colours[posenc], markers[posenc]
        if image:  # a variant in its base's colour, in the variant's line style
          colour, style = colours.get(posenc.split("+")[0], colour), VARIANT_STYLES.get(posenc.partition("+")[2], style)
        stats = [summary(results["cells"], f["name"], posenc, mode, s, metric) for s in f["sizes"]]
        ax.errorbar(f["sizes"], [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], marker=marker,
                    capsize=2, label=posenc, color=colour, linewidth=0.7 if reference else 1.5,
                    alpha=0.5 if reference else 1.0, linestyle=style)
        if image and not reference:  # fine-tuned points: stars of the same colour
          tuned = [summary(results["cells"], f["name"], posenc, f"{mode}+ft", s) for s in f["finetune_sizes"]]
          ax.plot(f["finetune_sizes"], [m for m, _, _ in tuned], "*", ms=9, color=colour)
      ax.axvline(f["base"], color="grey", linewidth=0.8)
      ax.set_xscale("log", base=2)
      ax.set_xticks(f["sizes"], [str(s) for s in f["sizes"]])
      ax.set_title(f"{f['name']}: {caption.split(':')[0]}" + (" (stars: after fine-tuning)" if image else "")
                   + ("\nvariants; thin: their base encoding" if variant_row else ""),
                   fontsize=10)
      ax.set_xlabel(f["field"])
      ax.set_ylabel("test log-perplexity (nats per token)" if lm else "exact match (%)" if algo else "accuracy (%)")
      if lm and results.get("baselines", {}).get(f["name"]):
        for name, style in (("unigram", ":"), ("bigram", "-.")):
          ax.axhline(math.log(results["baselines"][f["name"]][name]), color="black", linestyle=style,
                     linewidth=0.8, label=f"{name} baseline")
    row[len(modes) - 1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write(results: dict, text: str, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "study.md"), "w") as f:
    f.write(text)
  with open(os.path.join(directory, "study.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(directory, "study.png"))
