"""B_simple overhead: taskset -c 0 python -m experiments.benchmark_noise [--size=3m ...]."""

from absl import app
from absl import flags

from bscan import benchmark

_D = benchmark.BenchConfig()
_SIZE = flags.DEFINE_string("size", _D.size, "Model size, a name in bscan.model.SIZES.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", _D.seq_len, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Global batch in sequences.")
_MICROBATCH = flags.DEFINE_integer("microbatch", _D.microbatch, "Sequences per microbatch.")
_VOCAB = flags.DEFINE_integer("vocab_size", _D.vocab_size, "Vocabulary of the random tokens.")
_DEVICES = flags.DEFINE_integer("devices", _D.num_devices, "Use jax.devices()[:N].")
_ROUNDS = flags.DEFINE_integer("rounds", _D.rounds, "Interleaved rounds (on, off per round).")
_STEPS = flags.DEFINE_integer("steps_per_round", _D.steps_per_round, "Timed steps per variant "
                              "per round.")
_HESSIAN = flags.DEFINE_integer("hessian_calls", _D.hessian_calls,
                                "Timed B_noise Hessian calls (0 = skip).")


def main(argv):
  del argv
  print(benchmark.report(benchmark.run(benchmark.BenchConfig(
      size=_SIZE.value, seq_len=_SEQ_LEN.value, batch=_BATCH.value, microbatch=_MICROBATCH.value,
      vocab_size=_VOCAB.value, num_devices=_DEVICES.value, rounds=_ROUNDS.value,
      steps_per_round=_STEPS.value, hessian_calls=_HESSIAN.value))))


if __name__ == "__main__":
  app.run(main)
