"""Training configs: presets, overrides, every field documented, and one clear error per bad field."""
from __future__ import annotations

import importlib

import jax
import pytest

from conftest import REPO, load_config
from posenc import tasks
from posenc.training import ConfigError, setup, validate
from posenc.training import config as config_lib

# --------------------------------------------------------------------------- configs


def test_get_config_short_overrides_and_presets():
  c = load_config("vit_tiny", "full,posenc=rope_mixed,eval_image_sizes=(14,28),lr=1,mesh.data=2")
  base = load_config("vit_tiny")
  assert c.posenc == "rope_mixed" and c.eval_image_sizes == (14, 28) and c.mesh.data == 2
  assert c.lr == 1.0 and isinstance(c.lr, float)
  assert c.total_steps > base.total_steps  # the full-length preset
  with pytest.raises(ConfigError, match="'lrr'"):
    load_config("vit_tiny", "lrr=1")
  with pytest.raises(ConfigError, match="'max_len'"):  # a text field: not in an image config
    load_config("vit_tiny", "max_len=64")
  with pytest.raises(ConfigError, match="'image_size'"):
    load_config("bert_small", "image_size=28")
  with pytest.raises(ConfigError, match="'total_steps'"):
    load_config("vit_tiny", "total_steps=many")
  with pytest.raises(ConfigError, match="preset 'fast'"):
    load_config("vit_tiny", "fast")


@pytest.mark.parametrize("name", ["vit_tiny", "bert_small"])  # gpt_tiny has no presets
def test_every_preset_builds_a_valid_run(name):
  """Each named preset (README's table) passes validation and builds its model abstractly."""
  module = importlib.import_module(f"configs.{name}")
  assert module.PRESETS
  for preset in module.PRESETS:
    run = setup(load_config(name, preset))
    assert jax.tree.leaves(run.spec.abstract["params"]), preset


def test_every_config_field_is_its_tasks_and_documented():
  common = (REPO / "configs" / "common.py").read_text().splitlines()
  for field in config_lib.COMMON_FIELDS:
    line = next(l for l in common if l.strip().startswith(f"c.{field} ="))
    assert "#" in line, f"common.py: field {field} has no comment"
  for name, task in (("vit_tiny", "image_classification"), ("bert_small", "masked_lm"), ("gpt_tiny", "causal_lm")):
    config = load_config(name)
    assert config.task == task
    assert set(config) == config_lib.COMMON_FIELDS | set(tasks.get(task).FIELDS)
    source = (REPO / "configs" / f"{name}.py").read_text().splitlines()
    for field in tasks.get(task).FIELDS:
      line = next(l for l in source if l.strip().startswith(f"c.{field} ="))
      assert "#" in line, f"{name}: task field {field} has no comment"


def test_model_options_only_override_the_named_size():
  """--config.model=vit-ti builds ViT-Ti (the config restates no widths of its default size)."""
  vit = setup(load_config("vit_tiny", "model=vit-ti")).spec.abstract["params"]
  assert vit["blocks"]["layers"]["attn"]["qkv"].shape == (12, 192, 3, 3, 64)  # depth, width, heads, q/k/v
  assert 5.3e6 < sum(x.size for x in jax.tree.leaves(vit)) < 5.6e6           # ViT-Ti at patch 7: ~5.4M
  bert = setup(load_config("bert_small", "model=bert-mini")).spec.abstract["params"]
  assert bert["blocks"]["layers"]["mlp"]["fc1"].shape == (4, 256, 1024)


@pytest.mark.parametrize("name,arg,field", [
    ("vit_tiny", "posenc=bogus", "'posenc'"),
    ("vit_tiny", "posenc=sinusoidal", "'posenc'"),          # 1D-only encoding on a ViT
    ("bert_small", "posenc=cpe", "'posenc'"),               # 2D-only encodings on BERT
    ("bert_small", "posenc=rope_mixed", "'posenc'"),
    ("bert_small", "posenc=sincos2d", "'posenc'"),
    ("vit_tiny", "patch_size=5", "'patch_size'"),
    ("vit_tiny", "eval_image_sizes=(30,)", "'patch_size'"),
    ("vit_tiny", "batch_size=12", "'batch_size'"),          # 8 devices
    ("vit_tiny", "total_steps=-5", "'total_steps'"),
    ("vit_tiny", "total_steps=0", "'total_steps' is 0.*init_from"),  # evaluating needs a checkpoint
    ("vit_tiny", "warmup_steps=-1", "'warmup_steps'"),
    ("vit_tiny", "checkpoint_every=-1", "'checkpoint_every'"),
    ("vit_tiny", "lr=0", "'lr'"),
    ("vit_tiny", "mesh.model=3", "'mesh'"),
    ("vit_tiny", "mesh.model=2,mesh.fsdp=2,mesh.data=1", "'mesh'"),
    ("vit_tiny", "dtype=float16", "'dtype'"),
    ("vit_tiny", "dataset=text", "'dataset'"),
    ("vit_tiny", "train_split=trian", "'train_split'.*Unknown split"),
    ("vit_tiny", "train_split=train[:60001]", "'train_split'.*60000 examples"),
    ("vit_tiny", "init_from=/no/such/run", "'init_from'"),
    ("vit_tiny", "task=no_such_task", "'task'"),
    ("vit_tiny", "transfer.method=cubic", "'transfer'"),
    ("vit_tiny", "posenc=learned,transfer.interpolate_positions=True", "'transfer.interpolate_positions'"),
    ("vit_tiny", "eval_image_sizes=((28, 28, 3),)", "'eval_image_sizes'"),
    ("bert_small", "max_len=0", "'max_len'"),
    ("gpt_tiny", "posenc=cpe", "'posenc'"),                 # 2D-only encodings on GPT
    ("gpt_tiny", "posenc=ropee", r"'posenc'.*did you mean 'rope'\?\); choose one of the 1D encodings: alibi, fire"),
    ("gpt_tiny", "model=gpt-nan", r"'model'.*'gpt-nano'\?\); choose one of: gpt-nano, gpt-mini, gpt-small\."),
    ("gpt_tiny", "task=causal", r"'task'.*did you mean 'causal_lm'\?"),
    ("gpt_tiny", "max_len=0", "'max_len'"),
    ("gpt_tiny", "vocab_size=100", "'vocab_size'"),
    ("gpt_tiny", "batch_size=12", "'batch_size'"),
    ("gpt_tiny", "eval_lengths=(32,),eval_stride=64", "'eval_stride'"),
    ("gpt_tiny", "dataset=fashion_mnist", "'dataset'"),
])
def test_bad_config_gives_one_clear_error(name, arg, field):
  config = load_config(name, arg)
  with pytest.raises(ConfigError, match=field):
    validate(config, num_devices=8)


def test_unknown_presets_and_fields_suggest_the_closest():
  with pytest.raises(ConfigError, match=r"preset 'fulll' \(did you mean 'full'\?\); choose from \['digits', 'full',"):
    load_config("vit_tiny", "fulll")
  with pytest.raises(ConfigError, match=r"config has no field 'lrr' \(did you mean 'lr'\?\); fields: "):
    load_config("gpt_tiny", "lrr=1")
  with pytest.raises(ConfigError, match=r"no field 'mesh.dat' \(did you mean 'mesh.data'\?\); fields: mesh.data, "):
    load_config("gpt_tiny", "mesh.dat=1")


@pytest.mark.parametrize("name,arg,field", [
    ("vit_tiny", "posenc_options.no_such_option=1", "posenc_options"),   # the encoding's own check
    ("vit_tiny", "model_options.no_such_option=1", "model_options"),
    ("vit_tiny", "model=vit-xl", "unknown model 'vit-xl'"),
])
def test_bad_model_or_encoding_options_are_one_clear_error_before_compiling(name, arg, field):
  with pytest.raises(ConfigError, match=field):
    setup(load_config(name, arg))


def test_good_configs_validate_and_resolve_the_mesh():
  assert validate(load_config("vit_tiny"), num_devices=8) == (8, 1, 1)
  assert validate(load_config("bert_small", "mesh.model=2,mesh.fsdp=2"), num_devices=8) == (2, 2, 2)
  assert validate(load_config("vit_tiny", "batch_size=12"), num_devices=4) == (4, 1, 1)

