"""REFERENCE ONLY: timm's VisionTransformer trained by a plain PyTorch eager loop, for speed comparisons.

This is not part of posenc and not one of its dependencies: timm and torchvision are installed
for the benchmarks only (benchmarks/requirements.txt, by install.sh). ``benchmarks/speed.py``
times this step in the same interleaved rounds as posenc's train step and the Flax linen
reference (benchmarks/linen_vit.py). The model is timm's ``VisionTransformer`` configured as
posenc's ViT with ``posenc="learned"``: pre-LN blocks, class token, learned position table
(class token included), tanh-GELU, LayerNorm eps 1e-6, q/k/v biases, the class token read by the
head. The step is what a PyTorch user writes: forward, cross-entropy, backward,
``torch.optim.AdamW``. A CPU step is synchronous; on CUDA the stepper synchronises before it
returns, so the caller's wall-clock time is the step's.
"""
from __future__ import annotations

import os
import sys

import numpy as np


def import_timm():
  """``(torch, timm)``, importing torchvision first (timm imports it).

  PyPI's torchvision wheel is built against CUDA torch; beside this project's CPU torch its C++
  ops do not load, and ``import torchvision`` fails with "operator torchvision::nms does not
  exist" while registering fake (meta) kernels for ``nms`` / ``qnms``. Nothing here uses any
  torchvision op, so when (and only when) the first import fails that way, the two schemas it
  registers fakes for are declared (no kernels) and the import is retried.
  """
  site = os.environ.get("POSENC_BENCH_SITE") or os.path.expanduser("~/.cache/posenc/bench-site")
  if os.path.isdir(site) and site not in sys.path:  # install.sh's benchmark-only packages
    sys.path.append(site)
  import torch
  try:
    import torchvision  # noqa: F401
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]  # the half-imported package, so the retry imports it afresh
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_timm.torchvision_library = lib  # keep the declarations alive for the process
    import torchvision  # noqa: F401
  import timm
  return torch, timm


def versions() -> str:
  torch, timm = import_timm()
  return f"torch {torch.__version__}, timm {timm.__version__}"


def available() -> str | None:
  """None when timm imports, else why it does not (the benchmark then reports it as skipped)."""
  try:
    import_timm()
  except ImportError as e:
    return f"timm is not installed ({e}); `pip install --no-deps -r benchmarks/requirements.txt`"
  return None


def cuda_note(device: str) -> str | None:
  """None when torch can run on ``device`` ('cpu' or 'cuda'), else why not."""
  torch, _ = import_timm()
  if device == "cuda" and not torch.cuda.is_available():
    return (f"torch {torch.__version__} has no CUDA device here, so timm cannot run on the GPU that posenc "
            f"uses; install a CUDA build of torch to compare")
  return None


def set_threads(threads: int | None = None) -> int:
  """Torch's intra-op threads: ``threads`` (default: the host's cores); returns the count in use."""
  torch, _ = import_timm()
  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch.get_num_threads()


def make_train_step(images: np.ndarray, labels: np.ndarray, *, width: int, depth: int, num_heads: int,
                    mlp_dim: int, patch_size: int, num_classes: int = 10, dtype: str = "float32",
                    device: str = "cpu", lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0):
  """(step, model): ``step()`` runs one AdamW step on the fixed batch and returns the loss tensor.

  ``images`` [B, H, W, C] (posenc's layout) become a contiguous NCHW tensor once. ``dtype``
  "bfloat16" runs the forward under ``torch.autocast`` (float32 parameters and optimizer state,
  as posenc's and the linen reference's mixed precision).
  """
  torch, timm = import_timm()
  from timm.models.vision_transformer import VisionTransformer
  torch.manual_seed(seed)
  b, h, w, c = images.shape
  model = VisionTransformer(
      img_size=(h, w), patch_size=patch_size, in_chans=c, num_classes=num_classes, global_pool="token",
      embed_dim=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_dim / width, qkv_bias=True,
      class_token=True, pos_embed="learn", act_layer="gelu_tanh").to(device)
  model.train()
  x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2))).to(device)
  y = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
  autocast = dtype != "float32"
  if autocast and dtype != "bfloat16":
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}.")
  cuda = torch.device(device).type == "cuda"

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
      loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if cuda:
      torch.cuda.synchronize()
    return loss.detach()

  return step, model
