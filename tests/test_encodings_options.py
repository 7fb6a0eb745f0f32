"""Every encoding's options are declared once (posenc/encodings/options.py): make() and a run's
posenc_options are validated from the declarations, and the README's table is generated from them."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import posenc  # noqa: F401  (flax config)
from posenc import encodings
from posenc.config import ConfigError, load_config_file
from posenc.encodings import CONTEXT_KEYS, Options, get, make, names, options
from posenc.encodings.rope_normalized import Augmented, Normalized
from posenc.encodings.rope_scaling import Scaled
from posenc.encodings.rotation import Axial
from posenc.training import validate

REPO = Path(__file__).resolve().parent.parent


def _fields(name):
  return dataclasses.fields(get(name).Options)


def test_every_encoding_declares_its_options_and_its_constructor_takes_only_what_a_model_offers():
  for name in names():
    cls = get(name)
    assert issubclass(cls.Options, Options) and cls.Options.__dataclass_params__.frozen, name
    defaults = cls.Options()  # the declared defaults pass the declared checks
    for field in _fields(name):
      assert field.metadata["doc"], (name, field.name)
      assert getattr(defaults, field.name) == field.default, (name, field.name)
    first, *rest = list(inspect.signature(cls.__init__).parameters)[1:]
    assert first == "options" and set(rest) <= CONTEXT_KEYS, (name, rest)


@pytest.mark.parametrize("name", [n for n in names() if _fields(n)])
def test_a_value_of_the_wrong_type_is_one_error_naming_the_option(name):
  for field in _fields(name):
    wrong = 3 if field.type.startswith("str") else ["three"] if field.type.startswith("tuple") else "three"
    with pytest.raises(ConfigError, match=rf"^position encoding '{name}': {field.name} must be .*, got "):
      options(name, **{field.name: wrong})
    if field.type.startswith(("int", "float")):  # a bool is not a number
      with pytest.raises(ConfigError, match=rf"'{name}': {field.name} must be"):
        options(name, **{field.name: True})


def test_ranges_and_conversions():
  assert type(options("sinusoidal", temperature=100).temperature) is float
  hidden = options("fire", hidden_dim=np.int64(8)).hidden_dim
  assert hidden == 8 and type(hidden) is int
  assert options("cpe", layers=[2, 0]).layers == (2, 0)
  assert options("rope", theta=None).theta is None
  with pytest.raises(ConfigError, match=r"'rope': scaling must be one of .*, got None"):
    options("rope", scaling=None)  # not optional: None is a wrong value, not "off"
  with pytest.raises(ConfigError, match=r"'cpe': layers must be a tuple of ints of at least one block index"):
    options("cpe", layers=())
  with pytest.raises(ConfigError, match=r"'cpe': layers must be .*, got \[0, -1\]"):
    options("cpe", layers=[0, -1])
  with pytest.raises(ConfigError, match=r"'cape': global_scaling must be a number >= 1, got 0.5"):
    make("cape", dim=8, global_scaling=0.5)


def test_an_unknown_option_names_the_closest_and_a_models_own_keys_are_not_options():
  with pytest.raises(ConfigError, match=r"'fire' has no option\(s\) \['hiden_dim'\] \(did you mean 'hidden_dim'\?\)"):
    make("fire", num_heads=2, hiden_dim=8)
  with pytest.raises(ConfigError, match=r"'none' has no option\(s\) \['slopes'\]; its options are none"):
    options("none", slopes=1)
  with pytest.raises(ConfigError, match=r"'alibi' has no option\(s\) \['slopes'\]; its options are \['bias_once"):
    options("alibi", slopes=1)
  with pytest.raises(ConfigError, match=r"'rope' has no option\(s\) \['dim'\]"):
    options("rope", dim=32)  # what the model sets is not the user's


@pytest.mark.parametrize("kwargs,variant", [
    ({}, Axial), (dict(theta=500.0), Axial), (dict(scaling="ntk", original_length=8), Scaled),
    (dict(normalize_coords="max"), Normalized), (dict(normalize_coords="min", augment=True), Augmented),
], ids=str)
def test_rope_options_choose_its_variant(kwargs, variant):
  chosen = options("rope", **kwargs).variant()
  assert type(chosen) is variant
  assert {f.name for f in dataclasses.fields(chosen)} <= {f.name for f in _fields("rope")}
  for name, value in kwargs.items():
    assert getattr(chosen, name) == value


def test_rope_options_of_another_variant_are_one_error_naming_them():
  with pytest.raises(ConfigError, match=r"'rope': scaling, original_length are not options of DINOv3's "
                                        r"normalised coordinates .*; they belong to 1D context extension"):
    options("rope", normalize_coords="separate", scaling="yarn", original_length=8)
  with pytest.raises(ConfigError, match=r"'rope': min_period is not an option of 1D context extension"):
    options("rope", scaling="ntk", original_length=8, min_period=1.0)


def _config(name, arg):
  return load_config_file(f"{REPO / 'configs' / name}.py:{arg}")


def test_a_runs_posenc_options_are_checked_from_the_declaration_with_the_encodings_run_rules():
  with pytest.raises(ConfigError, match=r"config field 'posenc_options': position encoding 'rope' has no "
                                        r"option\(s\) \['scalng'\] \(did you mean 'scaling'\?\)"):
    validate(_config("gpt_tiny", "posenc=rope,posenc_options.scalng=ntk"), num_devices=8)
  with pytest.raises(ConfigError, match=r"config field 'posenc_options': position encoding 'fire': init_c must"):
    validate(_config("gpt_tiny", "posenc=fire,posenc_options.init_c=0"), num_devices=8)
  # rope's rule with the run (normalised coordinates already span the trained range) lives with rope.
  normalized = "posenc=rope,posenc_options.normalize_coords=separate"
  validate(_config("vit_tiny", normalized), num_devices=8, check_dataset=False)
  with pytest.raises(ConfigError, match=r"config field 'transfer.interpolate_positions': with "
                                        r"posenc_options.normalize_coords"):
    validate(_config("vit_tiny", normalized + ",transfer.interpolate_positions=True"), num_devices=8,
             check_dataset=False)


def test_readme_options_table_is_the_declarations():
  readme = (REPO / "README.md").read_text()
  found = re.search(r"<!-- encoding options: posenc.encodings.options_table\(\) -->\n(.*?)\n<!-- end of encoding "
                    r"options -->", readme, re.S)
  assert found, "README lacks the generated options table"
  assert found.group(1) == encodings.options_table(), "README's options table is stale: paste options_table()"
  for name in names():
    for field in _fields(name):
      assert f"| `{name}` | `{field.name}` |" in found.group(1)
