"""The config schema: defaults for every section and `validate()` with clear errors.

Configs are ml_collections `ConfigDict`s (the JAX ecosystem's convention). The entry points
convert the model section once into a frozen, hashable `ModelConfig` (`ModelConfig.from_config`,
which validates it) and resolve `attention_impl='auto'` for the platform they run on
(`resolve_attention`); everything below them takes that typed config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from ctx.errors import UserError

COMPRESSIONS = ("conv", "max", "mean", "dilated_conv", "most_used")
COMPRESSION_LOSSES = ("attention", "autoencoder", "none")
LAYER_NORMS = ("pre", "post")
DTYPES = ("float32", "bfloat16")
REMAT_CHOICES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas_tpu", "pallas_gpu", "auto")
FUSED_ATTENTION_IMPLS = ("cudnn", "pallas_tpu", "pallas_gpu")
LEARNED_COMPRESSIONS = ("conv", "dilated_conv")
# Deepest layer stack that scan_unroll=0 unrolls: up to here an unrolled stack compiles as fast
# as one scanned layer and skips the scan's stacked copies of what the backward pass keeps;
# deeper ones would make compile time grow with depth (docs/performance.md has the figures).
UNROLL_LAYERS_UP_TO = 4
# Token ids, positions, lengths and step counters are int32 on every device: a larger value
# would overflow inside a jitted program (JAX refuses it with its own words, far from the field).
INT32_MAX = 2**31 - 1
INT32_REASON = "token ids, lengths and steps are int32 in the compiled programs"


class ConfigError(UserError, ValueError):
    """An impossible or unknown configuration; the message names the fields and the fix."""


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The model section of a config: ModelConfig's defaults, with `overrides`."""
    cfg = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
    cfg.attention_dropout = config_dict.placeholder(
        float
    )  # None, and still settable from the command line
    cfg.update(overrides)
    return cfg


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's fields and their defaults (a tiny Compressive Transformer), in one place:
    `model_config()` makes the ConfigDict section from them, and `from_config` turns a section
    back into this immutable, validated copy that Flax modules carry as a field."""

    vocab_size: int = 256
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    # Dropout of the attention weights. None: model.dropout, one rate everywhere as in Sonnet
    # (Rae et al. 2019 do not report theirs). A rate of its own (Transformer-XL's `dropatt`)
    # lets a config keep dropout on the residuals, embeddings and position table and train
    # with the fused attention, which has no weights to drop (it needs 0 here).
    attention_dropout: float | None = None
    segment_length: int = 16  # n_s
    memory_length: int = 16  # n_m
    compressed_length: int = 16  # n_cm
    compression_rate: int = 2  # c
    compression: str = "conv"
    compression_loss: str = "attention"
    layer_norm: str = "pre"
    dtype: str = "float32"
    # Dilations of the 'dilated_conv' stack (kernel 2, causal padding, then the strided conv of 'conv').
    dilation_rates: tuple[int, ...] = (1, 2, 4)
    # Rematerialisation of each layer in the backward pass: 'none', 'full' or 'dots' (save only
    # matmul outputs).
    remat: str = "none"
    # Layers per iteration of the scan over layers; same parameters either way. 0 (auto): stacks
    # of up to UNROLL_LAYERS_UP_TO layers are unrolled (no stacked residuals to copy, and they
    # compile as fast as one scanned layer), deeper ones scanned one layer at a time, which keeps
    # compile time flat in depth.
    scan_unroll: int = 0
    # How a segment's attention is computed: 'xla' (the reference), 'pallas_gpu' (fused, NVIDIA
    # GPUs), 'cudnn' (fused, GPUs, no attention dropout), 'pallas_tpu' (fused, TPUs) or 'auto';
    # docs/architecture.md#attention-implementations.
    attention_impl: str = "xla"

    def __post_init__(self) -> None:
        """An invalid ModelConfig cannot exist: every way of making one (from_config, a hand-made
        one, dataclasses.replace) is checked here, with the error naming the field."""
        object.__setattr__(self, "dilation_rates", tuple(self.dilation_rates))
        validate_model(self)

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict | Mapping[str, Any]) -> "ModelConfig":
        """The typed copy of a config's model section, validated (ConfigError names the field)."""
        if isinstance(section, ModelConfig):
            return section
        validate_model(section)  # names the unknown or missing fields of a section
        return cls(**{f.name: _get(section, f.name) for f in dataclasses.fields(cls)})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def layers_per_scan_iteration(self) -> int:
        """`scan_unroll` with 0 (auto) resolved: shallow stacks unrolled, deep ones scanned."""
        if self.scan_unroll:
            return self.scan_unroll
        return self.n_layers if self.n_layers <= UNROLL_LAYERS_UP_TO else 1

    @property
    def attention_dropout_rate(self) -> float:
        """The rate at which attention weights are dropped in training (attention_dropout, or
        dropout when it is None)."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def fused_attention(self) -> bool:
        """Whether segments attend through a fused kernel, which forms no probabilities."""
        return self.attention_impl in FUSED_ATTENTION_IMPLS

    @property
    def compresses(self) -> bool:
        """Whether evicted memories are compressed at all (n_cm > 0)."""
        return self.compressed_length > 0

    @property
    def slots_per_segment(self) -> int:
        """Compressed slots produced from the n_s memories evicted by one segment."""
        return self.segment_length // self.compression_rate

    @property
    def fused_reconstruction_loss(self) -> bool:
        """Whether the attention-reconstruction loss's reads run as one Pallas kernel, as they
        do beside the TPU attention kernel (ctx.nn.pallas_reconstruction)."""
        return (
            self.compresses
            and self.compression_loss == "attention"
            and self.attention_impl == "pallas_tpu"
        )

    @property
    def has_compression_params(self) -> bool:
        return self.compresses and self.compression in LEARNED_COMPRESSIONS


def require_resolved(model_config: Any, taker: str) -> ModelConfig:
    """`model_config` when it is a ModelConfig with attention_impl resolved for the platform; a
    ConfigError naming the one fix otherwise (the typed config is the only way in)."""
    fix = (
        "make it once where the run starts: ctx.backend.model_config_for_run(config, command), or "
        "ctx.backend.resolve_attention_here(ModelConfig.from_config(config.model))"
    )
    if not isinstance(model_config, ModelConfig):
        raise ConfigError(
            f"{taker} takes the run's ModelConfig, not a {type(model_config).__name__}: {fix}"
        )
    if model_config.attention_impl == "auto":
        raise ConfigError(
            f"{taker} takes a ModelConfig with attention_impl resolved for the platform, not 'auto': "
            f"{fix}"
        )
    return model_config


def _get(cfg: Any, name: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg[name]
    return getattr(cfg, name)


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


def _fields(cfg: Any) -> set[str]:
    if isinstance(cfg, Mapping) or isinstance(cfg, ml_collections.ConfigDict):
        return set(cfg.keys())
    return {f.name for f in dataclasses.fields(cfg)}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model(cfg: Any) -> None:
    """Reject impossible model configurations with one message naming fields and fix."""
    expected = {f.name for f in dataclasses.fields(ModelConfig)}
    present = _fields(cfg)
    unknown = sorted(present - expected)
    missing = sorted(expected - present)
    _require(
        not unknown,
        f"config.model has unknown field(s) {unknown}; known fields: {sorted(expected)}",
    )
    _require(
        not missing,
        f"config.model is missing field(s) {missing}; start from ctx.config.model_config()",
    )

    def g(name):
        return _get(cfg, name)

    for name in (
        "vocab_size",
        "n_layers",
        "d_model",
        "n_heads",
        "d_ff",
        "segment_length",
        "memory_length",
        "compressed_length",
        "compression_rate",
    ):
        value = g(name)
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"model.{name} must be an integer, got {value!r}",
        )
        _require(value >= 0, f"model.{name} must not be negative, got {value}")
        _require(
            value <= INT32_MAX,
            f"model.{name} must be at most {INT32_MAX}: {INT32_REASON}, got {value}",
        )
    for name in ("n_layers", "d_model", "n_heads", "d_ff", "segment_length", "compression_rate"):
        _require(g(name) > 0, f"model.{name} must be positive, got 0")
    unroll = g("scan_unroll")
    _require(
        isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 0,
        "model.scan_unroll must be a non-negative integer (layers per scan iteration, 0 = auto), "
        f"got {unroll!r}",
    )
    _require(g("vocab_size") >= 2, f"model.vocab_size must be at least 2, got {g('vocab_size')}")
    _require(
        g("d_model") % g("n_heads") == 0,
        f"model.d_model ({g('d_model')}) must be divisible by model.n_heads ({g('n_heads')}); "
        "change one of them",
    )
    _require(
        g("d_model") % 2 == 0,
        f"model.d_model ({g('d_model')}) must be even (sinusoid position tables pair sin/cos)",
    )
    _require(_is_rate(g("dropout")), f"model.dropout must be in [0, 1), got {g('dropout')!r}")
    _require(
        g("attention_dropout") is None or _is_rate(g("attention_dropout")),
        f"model.attention_dropout must be in [0, 1), or None for model.dropout's rate, "
        f"got {g('attention_dropout')!r}",
    )
    for name, allowed in (
        ("compression", COMPRESSIONS),
        ("compression_loss", COMPRESSION_LOSSES),
        ("layer_norm", LAYER_NORMS),
        ("dtype", DTYPES),
        ("remat", REMAT_CHOICES),
        ("attention_impl", ATTENTION_IMPLS),
    ):
        _require(
            g(name) in allowed,
            f"model.{name}={g(name)!r} is unknown; choose one of {list(allowed)}",
        )
    if g("attention_impl") == "cudnn":
        rate = g("dropout") if g("attention_dropout") is None else g("attention_dropout")
        source = (
            "model.dropout, which it follows while unset"
            if g("attention_dropout") is None
            else "set there"
        )
        _require(
            rate == 0,
            "model.attention_impl='cudnn' has no attention dropout, and model.attention_dropout "
            f"is {rate} ({source}); set --config.model.attention_dropout=0 (the other dropouts stay), "
            "or attention_impl='pallas_gpu' (NVIDIA GPUs), 'pallas_tpu' (TPUs) or 'xla'",
        )
        _require(
            g("compression") != "most_used",
            "model.compression='most_used' reads the attention each "
            "evicted memory receives, which cuDNN's fused kernel does not return; use "
            "attention_impl='pallas_gpu' (NVIDIA GPUs), 'pallas_tpu' (TPUs) or 'xla'",
        )
    rates = g("dilation_rates")
    _require(
        all(isinstance(r, int) and r > 0 for r in rates),
        f"model.dilation_rates must be positive integers, got {rates!r}",
    )
    if g("compressed_length") > 0:
        _require(
            g("segment_length") % g("compression_rate") == 0,
            f"model.segment_length ({g('segment_length')}) must be a multiple of "
            f"model.compression_rate ({g('compression_rate')}): each segment evicts "
            "segment_length memories that are compressed in groups of compression_rate",
        )
        _require(
            g("compression_loss") != "autoencoder" or g("compression") in LEARNED_COMPRESSIONS,
            f"model.compression_loss='autoencoder' needs a learned compression "
            f"({list(LEARNED_COMPRESSIONS)}), got model.compression={g('compression')!r}; "
            "use compression_loss='none' or 'attention' for parameter-free compression",
        )
        _require(
            g("compression_loss") != "none" or g("compression") not in LEARNED_COMPRESSIONS,
            f"model.compression={g('compression')!r} with model.compression_loss='none' would "
            "never be trained (compressed memories carry no gradient); use 'attention' or "
            "'autoencoder', or a parameter-free compression ('max', 'mean', 'most_used')",
        )


def default_config() -> ml_collections.ConfigDict:
    """Every section with its defaults; experiments/*.py start from this."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.model = model_config()
    cfg.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,  # total training segments of the run, restored ones included
            batch_size=8,  # global B: parallel streams
            # > 0: the global batch is this times the number of devices (batch_size is then ignored).
            per_device_batch_size=0,
            segments_per_call=8,  # G: segments scanned inside one jitted call
            checkpoint_every=500,
            max_checkpoints_to_keep=2,
            # A committed checkpoint that cannot be read: 'error' (stop and say which) or
            # 'previous' (resume from the newest older one that reads).
            on_corrupt_checkpoint="error",
            eval_every=500,  # 0 = validate only at the end
            # Adam with linear warmup (init_lr -> peak_lr) then cosine decay to end_lr.
            peak_lr=3e-4,
            init_lr=1e-6,
            end_lr=1e-6,
            warmup_steps=4000,
            decay_steps=100_000,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip=0.1,
            # Paper: accumulate gradients over 4 segments once 60k steps are done.
            accumulate_after=60_000,
            accumulate_every=4,
            # The compression network's own optimizer branch.
            compress_peak_lr=3e-4,
            compress_grad_clip=0.1,
        )
    )
    cfg.data = ml_collections.ConfigDict(
        dict(
            dataset="demo",  # 'demo' | 'pg19' | 'enwik8' | 'wt103'
            path="",  # where the source lives: a local folder/file or a gs:// URL
            tokenizer="bytes",  # 'bytes' or the path of a SentencePiece .model
            cache_dir="",  # tokenized splits and prepared TFDS files; "" = ~/.cache/ctx
            validation_fraction=0.1,  # demo only: share of topics held out
            piece_bytes=1_000_000,  # enwik8 only: bytes per document piece
            shuffle=True,
        )
    )
    # Validation/evaluation: 0 = the training values. shrink_batch: halve the batch whenever half
    # the rows have run out of documents (one compile per batch size).
    cfg.eval = ml_collections.ConfigDict(dict(batch_size=0, segments_per_call=0, shrink_batch=True))
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    return cfg


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config a `--config=` flag names, `FILE.py` or `FILE.py:variant` (e.g.
    "experiments/demo.py:txl"): the file's `get_config(variant)`, as the commands read it."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(
            f"{path}: no such config file; configs are Python files like experiments/demo.py"
        )
    module_spec = importlib.util.spec_from_file_location(f"ctx_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def with_global_batch(
    cfg: ml_collections.ConfigDict, num_devices: int
) -> ml_collections.ConfigDict:
    """The config with train.batch_size = per_device_batch_size x num_devices when the per-device
    size is set (a copy); otherwise cfg itself."""
    per_device = cfg.train.get("per_device_batch_size", 0)
    if not per_device:
        return cfg
    cfg = cfg.copy_and_resolve_references()
    cfg.train.batch_size = per_device * num_devices
    return cfg


def validate(cfg: Any) -> None:
    """Validate a whole config (or just its model section) and raise ConfigError if wrong."""
    if "model" not in _fields(cfg):
        validate_model(cfg)
        return
    validate_model(cfg.model)
    train = cfg.train
    for name in (
        "num_steps",
        "batch_size",
        "per_device_batch_size",
        "segments_per_call",
        "checkpoint_every",
        "max_checkpoints_to_keep",
        "eval_every",
        "warmup_steps",
        "decay_steps",
        "accumulate_after",
        "accumulate_every",
    ):
        value = train[name]
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"train.{name} must be a non-negative integer, got {value!r}",
        )
        _require(
            value <= INT32_MAX,
            f"train.{name} must be at most {INT32_MAX}: {INT32_REASON}, got {value}",
        )
    for name in (
        "batch_size",
        "segments_per_call",
        "accumulate_every",
        "checkpoint_every",
        "max_checkpoints_to_keep",
    ):
        _require(train[name] > 0, f"train.{name} must be positive, got {train[name]}")
    _require(
        train.on_corrupt_checkpoint in ("error", "previous"),
        f"train.on_corrupt_checkpoint={train.on_corrupt_checkpoint!r} is unknown; choose 'error' or 'previous'",
    )
    for name in (
        "peak_lr",
        "init_lr",
        "end_lr",
        "compress_peak_lr",
        "grad_clip",
        "compress_grad_clip",
        "b1",
        "b2",
        "eps",
        "weight_decay",
    ):
        value = train[name]
        _require(
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0,
            f"train.{name} must be a finite non-negative number, got {value!r}",
        )
    for name in ("b1", "b2"):
        _require(
            train[name] < 1, f"train.{name} must be below 1 (an Adam decay rate), got {train[name]}"
        )
    evaluation = cfg.get("eval", {})
    for name in ("batch_size", "segments_per_call"):
        value = evaluation.get(name, 0)
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"eval.{name} must be a non-negative integer (0 = the training value), got {value!r}",
        )
    _require(
        cfg.mesh.data == -1 or cfg.mesh.data > 0,
        f"mesh.data must be -1 (all remaining devices) or positive, got {cfg.mesh.data}",
    )
    _require(cfg.mesh.fsdp > 0, f"mesh.fsdp must be positive, got {cfg.mesh.fsdp}")
