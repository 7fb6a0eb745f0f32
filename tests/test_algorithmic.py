"""The algorithmic task: copy / reverse / addition / lookup rows are deterministic and right, the loaders draw the
lengths and examples they promise, exact match needs every answer token, a tiny run reports it at every
evaluated length, bad fields are one ConfigError, and the study's record is resumable."""
from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posenc import config_fields, tasks
from posenc.config import ConfigError, load_config_file
from posenc.data import algorithmic
from posenc.training import train
from posenc.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]
TINY = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
        "train_max_len=4,eval_lengths=(2,8),eval_examples=20,batch_size=8,eval_batch_size=8,total_steps=3,"
        "warmup_steps=1,log_every=1")


def config(arg: str = ""):
  return load_config_file(f"{REPO / 'configs' / 'algo_tiny.py'}" + (f":{arg}" if arg else ""))


def decode(task: str, batch: dict, row: int, symbols: int = 16) -> tuple[list, list, list]:
  """(question tokens, answer tokens, weighted targets) of one row (lookup: the query is the question's last
  token); checks BOS, SEP, EOS, the padding and that exactly the answer and EOS are weighted."""
  ids = {name: algorithmic.special(task, symbols, name) for name in algorithmic.SPECIALS}
  seq = [*batch["input_ids"][row], batch["targets"][row, -1]]
  np.testing.assert_array_equal(batch["targets"][row], seq[1:])
  assert seq[0] == ids["BOS"]
  sep, eos = seq.index(ids["SEP"]), seq.index(ids["EOS"])
  assert all(t == ids["PAD"] for t in seq[eos + 1:])
  first = sep + 1 + (task == "lookup")  # lookup: [SEP] q v_q [EOS], the query is not scored
  np.testing.assert_array_equal(np.nonzero(batch["weights"][row])[0], np.arange(first - 1, eos))  # answer + EOS
  question = seq[1:sep] + seq[sep + 1:first]
  return question, seq[first:eos], list(batch["targets"][row][batch["weights"][row] > 0])


@pytest.mark.parametrize("task", algorithmic.TASKS)
def test_rows_hold_the_right_answers_in_the_causal_lm_format(task):
  length = algorithmic.seq_len(task, 16)
  batch = algorithmic.batch(task, (1, 16), 64, np.random.default_rng(0), symbols=16, length=length)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      **{k: ((64, length), np.int32) for k in ("input_ids", "targets", "positions", "packing_ids")},
      "weights": ((64, length), np.float32), "valid": ((64,), np.float32)}
  assert (batch["positions"] == np.arange(length)).all() and (batch["packing_ids"] == 1).all()
  assert batch["valid"].all() and batch["input_ids"].max() < algorithmic.vocab_size(task, 16)
  sizes = set()
  for row in range(64):
    question, answer, weighted = decode(task, batch, row)
    assert weighted == answer + [algorithmic.special(task, 16, "EOS")]
    if task == "lookup":
      *pairs, query = question
      keys, values = pairs[0::2], pairs[1::2]
      n = len(keys)
      assert len(pairs) == 2 * n and len(set(keys)) == n and max(keys) < algorithmic.LOOKUP_KEYS  # distinct keys
      assert all(algorithmic.LOOKUP_KEYS <= v < algorithmic.LOOKUP_KEYS + 16 for v in values)  # their own ids
      assert query in keys and answer == [values[keys.index(query)]]  # the value paired with the query
    elif task == "add":
      n = (len(question) - 1) // 2
      a, plus, b = question[:n], question[n], question[n + 1:]
      assert plus == algorithmic.special(task, 16, "PLUS") and len(b) == n and len(answer) == n + 1
      value = lambda digits: sum(int(d) * 10**i for i, d in enumerate(digits))  # noqa: E731  (least first)
      assert max(a + b + answer) <= 9 and value(answer) == value(a) + value(b)
    else:
      n = len(question)
      assert max(question) < 16 and answer == (question if task == "copy" else question[::-1])
    sizes.add(n)
  assert min(sizes) >= 1 and max(sizes) <= 16 and len(sizes) > 8  # drawn over the whole range


@pytest.mark.parametrize("task", ["reverse", "lookup"])
def test_generators_are_deterministic(task):
  draw = lambda seed: algorithmic.batch(task, (1, 8), 16, np.random.default_rng(seed), symbols=16,  # noqa: E731
                                        length=algorithmic.seq_len(task, 8))
  a, b, c = draw(0), draw(0), draw(1)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["input_ids"], c["input_ids"])
  with pytest.raises(ValueError, match="needs 18 tokens"):
    algorithmic.batch("copy", 8, 2, np.random.default_rng(0), symbols=16, length=17)


def test_lookup_uses_every_key_and_queries_uniformly():
  """At n = 64 the keys are a permutation of the 64 key tokens; the queried pair is uniform over the n pairs;
  n = 65 cannot have distinct keys."""
  batch = algorithmic.batch("lookup", 64, 400, np.random.default_rng(0), symbols=16,
                            length=algorithmic.seq_len("lookup", 64))
  picked = []
  for row in range(400):
    question, answer, _ = decode("lookup", batch, row)
    keys = question[:-1][0::2]
    assert sorted(keys) == list(range(64))
    picked.append(keys.index(question[-1]))
  assert len(set(picked)) > 48 and 0.4 < np.mean(picked) / 63 < 0.6
  assert all(n == 64 for n in sizes_of("lookup", batch))
  with pytest.raises(ValueError, match="n <= 64"):
    algorithmic.batch("lookup", 65, 1, np.random.default_rng(0), symbols=16, length=200)


def sizes_of(task: str, batch: dict) -> list[int]:
  if task == "lookup":
    return [len(decode(task, batch, r)[0]) // 2 for r in range(len(batch["valid"]))]
  return [len(decode(task, batch, r)[1]) - (task == "add") for r in range(len(batch["valid"]))]


def test_loaders_draw_the_lengths_and_examples_they_promise():
  common = dict(batch_size=8, symbols=16, examples=20)
  trains = list(itertools.islice(algorithmic.loader("copy", "train", train=True, seed=0, size=6, **common), 20))
  assert all(b["input_ids"].shape == (8, 14) for b in trains)
  assert {n for b in trains for n in sizes_of("copy", b)} == set(range(1, 7))
  again = next(iter(algorithmic.loader("copy", "train", train=True, seed=0, size=6, **common)))
  other = next(iter(algorithmic.loader("copy", "train", train=True, seed=1, size=6, **common)))
  np.testing.assert_array_equal(again["input_ids"], trains[0]["input_ids"])
  assert not np.array_equal(other["input_ids"], trains[0]["input_ids"])

  evals = lambda split, seed, **kw: list(algorithmic.loader("add", split, train=False, seed=seed, size=12,  # noqa: E731
                                                            **{**common, **kw}))
  test = evals("test", 0)
  assert len(test) == 3 and all(b["input_ids"].shape == (8, 40) for b in test)  # ceil(20 / 8), 3n+4
  assert all(n == 12 for b in test for n in sizes_of("add", b))
  np.testing.assert_array_equal(np.concatenate([b["valid"] for b in test]), np.arange(24) < 20)
  np.testing.assert_array_equal(evals("test", 7)[2]["input_ids"], test[2]["input_ids"])  # not the run's seed
  assert not np.array_equal(evals("validation", 0)[0]["input_ids"], test[0]["input_ids"])

  shards = [evals("test", 0, process_index=p, process_count=2) for p in (0, 1)]
  assert all(b["input_ids"].shape == (4, 40) for s in shards for b in s)
  assert not np.array_equal(shards[0][0]["input_ids"], shards[1][0]["input_ids"])
  np.testing.assert_array_equal(np.concatenate([b["valid"] for b in shards[1]]), [1] * 8 + [0] * 4)  # rows 20-23
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    algorithmic.loader("copy", "train", train=True, seed=0, size=6, process_count=3, **common)


def test_exact_match_needs_every_answer_token():
  task, c = tasks.get("algorithmic"), config()
  batch = task.random_batch(c, np.random.default_rng(0), 10, train=True)
  vocab = algorithmic.vocab_size("copy", 16)
  logits = 5.0 * jax.nn.one_hot(batch["targets"], vocab)
  answer = np.argwhere(batch["weights"][3] > 0)[:, 0]
  logits = logits.at[3, answer[0]].set(5.0 * jax.nn.one_hot((batch["targets"][3, answer[0]] + 1) % vocab, vocab))
  logits = logits.at[5, 0].set(0.0)  # a wrong prompt token is not scored
  batch["valid"][9] = 0.0  # a padding row counts nowhere
  _, stats = task.forward(lambda *a, **k: logits, {k: jnp.asarray(v) for k, v in batch.items()}, train=False)
  metrics = task.metrics(stats)
  scored = batch["weights"][:9].sum()
  assert float(stats["rows"]) == 9 and float(metrics["exact_match"]) == pytest.approx(8 / 9)
  assert float(metrics["accuracy"]) == pytest.approx((scored - 1) / scored)
  assert 0.98 > float(metrics["exact_match"]) and float(metrics["accuracy"]) > 0.98


@pytest.mark.parametrize("arg,field", [
    ("algo_task=multiply", "'algo_task'"), ("num_symbols=0", "'num_symbols'"), ("train_max_len=0", "'train_max_len'"),
    ("eval_lengths=(8,0)", "'eval_lengths'"), ("eval_examples=-1", "'eval_examples'"), ("dataset=text", "'dataset'"),
    ("posenc=rope_mixed", "'posenc'"), ("lookup,eval_lengths=(32,128)", "'eval_lengths'"),
    ("lookup,train_max_len=65", "'train_max_len'")])
def test_a_bad_field_is_one_config_error_naming_it(arg, field):
  with pytest.raises(ConfigError, match=field):
    config_lib.validate(config(arg), num_devices=8)


def test_config_fields_are_the_tasks_declared_ones():
  assert config_fields.unknown_and_missing(config(), config_lib.fields("algorithmic")) == ([], [])
  assert [config(name).algo_task for name in algorithmic.TASKS] == list(algorithmic.TASKS)


@pytest.mark.parametrize("task", ["add", "lookup"])  # add: the longer rows, the PLUS token; lookup: its vocabulary
def test_a_tiny_run_reports_exact_match_at_every_evaluated_length(tmp_path, task):
  results = train(config(f"{task},{TINY}"), str(tmp_path / "run"))
  for suffix in ("", "_2", "_8"):
    assert 0.0 <= results[f"exact_match{suffix}"] <= results[f"accuracy{suffix}"] <= 1.0
    assert np.isfinite(results[f"loss{suffix}"])


class FakeCells:
  def __init__(self):
    self.rows = {}

  def __contains__(self, key):
    return key in self.rows

  def add(self, row):
    self.rows[(row["family"], row["posenc"], row["seed"], row["mode"], row["size"])] = row


def test_study_records_every_cell_once_and_resumes(tmp_path):
  """The full family with a stand-in for training: every run's config is valid, every cell is recorded, and
  a second pass runs only what is missing."""
  from benchmarks import study_algo
  from configs import algo_tiny
  family = study_algo.family(algo_tiny)
  calls = []

  def run(fam, arg, workdir):
    config_lib.validate(fam.config.get_config(f"{fam.overrides},{arg}"), num_devices=8)
    Path(workdir).mkdir(parents=True)
    calls.append(arg)
    return {f"{k}{'' if n == 16 else f'_{n}'}": 0.5 for k in ("exact_match", "accuracy", "loss") for n in fam.sizes}

  cells = FakeCells()
  family.study((0,), cells, str(tmp_path / "a"), print, run)
  assert family.tasks == ("copy", "reverse", "lookup") and "sinusoidal" not in family.encodings
  assert len(cells.rows) == 3 * 11 * 5 and len(calls) == 3 * (8 + 11)  # per task: 8 trainings, 11 evaluations
  assert ("algo_task=lookup,train_max_len=16,posenc=rel_bias,posenc_options.max_distance=36,seed=0,"
          "eval_lengths=()") in calls
  assert any(a.startswith("algo_task=copy,train_max_len=16,posenc=rope,seed=0,init_from=") and a.endswith(
      "eval_lengths=(8, 32, 48, 64),posenc_options.scaling=yarn,posenc_options.original_length=34") for a in calls)
  del cells.rows[("algo", "rope+yarn", 0, "reverse", 64)]
  calls.clear()
  family.study((0,), cells, str(tmp_path / "b"), print, run)
  assert len(calls) == 2 and "posenc_options.scaling=yarn" in calls[1] and "algo_task=reverse" in calls[0]
