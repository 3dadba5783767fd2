"""bistil_jax: BiStil bilingual distillation in JAX/Flax.

Public API (imported lazily so `bistil --help` stays fast):
  model, params = bistil_jax.load_hf(path)
  bistil_jax.save_hf(path, model, params, tokenizer_dir=...)
"""

__version__ = "0.1.0"

_LAZY = {
  "load_hf": "bistil_jax.checkpoint.hf",
  "save_hf": "bistil_jax.checkpoint.hf",
  "Model": "bistil_jax.model.encoder",
  "ModelConfig": "bistil_jax.model.config",
  "BistilError": "bistil_jax.errors",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'bistil_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
