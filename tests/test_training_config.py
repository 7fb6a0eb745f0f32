"""Training configs: presets, overrides, every field documented, and one clear error per bad field."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import jax
import pytest

from conftest import REPO, load_config
from posenc import config_fields, tasks
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


CONFIGS = {"vit_tiny": "image_classification", "bert_small": "masked_lm", "gpt_tiny": "causal_lm",
           "algo_tiny": "algorithmic", "video_tiny": "video_motion"}


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_has_exactly_its_tasks_declared_fields(name):
  config = load_config(name)
  assert config.task == CONFIGS[name]
  declared = config_lib.fields(config.task)
  assert config_fields.unknown_and_missing(config, declared) == ([], [])
  assert list(declared) == [*config_lib.COMMON, *tasks.get(config.task).FIELDS]  # no task redeclares a common one


def test_every_declared_field_has_a_doc_and_a_default_that_passes_its_checks():
  for task in tasks.names():
    for name, field in config_lib.fields(task).items():
      assert field.doc and field.checks, (task, name)
      if field.default is not None and name not in ("task", "model", "init_from"):  # set by each config
        assert all(rule.holds(field.default) for rule in field.checks), (task, name)


@pytest.mark.parametrize("name,arg,message", [
    ("vit_tiny", "batch_size=0", "'batch_size' must be an int > 0, got 0."),
    ("vit_tiny", "seed=-1", "'seed' must be an int >= 0, got -1."),
    ("vit_tiny", "label_smoothing=1", "'label_smoothing' must be a number in [0, 1), got 1.0."),
    ("vit_tiny", "restore_step=-1", "'restore_step' must be None (the newest) or an int >= 0, got -1."),
    ("vit_tiny", "init_from=/no/such/run", "'init_from' must be None (start from scratch) or the path of a "
                                           "directory: a run's workdir or one of its step directories, got '/no"),
    ("vit_tiny", "divergence_factor=0.5", "'divergence_factor' must be a number > 1 (or 0: only check"),
    ("vit_tiny", "dtype=float16", "'dtype' must be one of ('float32', 'bfloat16'), got 'float16'."),
    ("vit_tiny", "crop_scale=(0.5,0.2)", "'crop_scale' must be a tuple (low, high) with 0 < low <= high <= 1"),
    ("vit_tiny", "eval_protocol=stretch", "'eval_protocol' must be one of ('zoom', 'canvas'), got 'stretch'."),
    ("vit_tiny", "object_size=(0,14)", "'object_size' must be 0 or a size: an int or (h, w), > 0, got (0, 14)."),
    ("vit_tiny", "image_size=(28,28,3)", "'image_size' must be a size: an int or (h, w), > 0, got (28, 28, 3)."),
    ("gpt_tiny", "eval_lengths=(1,)", "'eval_lengths' must be a tuple of ints each >= 2, got (1,)."),
    ("gpt_tiny", "vocab_size=256", "'vocab_size' must be an int >= 257, got 256."),
    ("algo_tiny", "algo_task=multiply", "'algo_task': must be one of ('copy', 'reverse', 'add', 'lookup')"),
])
def test_a_declared_check_rejects_a_bad_value_naming_the_field(name, arg, message):
  with pytest.raises(ConfigError) as e:
    validate(load_config(name, arg), num_devices=8, check_dataset=False)
  assert str(e.value).startswith(f"config field {message}"), str(e.value)


def test_a_declared_type_is_checked_where_a_value_bypassed_ml_collections():
  """A config file may assign anything (bools are ints to Python): the declaration still decides."""
  fields = {name: config_lib.COMMON[name] for name in ("restart", "batch_size", "model_options")}
  good = {"restart": False, "batch_size": 8, "model_options": {}}
  config_fields.check(good, fields)
  for name, bad, need in (("restart", 1, "True or False"), ("batch_size", True, "an int > 0"),
                          ("model_options", "vit", "a dict")):
    with pytest.raises(ConfigError, match=re.escape(f"config field '{name}' must be {need}, got {bad!r}.")):
      config_fields.check({**good, name: bad}, fields)


def test_readme_field_table_is_the_declarations():
  readme = (REPO / "README.md").read_text()
  found = re.search(r"<!-- config fields: posenc.training.config.fields_table\(\) -->\n(.*?)\n<!-- end of config "
                    r"fields -->", readme, re.S)
  assert found, "README lacks the generated field table"
  assert found.group(1) == config_lib.fields_table(), "README's field table is stale: paste fields_table()"
  for task in tasks.names():
    for name in tasks.get(task).FIELDS:
      assert f"| {task} | `{name}` |" in found.group(1)


def test_the_cli_lists_a_tasks_fields():
  out = subprocess.run([sys.executable, "-m", "posenc.config_fields", "masked_lm"], cwd=REPO, text=True,
                       capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| masked_lm | `max_len` | `64` | an int >= 2 |" in out.stdout and "| every task | `lr` |" in out.stdout
  assert "| image_classification |" not in out.stdout


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/vit_tiny.py:lr=abc"], "Config error: --config=configs/vit_tiny.py:lr=abc: config field 'lr'"),
    (["--config=configs/vit_tiny.py:fulll"], "(did you mean 'full'?)"),
    (["--config=configs/no_such.py"], "no config file 'configs/no_such.py'"),
    (["--config", "COUNTED", "--config.lr=abc"], "Config error: flag --config.lr=abc"),
    (["--config=COUNTED", "--config.lrr=1"], "unknown field(s) ['lrr'] (did you mean 'lr'?)"),
    (["--config=COUNTED:random_erasing=2"], "config field 'random_erasing' must be a number in [0, 1], got 2.0."),
])
def test_train_py_loads_the_config_once_and_a_bad_one_is_one_message_with_status_2(tmp_path, args, expected):
  """COUNTED: configs/vit_tiny.py through a file that counts its loads."""
  counter = tmp_path / "loads"
  counted = tmp_path / "counted.py"
  counted.write_text(f"from configs import vit_tiny\n\n\ndef get_config(arg=None):\n"
                     f"  with open({str(counter)!r}, 'a') as f:\n    f.write('x')\n  return vit_tiny.get_config(arg)\n")
  args = [a.replace("COUNTED", str(counted)) for a in args]
  out = subprocess.run([sys.executable, "train.py", *args, f"--workdir={tmp_path / 'run'}"], cwd=REPO, text=True,
                       capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], out.stderr[-3000:]
  assert not (tmp_path / "run").exists()
  if any("counted.py" in a for a in args):
    assert counter.read_text() == "x"  # loaded once, also when flags override it


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
    ("gpt_tiny", "posenc=ropee", r"'posenc'.*did you mean 'rope'\?\); choose one of the 1D encodings: alibi, comrope, cope, fire"),
    ("bert_small", "posenc=forgetting", r"'posenc': 'forgetting' is causal only and task 'masked_lm' attends both ways"),
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

