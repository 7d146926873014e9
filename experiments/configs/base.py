"""The common base every experiment config starts from; each field is documented once here."""

import ml_collections

from bscan import config as config_lib


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults for one training run; experiment files override what they scan."""
  c = ml_collections.ConfigDict()
  c.task = "lm"  # what is trained (bscan.tasks): lm (transformer on text) | nqm
  c.seed = 0
  c.seq_len = 128  # T: tokens per sequence (context)
  c.batch_size = 32  # global batch in sequences
  c.microbatch_size = 0  # sequences per microbatch (gradient accumulation); 0 = automatic
  c.max_microbatch_size = 16  # the memory cap that the automatic choice respects

  c.model = ml_collections.ConfigDict()
  c.model.size = "98k"  # a name in bscan.model.SIZES
  c.model.max_len = 1024  # the model's context (position table)
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16

  c.data = ml_collections.ConfigDict()
  c.data.name = "pystdlib"  # pystdlib | text_files | tfds
  c.data.tfds_name = ""  # e.g. lm1b, c4, pg19, tiny_shakespeare (data.name=tfds)
  c.data.text_key = "text"  # the text feature (pg19: book_text)
  c.data.download = False  # tfds: download and prepare data.tfds_name if it is not there yet
  c.data.data_dir = ""  # '' = $BSCAN_DATA_DIR or ~/.cache/bscan/tensorflow_datasets
  c.data.glob = ""  # local text files (data.name=text_files)
  c.data.include_tests = False  # pystdlib: include test packages of the stdlib
  c.data.max_files = 0  # pystdlib: a deterministic subset (0 = all files)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.eval_sequences = 64  # size of the fixed held-out evaluation set
  c.data.worker_count = 0  # grain workers (0 = in-process)
  c.data.shuffle_window = 16384  # packed sequences shuffled within this window (all shards)
  # The global batch is read as gcd(batch_size, shards) shards; any process count dividing
  # that reads the same batches (so a run can resume on a slice of another size).
  c.data.shards = 16

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.name = "bytes"  # bytes | sentencepiece | tiktoken
  c.tokenizer.vocab_size = 4096  # sentencepiece: trained vocabulary size
  c.tokenizer.path = ""  # sentencepiece: a model file ('' = train on the corpus, cached)
  c.tokenizer.encoding = "gpt2"  # tiktoken encoding name
  c.tokenizer.train_bytes = 20_000_000  # sentencepiece: corpus sample it is trained on

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # adamw | sgd
  c.optim.lr = 1e-3  # peak learning rate (lr_rule=fixed)
  c.optim.lr_rule = "fixed"  # fixed | kaplan (eq. D.1 from the model's N)
  c.optim.lr_scale = 1.0  # multiplies the kaplan rule
  # Learning rate against batch_size / reference_batch: none | auto (the optimizer's own rule:
  # sqrt for adamw, linear for sgd) | sqrt | linear; a rule that does not fit the optimizer is
  # an error unless declare_scaling=True (bscan.lr_scaling).
  c.optim.batch_scaling = "none"
  c.optim.declare_scaling = False
  c.optim.reference_batch = 0  # sequences; the batch at which the rule gives lr
  c.optim.schedule = "constant"  # constant (after warmup; for scans) | cosine | linear
  c.optim.warmup_tokens = 0  # warmup in tokens, so all batch sizes warm up on equal data
  c.optim.final_lr_fraction = 0.1  # cosine / linear decay floor
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.momentum = 0.0  # sgd: heavy-ball momentum (0 = plain SGD)
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0  # 0 = no clipping

  c.budget = ml_collections.ConfigDict()
  c.budget.train_tokens = 0  # fixed token budget (0 = unset)
  c.budget.train_steps = 0  # or a step budget (0 = unset)
  c.budget.target_loss = 0.0  # or stop once the smoothed train loss reaches this...
  c.budget.max_tokens = 0  # ...with this cap in tokens
  c.budget.overshoot = 0.1  # keep going this fraction of steps past the target
  # The stop condition smooths the train loss over this many tokens (an EMA time constant in
  # tokens, not steps: a 256-token batch's loss is far noisier than an 8k-token batch's).
  c.budget.smoothing_tokens = 30_000
  # Divergence beyond NaN/inf: the train loss above the first step's loss plus this many nats
  # for diverge_patience consecutive steps (0 = NaN/inf only) ends the run as diverged.
  c.budget.diverge_margin = 3.0
  c.budget.diverge_patience = 20

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # linear eval cadence (0 = off)
  c.eval.per_decade = 8  # log-spaced evals: this many per decade of steps (0 = off)
  c.log_every_steps = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 2

  # A branch (bscan.branching) starts from another run's checkpoint instead of from init.
  c.branch = ml_collections.ConfigDict()
  c.branch.from_workdir = ""  # '' = not a branch; the reference run (or relative to the sweep)
  c.branch.from_step = 0  # the reference checkpoint's step
  c.branch.replicate = 0  # replicate j reads the reference's stream after j·Δ tokens

  # A batch that grows during the run (bscan.batch_schedule): a declared schedule in tokens or a
  # controller. The rate follows optim.batch_scaling from the first batch (batch_size); the
  # optimizer's own rule is 'auto'. Every batch must fit the layout and the data shards.
  c.ramp = ml_collections.ConfigDict()
  c.ramp.schedule = ""  # 'TOKENS:BATCH,...' in sequences, e.g. '0:8,200k:16,1M:32' ('' = none)
  # '' | noise: batch = factor × the EMA noise scale | branched: periodic branched local-CBS
  # tests from the run itself, keeping the branch at the local CBS
  c.ramp.controller = ""
  c.ramp.estimate = "b_simple"  # noise controller: the estimate it follows
  c.ramp.factor = 1.0  # noise controller: batch = factor × estimate (sequences)
  c.ramp.max_batch = 0  # controller: the largest batch (sequences; 0 = batch_size)
  c.ramp.multiple = 0  # controller: batches are multiples of this (0 = batch_size)
  c.ramp.every_tokens = 0  # controller: at most one change (or test) per this many tokens
  c.ramp.branch_ks = (1, 2)  # branched: the multiples of the batch each test tries
  c.ramp.branch_tokens = 0  # branched: Δ, the tokens of each branch
  c.ramp.epsilon = 0.01  # branched: nats of held-out loss a larger batch may lose to k = 1
  c.ramp.beta2_in_tokens = False  # Adam's β2 → β2^(B/B₀): its half-life fixed in tokens

  c.noise = ml_collections.ConfigDict()
  c.noise.enabled = True  # B_simple every step
  c.noise.ema_decay = 0.95
  c.noise.group_every = 50  # log per-layer-group estimates every N steps (0 = never)
  c.noise.hessian_every = 0  # Hessian-weighted B_noise every N steps (0 = off)
  c.noise.curvature = "hessian"  # hessian | gauss_newton
  return c


def nqm_fields(dim: int, condition: float, noise: float, problem_seed: int
               ) -> ml_collections.ConfigDict:
  """The noisy quadratic model's fields (task=nqm; bscan.nqm_theory.make_problem)."""
  n = ml_collections.ConfigDict()
  n.dim = dim  # eigendirections (even: two parameter groups)
  n.condition = condition  # h_max / h_min; h log-spaced from 1 down to 1/condition
  n.noise = noise  # Σ = noise · H
  n.problem_seed = problem_seed  # θ₀ ~ N(0, I) from this seed (the run seed draws the noise)
  return n


# Scan axes every experiment file accepts in its `arg` (batch in sequences).
COMMON_ARGS = ("size", "batch", "lr", "seed", "microbatch", "seq_len", "target", "max_tokens",
               "tokens", "steps")


def apply_args(c: ml_collections.ConfigDict, args: dict) -> ml_collections.ConfigDict:
  """Writes the scanned values of `arg` into the config; derived values are computed later."""
  fields = {"size": "model.size", "batch": "batch_size", "lr": "optim.lr", "seed": "seed",
            "microbatch": "microbatch_size", "seq_len": "seq_len", "target": "budget.target_loss",
            "max_tokens": "budget.max_tokens", "tokens": "budget.train_tokens",
            "steps": "budget.train_steps"}
  for key, value in args.items():
    if key in fields:
      *parents, leaf = fields[key].split(".")
      node = c
      for p in parents:
        node = node[p]
      kind = type(node[leaf])
      if kind in (int, float) and not isinstance(value, (int, float)) or (
          kind is int and value != int(value)):
        raise config_lib.ConfigError(
            f"arg {key}={value} must be {'an integer' if kind is int else 'a number'}")
      node[leaf] = kind(value)
  return c
