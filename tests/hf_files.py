"""The damaged Hugging Face checkpoints the importers' tests feed them (tests/test_hf_*.py)."""
from __future__ import annotations

import json
import pathlib


DAMAGES = ("truncated", "torch_pickle", "config_without_key", "config_not_json")


def damaged_copy(src: pathlib.Path, dst: pathlib.Path, damage: str, tensor: str, key: str) -> str:
  """Copy ``src``'s config.json and model.safetensors to ``dst`` with one ``damage``: the weights cut in
  half or a torch pickle (holding ``tensor``) under the safetensors name, a config without ``key`` or not
  JSON. Returns the message the importer must give: the file, and the key where one is missing."""
  weights, config = dst / "model.safetensors", dst / "config.json"
  data, cfg = (src / "model.safetensors").read_bytes(), json.loads((src / "config.json").read_text())
  weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else data)
  if damage == "torch_pickle":  # a pytorch_model.bin under the safetensors name
    import torch  # the tests that damage files need torch for their reference models anyway
    torch.save({tensor: torch.zeros(3)}, weights)
  config.write_text("{" if damage == "config_not_json" else json.dumps(
      {k: v for k, v in cfg.items() if damage != "config_without_key" or k != key}))
  if damage == "config_without_key":
    return f"{config} lacks the key '{key}'"
  if damage == "config_not_json":
    return f"{config} is not a JSON file"
  return f"{weights} is not a readable safetensors file"
