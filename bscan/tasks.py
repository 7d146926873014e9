"""The trainer's plug-in seam: a task supplies the model, its data and its evaluation.

The trainer, the step, the noise scale and the analysis know nothing about transformers or
tokenizers: they ask a task (chosen by `cfg.task`) for its parameters, loss, noise-scale
parameter groups, batches and held-out set. `lm` is the transformer language model on text;
`nqm` (bscan.nqm) is the noisy quadratic model whose critical batch size is known exactly.
A new task subclasses Task and registers itself under a name.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from bscan import data as data_lib
from bscan import model as model_lib
from bscan import noise_scale
from bscan.errors import ConfigError

LossFn = Callable[[Any, jax.Array], jax.Array]  # (params, batch rows) -> mean loss per token


@dataclasses.dataclass(frozen=True)
class Shape:
  """What a run records about its model and data (the plan's model and data fields)."""

  n_params: int  # non-embedding parameters N
  n_params_embedding: int
  n_layer: int
  d_model: int
  vocab_size: int
  dataset: str
  tokenizer: str
  corpus_fingerprint: dict | None = None


@dataclasses.dataclass(frozen=True)
class Model:
  """The functions the step needs: init, loss, parameter groups and curvature for B_noise."""

  init_params: Callable[[jax.Array], Any]
  loss_fn: LossFn
  group_of: noise_scale.GroupOf
  curvature: Any  # 'hessian' or a noise_scale.GaussNewton


class Task(abc.ABC):
  """A model + data + eval plug-in: everything the trainer asks of the thing it trains."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg

  @abc.abstractmethod
  def validate(self) -> None:
    """Raises ConfigError (field and fix) for task fields; builds nothing."""

  def prepare(self) -> None:
    """Builds what the task reads (data, tokenizer) once; process 0 runs it first."""

  @abc.abstractmethod
  def shape(self) -> Shape:
    """The model's size and the data's identity (may build a tokenizer)."""

  @abc.abstractmethod
  def model(self, shape: Shape) -> Model:
    """The model's functions."""

  @abc.abstractmethod
  def train_iterator(self, process_index: int, process_count: int) -> Iterator[np.ndarray]:
    """This process's rows of every global batch; get_state/set_state keyed by shard."""

  @abc.abstractmethod
  def eval_batches(self) -> np.ndarray:
    """The fixed held-out set, the same on every process and run."""


_TASKS: dict[str, type[Task]] = {}
_MODULES = {"nqm": "bscan.nqm"}  # tasks defined outside this module, imported on first use


def register(name: str) -> Callable[[type[Task]], type[Task]]:
  """Class decorator: makes a Task available as `cfg.task = name`."""

  def add(cls: type[Task]) -> type[Task]:
    _TASKS[name] = cls
    return cls

  return add


def get(cfg: ml_collections.ConfigDict) -> Task:
  """The task a config names."""
  name = cfg.get("task", "lm")
  if name not in _TASKS and name in _MODULES:
    importlib.import_module(_MODULES[name])
  if name not in _TASKS:
    raise ConfigError(f"task={name!r} is unknown; choose one of "
                      f"{sorted(set(_TASKS) | set(_MODULES))}")
  return _TASKS[name](cfg)


@register("lm")
class LanguageModel(Task):
  """The decoder-only transformer (bscan.model) on tokenized text (bscan.data)."""

  def validate(self) -> None:
    cfg = self.cfg
    if cfg.model.size not in model_lib.SIZES:
      raise ConfigError(f"model.size={cfg.model.size!r} is unknown; choose one of "
                        f"{sorted(model_lib.SIZES)}")
    if cfg.model.max_len <= 0:
      raise ConfigError(f"model.max_len={cfg.model.max_len} must be positive")
    if cfg.seq_len > cfg.model.max_len:
      raise ConfigError(f"seq_len={cfg.seq_len} is longer than the model's context "
                        f"model.max_len={cfg.model.max_len}; lower seq_len or raise model.max_len")
    data_lib.validate_data_config(cfg)

  def prepare(self) -> None:
    data_lib.prepare(self.cfg)

  def shape(self) -> Shape:
    vocab = data_lib.get_tokenizer(self.cfg).vocab_size
    mcfg = model_config(self.cfg, vocab)
    return Shape(n_params=model_lib.non_embedding_params(mcfg),
                 n_params_embedding=model_lib.embedding_params(mcfg), n_layer=mcfg.n_layer,
                 d_model=mcfg.d_model, vocab_size=vocab,
                 dataset=self.cfg.data.tfds_name or self.cfg.data.name,
                 tokenizer=self.cfg.tokenizer.name,
                 corpus_fingerprint=data_lib.corpus_fingerprint(self.cfg))

  def model(self, shape: Shape) -> Model:
    transformer = model_lib.Transformer(model_config(self.cfg, shape.vocab_size))
    dummy = np.zeros((1, self.cfg.seq_len), np.int32)
    curvature = "hessian" if self.cfg.noise.curvature == "hessian" else noise_scale.GaussNewton(
        lambda p, b: model_lib.logits_fn(transformer, p, b), model_lib.cross_entropy)
    return Model(init_params=lambda rng: transformer.init(rng, dummy)["params"],
                 loss_fn=lambda params, batch: model_lib.loss_fn(transformer, params, batch),
                 group_of=noise_scale.layer_group, curvature=curvature)

  def train_iterator(self, process_index: int, process_count: int) -> Iterator[np.ndarray]:
    return data_lib.make_train_iterator(self.cfg, process_index=process_index,
                                        process_count=process_count)

  def eval_batches(self) -> np.ndarray:
    return data_lib.make_eval_batches(self.cfg)


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """The ModelConfig of a run: a ladder size, its context, dtype and the tokenizer's vocab."""
  n_layer, d_model, n_heads = model_lib.SIZES[cfg.model.size]
  return model_lib.ModelConfig(
      n_layer=n_layer, d_model=d_model, n_heads=n_heads, vocab_size=vocab_size,
      max_len=cfg.model.max_len, dtype=cfg.model.dtype)
