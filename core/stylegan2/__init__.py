"""StyleGAN2 generator (pure torch) and its checkpoint formats; see docs/architecture.md §core.stylegan2."""
from core.stylegan2.formats import CheckpointError, detect_format, fingerprint, load_generator, save_generator
from core.stylegan2.network import Generator, GeneratorConfig, StyleLayer

__all__ = ["CheckpointError", "Generator", "GeneratorConfig", "StyleLayer", "detect_format", "fingerprint",
           "load_generator", "save_generator"]
