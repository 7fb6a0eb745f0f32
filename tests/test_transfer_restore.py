"""End to end: train at 28 px, restore the run at 56 / 14 px (and text 128 -> 512)."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from posenc import transfer
from posenc.config import ConfigError, load_config_file
from posenc.encodings import Geometry
from posenc.training import setup, train

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name: str, arg: str):
  return load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{arg}"))


def stored_params(workdir: str) -> dict:
  step = max(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "params"))


TINY_VIT = ("model_options.width=32,model_options.depth=2,model_options.num_heads=2,"
            "model_options.mlp_dim=64,patch_size=7,batch_size=32,eval_batch_size=256,"
            "warmup_steps=2,eval_every=0,checkpoint_every=0,log_every=10,eval_max_batches=2")


def jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def vit28(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vit28"))
  results = train(config("vit_tiny", TINY_VIT + ",total_steps=30,eval_image_sizes=(14,56)"), workdir)
  return workdir, results


def test_eval_at_other_sizes_transfers_on_the_fly(vit28):
  _, results = vit28
  # Each size is its own evaluation (other images, another transferred table): three different losses.
  losses = [results[k] for k in ("loss", "loss_14", "loss_56")]
  assert all(np.isfinite(losses)) and len(set(losses)) == 3, losses
  assert results["accuracy"] > 0.2  # 30 steps already beat chance (0.1) at the trained size


@pytest.mark.parametrize("size", [56, 14])
def test_restore_at_new_size_trains_with_finite_loss(vit28, tmp_path, size, capsys):
  source, _ = vit28
  workdir = str(tmp_path / f"vit{size}")
  results = train(config("vit_tiny", TINY_VIT + f",total_steps=5,image_size={size},init_from={source}"),
                  workdir)
  out = capsys.readouterr().out
  side = size // 7  # patch 7: the 4x4 grid becomes side x side
  assert f"transferred (bicubic): posenc/table (16, 32) -> ({side * side}, 32)" in out
  assert stored_params(workdir)["posenc"]["table"].shape == (side * side, 32)
  losses = [r["train/loss"] for r in jsonl(workdir) if "train/loss" in r]
  assert losses and all(np.isfinite(losses)) and np.isfinite(results["loss"])


def test_same_size_restore_keeps_accuracy(vit28, tmp_path):
  source, results = vit28
  workdir = str(tmp_path / "vit28b")
  again = train(config("vit_tiny", TINY_VIT + f",total_steps=1,lr=1e-12,warmup_steps=0,init_from={source}"),
                workdir)
  # A step of lr 1e-12 moves no float32 parameter by an ulp, and the test batches are the same: the
  # restored model evaluates exactly as the run did.
  assert again["accuracy"] == results["accuracy"] and again["loss"] == results["loss"]


@pytest.mark.parametrize("size", [28, 56])
def test_evaluate_only_restore_matches_the_runs_own_evaluation(vit28, tmp_path, size):
  """``total_steps=0`` + ``init_from`` evaluates the checkpoint at ``image_size``: the same test
  batches, and (at 56) the same transfer, as the run's final evaluation at that size."""
  source, results = vit28
  again = train(config("vit_tiny", TINY_VIT + f",total_steps=0,image_size={size},init_from={source}"),
                str(tmp_path / f"eval{size}"))
  assert again["accuracy"] == results["accuracy" if size == 28 else f"accuracy_{size}"]
  assert again["loss"] == pytest.approx(results["loss" if size == 28 else f"loss_{size}"], rel=1e-5)


def test_restore_into_other_architecture_is_a_clear_error(vit28, tmp_path):
  source, _ = vit28
  with pytest.raises(ConfigError, match=r"(?s)init_from.*patch_embed: stored \(7, 7, 1, 32\), wanted \(4, 4, 1, 32\)"):
    train(config("vit_tiny", TINY_VIT + f",total_steps=1,warmup_steps=0,patch_size=4,init_from={source}"),
          str(tmp_path / "bad"))


def test_restore_time_transfer_lands_sharded_on_an_fsdp_model_mesh(vit28):
  """Orbax restore + jitted transfer, the table sharded over (model, fsdp) of 8 devices."""
  source, _ = vit28
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
           ("kv", None), ("vocab", "model"), ("posn", "model"), ("layers", None))
  run = setup(config("vit_tiny", TINY_VIT + f",total_steps=0,image_size=56,init_from={source},"
                     f"mesh.data=1,mesh.fsdp=4,mesh.model=2,logical_axis_rules={rules}"))
  params = run.initial_state()["params"]
  table = params["posenc"]["table"]
  assert table.shape == (64, 32) and table.sharding.spec == P("model", "fsdp")
  assert len(table.sharding.device_set) == 8 and len(table.addressable_shards) == 8
  stored = stored_params(source)
  want = transfer.transfer_params(stored, "learned", Geometry.grid(4, 4, 1), Geometry.grid(8, 8, 1))
  np.testing.assert_allclose(np.asarray(table), want["posenc"]["table"], rtol=1e-6, atol=1e-6)
  qkv = params["blocks"]["layers"]["attn"]["qkv"]  # unchanged leaves: straight into their sharding
  assert qkv.sharding.spec == run.spec.shardings["params"]["blocks"]["layers"]["attn"]["qkv"].spec
  np.testing.assert_array_equal(np.asarray(qkv), stored["blocks"]["layers"]["attn"]["qkv"])


def test_checkpoint_without_a_recorded_geometry_is_a_clear_error(vit28, tmp_path):
  """Checkpoints record their geometry; one whose metadata holds only the run's config (as posenc
  wrote before geometries were recorded) is refused, not guessed from that config."""
  source, _ = vit28
  old = str(tmp_path / "old")
  shutil.copytree(source, old)
  for meta_file in (tmp_path / "old" / "checkpoints").glob("*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({"config": meta["config"], "mesh": meta["mesh"]}))
  with pytest.raises(ConfigError, match=r"'init_from': checkpoint .*old/checkpoints/\d+ records no geometry "
                                        r"\(a posenc version before .*restore it with that version"):
    setup(config("vit_tiny", TINY_VIT + f",total_steps=0,image_size=56,init_from={old}"))


def test_restoring_another_encoding_is_a_clear_error(vit28, tmp_path):
  source, _ = vit28
  with pytest.raises(ConfigError, match="'posenc' is 'rope' but checkpoint .* was trained with 'learned'"):
    setup(config("vit_tiny", TINY_VIT + f",posenc=rope,total_steps=0,init_from={source}"))


def test_position_interpolation_scales_positions_into_the_trained_range(tmp_path):
  """rope trained at 28 px (4x4 grid), restored at 56 px (8x8): positions scaled by 0.5, and
  recorded, so a later restore of that run keeps the trained range."""
  source = str(tmp_path / "rope28")
  train(config("vit_tiny", TINY_VIT + ",posenc=rope,total_steps=2"), source)
  arg = TINY_VIT + f",posenc=rope,total_steps=0,image_size=56,init_from={source},eval_image_sizes=(112,)"
  plain = setup(config("vit_tiny", arg))
  scaled = setup(config("vit_tiny", arg + ",transfer.interpolate_positions=True"))
  assert plain.position_scale == 1.0 and scaled.position_scale == 0.5
  assert scaled.meta["position_scale"] == 0.5
  assert [e.position_scale for e in scaled.evals] == [0.5, 0.25]  # 112 px: 16x16 into the trained 4x4
  assert [e.position_scale for e in plain.evals] == [1.0, 1.0]
  got, without = train(scaled, str(tmp_path / "pi56")), train(plain, str(tmp_path / "plain56"))
  assert got["loss"] != without["loss"] and got["loss_112"] != without["loss_112"]


TINY_BERT = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
             "model_options.mlp_dim=32,batch_size=8,eval_batch_size=8,eval_max_batches=1,"
             "warmup_steps=1,eval_every=0,checkpoint_every=0,log_every=1")


def test_learned_text_table_128_to_512_on_restore(tmp_path, capsys):
  source = str(tmp_path / "len128")
  train(config("bert_small", TINY_BERT + ",max_len=128,total_steps=3"), source)
  capsys.readouterr()
  workdir = str(tmp_path / "len512")
  results = train(config("bert_small", TINY_BERT + f",max_len=512,total_steps=2,init_from={source}"), workdir)
  assert "posenc/table (128, 16) -> (512, 16)" in capsys.readouterr().out
  losses = [r["train/loss"] for r in jsonl(workdir) if "train/loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses)) and np.isfinite(results["loss"])
  # What the run started from: the stored table extended (interpolated) to 512 rows, the rest as stored.
  start = setup(config("bert_small", TINY_BERT + f",max_len=512,total_steps=0,init_from={source}"))
  got = jax.tree.map(np.asarray, start.initial_state(log=lambda _: None)["params"])
  want = transfer.transfer_params(stored_params(source), "learned", Geometry.seq(128), Geometry.seq(512),
                                  transfer.TransferOptions(extend="interpolate"))
  np.testing.assert_allclose(got["posenc"]["table"], want["posenc"]["table"], rtol=1e-6, atol=1e-7)  # jit vs eager
  jax.tree.map(np.testing.assert_array_equal, {**got, "posenc": {}}, {**want, "posenc": {}})


def test_unawaited_shard_reads_of_a_damaged_checkpoint_print_no_traceback(caplog):
  """Orbax's sibling shard reads fail unawaited; asyncio would log each with a traceback."""
  import asyncio
  import gc

  from posenc.training import checkpoint
  checkpoint._register_array_handler()

  async def read(message):
    raise Exception(message)

  async def main():
    siblings = [asyncio.ensure_future(read(m)) for m in (
        "Encountered error while reading array index: (slice(0, 1, 1),)", "something else")]
    await asyncio.sleep(0.01)
    del siblings

  asyncio.run(main())
  gc.collect()
  logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(logged) == 1 and "something else" in logged[0]  # only Orbax's shard reads are dropped
