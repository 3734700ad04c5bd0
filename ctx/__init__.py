"""ctx: a JAX/Flax Compressive Transformer (Rae et al., 2019)."""

from ctx.config import ConfigError, ModelConfig, default_config, load_config, model_config, validate
from ctx.nn.memory import Memory, init_memory
from ctx.nn.transformer import CompressiveTransformer

__all__ = [
    "CompressiveTransformer",
    "ConfigError",
    "Memory",
    "ModelConfig",
    "default_config",
    "init_memory",
    "load_config",
    "model_config",
    "validate",
]
