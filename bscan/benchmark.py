"""Times the real train step on one host: tokens/s, MFU, noise-scale overhead, memory, compile.

Variants (noise on, noise off, an optional reference such as PyTorch) are built and warmed up
untimed, then timed round by round, interleaved A B A B (order reversed every other round so
linear drift cancels in pairs); each figure is a median over rounds.

FLOPs per trained token (Kaplan et al. 2020 §2.1, forward ×3 for forward + backward):
  6·N + 6·n_layer·T·d_model + 6·d_model·V
with N the non-embedding parameters, T the context (Kaplan's 2·n_layer·n_ctx·d_attn forward
for attention, ×3; no causal halving: the masked half of q·kᵀ is computed anyway) and the tied
output layer d_model·V. MFU = achieved FLOP/s / the one-core float32 matmul ceiling.
"""

import dataclasses
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bscan import config as config_lib
from bscan import model as model_lib
from bscan import noise_scale
from bscan import optim
from bscan import train_step as step_lib

FLOP_FORMULA = ("FLOPs/token = 6·N_nonembedding + 6·n_layer·T·d_model (attention, Kaplan's "
                "2·n_layer·n_ctx·d_attn ×3, no causal halving) + 6·d_model·V (output layer)")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark: model sizes, a global batch and its layout, and the timing plan."""

  sizes: tuple[str, ...] = ("3m",)
  batch: int = 16  # global batch in sequences
  seq_len: int = 256  # context T
  microbatch: int = 0  # sequences per microbatch; 0 = the trainer's automatic layout
  max_microbatch: int = 16  # the automatic layout's cap (the base config's default)
  vocab_size: int = 257  # bytes + 1, like the embedded default's byte tokenizer
  num_devices: int = 1
  rounds: int = 4
  steps_per_round: int = 3
  overhead: bool = True  # also time the step at one sequence (batch 1)
  hessian_calls: int = 0  # timed B_noise (Hessian) calls; 0 = skip
  dtype: str = "float32"  # compute dtype (model.dtype); parameters and norms stay float32
  seed: int = 0


def flops_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> int:
  """Training FLOPs per token (forward + backward), see FLOP_FORMULA."""
  n = model_lib.non_embedding_params(cfg)
  return 6 * n + 6 * cfg.n_layer * seq_len * cfg.d_model + 6 * cfg.d_model * cfg.vocab_size


def matmul_ceiling(n: int = 2048, repeats: int = 3) -> dict[str, float]:
  """GFLOP/s of an n×n float32 matmul, numpy and jnp.dot, best of `repeats` (this process)."""
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  out = {}
  x = jnp.asarray(a)
  dot = jax.jit(jnp.dot)
  for name, fn in (("numpy", lambda: a @ a), ("jax", lambda: dot(x, x).block_until_ready())):
    fn()
    best = min(_seconds(fn) for _ in range(repeats))
    out[name] = 2 * n**3 / best / 1e9
  return out


def _seconds(fn: Callable[[], Any], n: int = 1) -> float:
  start = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - start) / n


def interleave(variants: dict[str, Callable[[], Any]], rounds: int,
               steps_per_round: int) -> dict[str, list[float]]:
  """Seconds per step of each variant, per round; each call of a variant must block."""
  names = list(variants)
  times = {k: [] for k in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      times[name].append(_seconds(variants[name], steps_per_round))
  return times


def _layout(cfg: BenchConfig, batch: int) -> config_lib.Layout:
  """The trainer's layout of `batch` sequences (or cfg.microbatch when set)."""
  c = ml_collections.ConfigDict(dict(batch_size=batch, max_microbatch_size=cfg.max_microbatch,
                                     microbatch_size=min(cfg.microbatch, batch)))
  return config_lib.layout(c, cfg.num_devices)


@dataclasses.dataclass
class JaxStep:
  """One compiled train step with its own state, ready to time."""

  fn: Callable
  state: Any
  batch: jax.Array
  compile_s: float
  memory_bytes: int  # compiled arguments + outputs + temporaries (XLA's memory analysis)

  def __call__(self):
    # The state is donated: each call feeds the one the previous call returned.
    self.state, metrics = self.fn(self.state, self.batch)
    jax.block_until_ready(metrics)


def build_step(mcfg: model_lib.ModelConfig, lay: config_lib.Layout, seq_len: int, noise: bool,
               seed: int = 0) -> JaxStep:
  """bscan's real train step (clip 1.0 + AdamW, donated state) on a fixed random batch."""
  devices = jax.devices()[:lay.num_devices]
  mesh = step_lib.make_mesh(devices)
  model = model_lib.Transformer(mcfg)
  loss_fn = lambda params, batch: model_lib.loss_fn(model, params, batch)
  init_params = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
  groups = noise_scale.param_groups(jax.eval_shape(init_params, jax.random.key(0)))
  lr = optax.constant_schedule(1e-3)
  ocfg = ml_collections.ConfigDict({"optim": dict(
      name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0)})
  tx = optim.optimizer(ocfg, lr)
  sc = step_lib.StepConfig(num_microbatches=lay.num_microbatches, microbatch=lay.microbatch,
                           seq_len=seq_len, num_devices=lay.num_devices, noise=noise)
  step = step_lib.make_train_step(loss_fn, tx, lr, sc, mesh)
  state = step_lib.init_state(init_params, tx, jax.random.key(seed), mesh, groups)
  batch_size = lay.per_device * lay.num_devices
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch_size, seq_len + 1), 0,
                              mcfg.vocab_size, jnp.int32)
  batch = jax.device_put(tokens, NamedSharding(mesh, P("data")))
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  memory = 0 if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes +
                                     mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  out = JaxStep(compiled, state, batch, compile_s, memory)
  out()  # one warm step, untimed
  return out


def _model_config(size: str, cfg: BenchConfig) -> model_lib.ModelConfig:
  n_layer, d_model, n_heads = model_lib.SIZES[size]
  return model_lib.ModelConfig(n_layer=n_layer, d_model=d_model, n_heads=n_heads,
                               vocab_size=cfg.vocab_size, max_len=cfg.seq_len, dtype=cfg.dtype)


# A reference factory: (ModelConfig, layout, seq_len) -> a blocking step() callable.
Reference = Callable[[model_lib.ModelConfig, config_lib.Layout, int], Callable[[], Any]]


def run_size(size: str, cfg: BenchConfig, reference: Reference | None = None,
             reference_name: str = "torch") -> dict[str, Any]:
  """All measurements of one size; a dict ready for JSON (times in seconds)."""
  mcfg = _model_config(size, cfg)
  lay = _layout(cfg, cfg.batch)
  tokens = cfg.batch * cfg.seq_len
  steps = {"noise_on": build_step(mcfg, lay, cfg.seq_len, True, cfg.seed),
           "noise_off": build_step(mcfg, lay, cfg.seq_len, False, cfg.seed)}
  variants: dict[str, Callable[[], Any]] = dict(steps)
  if reference is not None:
    variants[reference_name] = reference(mcfg, lay, cfg.seq_len)
    variants[reference_name]()  # warm-up
  times = interleave(variants, cfg.rounds, cfg.steps_per_round)
  med = {k: statistics.median(v) for k, v in times.items()}
  paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
  fpt = flops_per_token(mcfg, cfg.seq_len)
  out: dict[str, Any] = {
      "size": size, "n_layer": mcfg.n_layer, "d_model": mcfg.d_model, "n_heads": mcfg.n_heads,
      "n_params": model_lib.non_embedding_params(mcfg), "batch": cfg.batch,
      "seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size, "num_microbatches":
      lay.num_microbatches, "microbatch": lay.microbatch, "flops_per_token": fpt,
      "step_s": med["noise_on"], "step_noise_off_s": med["noise_off"],
      "tokens_per_s": tokens / med["noise_on"],
      "tokens_per_s_noise_off": tokens / med["noise_off"],
      # Paired per round: >1 means the noise scale costs time.
      "noise_on_off_ratio": paired("noise_on", "noise_off"),
      "compile_s": steps["noise_on"].compile_s,
      "memory_bytes": steps["noise_on"].memory_bytes, "rounds": times}
  if reference is not None:
    out[f"{reference_name}_step_s"] = med[reference_name]
    out[f"{reference_name}_tokens_per_s"] = tokens / med[reference_name]
    # bscan tokens/s over the reference's, paired per round.
    out[f"bscan_over_{reference_name}"] = paired(reference_name, "noise_on")
  if cfg.overhead:
    out.update(_overhead(mcfg, cfg, med["noise_on"], reference, reference_name))
  if cfg.hessian_calls:
    out["hessian_call_s"] = _hessian_seconds(mcfg, lay, cfg, steps["noise_off"])
  del steps
  return out


def _overhead(mcfg: model_lib.ModelConfig, cfg: BenchConfig, step_s: float,
              reference: Reference | None, reference_name: str) -> dict[str, Any]:
  """The step at one sequence, and the fixed per-step cost t(1) − t(B)/B it implies."""
  one = _layout(dataclasses.replace(cfg, microbatch=1), 1)
  variants = {"batch1": build_step(mcfg, one, cfg.seq_len, True, cfg.seed)}
  if reference is not None:
    variants[reference_name] = reference(mcfg, one, cfg.seq_len)
    variants[reference_name]()
  times = interleave(variants, cfg.rounds, cfg.steps_per_round)
  t1 = statistics.median(times["batch1"])
  out = {"batch1_step_s": t1, "batch1_tokens_per_s": cfg.seq_len / t1,
         "overhead_s": t1 - step_s / cfg.batch}
  if reference is not None:
    out[f"batch1_{reference_name}_tokens_per_s"] = cfg.seq_len / statistics.median(
        times[reference_name])
  return out


def _hessian_seconds(mcfg: model_lib.ModelConfig, lay: config_lib.Layout, cfg: BenchConfig,
                     step: JaxStep) -> float:
  """Median seconds of one B_noise call (train_step.make_hessian_fn) on the step's params."""
  model = model_lib.Transformer(mcfg)
  loss_fn = lambda params, batch: model_lib.loss_fn(model, params, batch)
  sc = step_lib.StepConfig(num_microbatches=lay.num_microbatches, microbatch=lay.microbatch,
                           seq_len=cfg.seq_len, num_devices=lay.num_devices)
  mesh = step_lib.make_mesh(jax.devices()[:lay.num_devices])
  fn = step_lib.make_hessian_fn(loss_fn, sc, mesh)
  params = step.state.params
  jax.block_until_ready(fn(params, step.batch))  # compile
  return statistics.median(
      _seconds(lambda: jax.block_until_ready(fn(params, step.batch)))
      for _ in range(cfg.hessian_calls))


def run(cfg: BenchConfig, reference: Reference | None = None,
        reference_name: str = "torch") -> dict[str, Any]:
  """The matmul ceiling, then every size; MFU against the better of numpy and jnp.dot."""
  ceiling = matmul_ceiling()
  peak = max(ceiling.values()) * 1e9
  sizes = []
  for size in cfg.sizes:
    r = run_size(size, cfg, reference, reference_name)
    r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    if reference is not None:
      r[f"{reference_name}_mfu"] = r[f"{reference_name}_tokens_per_s"] * r["flops_per_token"] / peak
    sizes.append(r)
  return {"config": dataclasses.asdict(cfg), "flop_formula": FLOP_FORMULA,
          "matmul_gflops": ceiling, "jax_version": jax.__version__,
          "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "reference": reference_name if reference is not None else None,
          "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "sizes": sizes}


def end_to_end(train_cfg: ml_collections.ConfigDict, workdir: str, warmup: int = 10) -> float:
  """Median tokens/s of a real trainer run (bscan.train.run: data, step, rows) past `warmup`."""
  from bscan import train  # pylint: disable=g-import-not-at-top  (the trainer is heavy)
  from bscan import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if train.run(train_cfg, workdir) != "done":
    raise RuntimeError(f"the end-to-end run in {workdir} did not finish")
  rows, _ = workdir_lib.read_metrics(workdir)
  speeds = [r[workdir_lib.Col.TOKENS_PER_S] for r in rows[warmup:]]
  return statistics.median(s for s in speeds if s is not None)


def report(result: dict[str, Any]) -> str:
  """The table: one row per size, then the formula and the machine."""
  ref = result["reference"]
  head = ("size   K×m     tok/s     MFU  noise on/off  compile s  mem MiB  batch1 tok/s  "
          "overhead ms")
  if ref:
    head += f"  {ref} tok/s  {ref} MFU  bscan/{ref}"
  lines = [head]
  for r in result["sizes"]:
    line = (f"{r['size']:<6} {r['num_microbatches']:>2}×{r['microbatch']:<4} "
            f"{r['tokens_per_s']:>8,.0f} {r['mfu']:>6.1%} {r['noise_on_off_ratio']:>12.3f} "
            f"{r['compile_s']:>10.1f} {r['memory_bytes'] / 2**20:>8.1f} "
            f"{r.get('batch1_tokens_per_s', float('nan')):>13,.0f} "
            f"{r.get('overhead_s', float('nan')) * 1e3:>12.2f}")
    if ref:
      line += (f"  {r[f'{ref}_tokens_per_s']:>{len(ref) + 6},.0f}  "
               f"{r[f'{ref}_mfu']:>{len(ref) + 4}.1%}  {r[f'bscan_over_{ref}']:>{len(ref) + 6}.3f}")
    lines.append(line)
  for r in result["sizes"]:
    if "end_to_end_tokens_per_s" in r:
      lines.append(f"{r['size']}: end to end (experiments.train's loop, data and rows) "
                   f"{r['end_to_end_tokens_per_s']:,.0f} tokens/s = "
                   f"{r['end_to_end_over_step']:.3f} × the step alone")
  c = result["config"]
  g = result["matmul_gflops"]
  lines += [
      f"batch {c['batch']} sequences × T={c['seq_len']}, vocab {c['vocab_size']}, "
      f"{c['dtype']} compute; medians of "
      f"{c['rounds']} interleaved rounds × {c['steps_per_round']} steps",
      f"{result['flop_formula']}",
      "matmul ceiling (2048² float32): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in g.items())
      + "; MFU uses the better",
      f"noise on/off: paired per-round step-time ratio; bscan/{ref or 'ref'}: tokens/s ratio; "
      "overhead = t(batch 1) − t(batch B)/B; mem = XLA's compiled args+outputs+temps; "
      f"process max RSS {result['max_rss_bytes'] / 2**20:.0f} MiB",
      f"jax {result['jax_version']} on {result['backend']} ({result['device']})"]
  for r in result["sizes"]:
    if "hessian_call_s" in r:
      lines.append(f"{r['size']}: B_noise Hessian call {r['hessian_call_s'] * 1e3:.1f} ms = "
                   f"{r['hessian_call_s'] / r['step_noise_off_s']:.2f} train steps")
  return "\n".join(lines)
