"""Every model's state tree (paths, shapes, dtypes, logical axis names) is the one checkpoints, the HF importers,
sharding rules and transfer were written against: tests/data/param_trees.json, recorded by the
code of commit ba27bd5 (before the model core moved behind posenc.models.kernels and Trunk).

Refresh only for a deliberate change of the trees: ``python tests/test_param_trees.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import models

RECORD = Path(__file__).parent / "data" / "param_trees.json"
TINY = dict(width=32, depth=3, num_heads=4, mlp_dim=64)
VIT = dict(num_classes=5, image_size=16, patch_size=4)
TEXT = dict(vocab_size=64, max_len=16)
# case -> (model, posenc, posenc options, model options)
CASES = {
    "vit-learned-registers": ("vit-mu", "learned", {}, dict(VIT, num_registers=1)),
    "vit-rope_mixed": ("vit-mu", "rope_mixed", {}, dict(VIT, drop_path=0.1)),
    "vit-cpe-gap": ("vit-mu", "cpe", {"layers": (0, 2)}, dict(VIT, pool="gap")),
    "vit-rel_bias-per_layer": ("vit-mu", "rel_bias", {"per_layer": True}, VIT),
    "vit-conv_stem": ("vit-mu", "rope", {}, dict(VIT, stem="conv", stem_width=16, stem_extra_convs=2)),
    "bert-post_ln": ("bert-mini", "alibi", {}, TEXT),
    "bert-pre_ln-rel_bias": ("bert-mini", "rel_bias", {"per_layer": True}, dict(TEXT, pre_ln=True)),
    "gpt-learned": ("gpt-nano", "learned", {}, TEXT),
    "gpt-rope": ("gpt-nano", "rope", {}, TEXT),
}


def tree(case: str) -> dict[str, list]:
  """``path -> [shape, dtype, variable type, logical axis names]`` of the whole state of ``case``'s model."""
  name, posenc_name, posenc_options, options = CASES[case]
  model = nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, posenc_options=posenc_options,
                                               rngs=nnx.Rngs(0), **TINY, **options))
  out = {}
  for path, v in nnx.to_flat_state(nnx.state(model)):
    names = v.get_metadata().get("out_sharding")
    out["/".join(map(str, path))] = [list(v.shape), str(v.dtype), type(v).__name__,
                                     None if names is None else list(names)]
  return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_tree_is_unchanged(case):
  recorded = json.loads(RECORD.read_text())[case]
  assert tree(case) == recorded


if __name__ == "__main__":
  cases = [f'  "{case}": {{\n' + ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(tree(case).items()))
           + "\n  }" for case in sorted(CASES)]
  RECORD.write_text("{\n" + ",\n".join(cases) + "\n}\n")
  print(f"wrote {RECORD}", file=sys.stderr)
