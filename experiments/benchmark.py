"""Train-step benchmark: taskset -c 0 python -m experiments.benchmark --size=3m,98k [--json=...].

Prints tokens/s, MFU, the noise-scale on/off ratio, memory, compile time and the per-step
overhead at one sequence (bscan.benchmark), interleaved with the PyTorch reference of the same
model (benchmarks/torch_reference.py) when torch is importable.
"""

import importlib.util
import json
import tempfile

from absl import app
from absl import flags

from bscan import benchmark

_D = benchmark.BenchConfig()
_SIZE = flags.DEFINE_list("size", list(_D.sizes), "Model sizes, names in bscan.model.SIZES.")
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Global batch in sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", _D.seq_len, "Context T: tokens per sequence.")
_MICROBATCH = flags.DEFINE_integer("microbatch", _D.microbatch, "Sequences per microbatch "
                                   "(0 = the trainer's automatic layout).")
_VOCAB = flags.DEFINE_integer("vocab_size", _D.vocab_size, "Vocabulary (257: bytes).")
_DEVICES = flags.DEFINE_integer("devices", _D.num_devices, "Use jax.devices()[:N].")
_ROUNDS = flags.DEFINE_integer("rounds", _D.rounds, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps_per_round", _D.steps_per_round,
                              "Timed steps per variant per round.")
_OVERHEAD = flags.DEFINE_bool("overhead", _D.overhead, "Also time the step at batch 1.")
_HESSIAN = flags.DEFINE_integer("hessian_calls", _D.hessian_calls,
                                "Timed B_noise Hessian calls (0 = skip).")
_TORCH = flags.DEFINE_enum("torch", "auto", ["auto", "true", "false"],
                           "Interleave the PyTorch reference (auto: when torch is importable).")
_DTYPE = flags.DEFINE_enum("dtype", _D.dtype, ["float32", "bfloat16"],
                           "Compute dtype; parameters, optimizer and noise-scale norms stay float32.")
_END_TO_END = flags.DEFINE_integer(
    "end_to_end_steps", 0, "Also train each size this many steps with the real trainer on the "
    "embedded default (bytes, same batch and layout) and compare its tokens/s (0 = skip).")
_JSON = flags.DEFINE_string("json", "", "Also write the results here as JSON.")


def _torch_reference() -> benchmark.Reference:
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top

  def make(mcfg, lay, seq_len):
    return torch_reference.make_step(mcfg.n_layer, mcfg.d_model, mcfg.n_heads, mcfg.vocab_size,
                                     seq_len, lay.per_device * lay.num_devices, lay.microbatch)

  return make


def _train_config(size: str, cfg: benchmark.BenchConfig, steps: int):
  """The base config at the benchmark's shape: no evals or checkpoints in the timed steps."""
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_base_config()
  c.model.size, c.model.dtype = size, cfg.dtype
  c.seq_len = c.model.max_len = cfg.seq_len
  c.batch_size, c.microbatch_size = cfg.batch, cfg.microbatch
  c.max_microbatch_size = cfg.max_microbatch
  c.budget.train_steps, c.budget.target_loss = steps, 0.0
  c.eval.every_steps, c.eval.per_decade = 0, 0
  c.checkpoint.every_steps = steps
  c.log_every_steps = 1
  return c


def main(argv):
  del argv
  use_torch = _TORCH.value == "true" or (
      _TORCH.value == "auto" and importlib.util.find_spec("torch") is not None)
  cfg = benchmark.BenchConfig(
      sizes=tuple(_SIZE.value), batch=_BATCH.value, seq_len=_SEQ_LEN.value,
      microbatch=_MICROBATCH.value, vocab_size=_VOCAB.value, num_devices=_DEVICES.value,
      rounds=_ROUNDS.value, steps_per_round=_STEPS.value, overhead=_OVERHEAD.value,
      hessian_calls=_HESSIAN.value, dtype=_DTYPE.value)
  result = benchmark.run(cfg, _torch_reference() if use_torch else None)
  if _END_TO_END.value:
    for r in result["sizes"]:
      with tempfile.TemporaryDirectory() as workdir:
        speed = benchmark.end_to_end(_train_config(r["size"], cfg, _END_TO_END.value), workdir)
      r["end_to_end_tokens_per_s"] = speed
      r["end_to_end_over_step"] = speed / r["tokens_per_s"]
  print(benchmark.report(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
