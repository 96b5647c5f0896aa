"""The models a server offers: the embedded default plus the generator checkpoints found in a models folder,
each with its directions (a ``<stem>.directions.json`` manifest beside it, plus SeFa eigenvectors computed
from the generator so that any checkpoint offers edits).

``ModelRegistry.list()`` is the data ``GET /v1/models`` returns (plain JSON-able types);
``ModelRegistry.get(name)`` loads a model once (lazily, thread-safe) and caches it.
"""
from __future__ import annotations

import dataclasses
import pathlib
import threading
from typing import Mapping, Optional

import torch

from core.common import InvalidInput, LatentEditError
from core.edits import Direction, load_directions, manifest_path_for, sefa

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl")
SEFA_K = 5  # SeFa (Shen & Zhou 2021) shows the top-5 eigenvectors per layer group; offered when a model has no files
SPACES = ["w", "w+", "s"]  # every StyleGAN2 supports W, W+ and StyleSpace edits


class UnknownModel(InvalidInput):
    """A model name the registry does not know."""


@dataclasses.dataclass
class LoadedModel:
    """A loaded generator (``eval()``, on the registry's device) and its ``{name: Direction}``."""

    name: str
    path: pathlib.Path
    generator: torch.nn.Module
    directions: dict
    default: bool = False
    directions_error: Optional[str] = None

    def info(self) -> dict:
        """Plain JSON-able description of the model and its directions."""
        G = self.generator
        out = {
            "name": self.name,
            "file": self.path.name,
            "default": self.default,
            "resolution": int(G.resolution),
            "num_ws": int(G.num_ws),
            "w_dim": int(G.w_dim),
            "z_dim": int(G.z_dim),
            "style_layers": len(G.style_layers()),
            "spaces": list(SPACES),
            "directions": [d.info() for d in self.directions.values()],
            "methods": _methods(),
        }
        if self.directions_error:
            out["directions_error"] = self.directions_error
        return out


def _methods() -> list:
    """The inversion methods every StyleGAN2 model supports (core.session.method_catalog)."""
    from core.session import method_catalog

    return method_catalog()


def _is_direction_file(path: pathlib.Path) -> bool:
    """True for a ``.pt`` holding a bare tensor or a GANSpace dict (a direction, not a generator)."""
    if path.suffix.lower() not in (".pt", ".pth"):
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False  # a full pickle or unreadable: let the generator loader report it
    return isinstance(obj, torch.Tensor) or (isinstance(obj, Mapping) and {"comp", "std"} <= set(obj))


def _default_model_path() -> Optional[pathlib.Path]:
    try:
        from core.demo import default_model_path
    except ImportError:
        return None
    try:
        path = pathlib.Path(default_model_path())
    except (LatentEditError, OSError):
        return None
    return path if path.is_file() else None


class ModelRegistry:
    """Named generators: the embedded default (``core.demo.default_model_path()``, when present) and every
    ``*.pt``/``*.pth``/``*.pkl`` generator checkpoint in ``models_dir`` (direction files are skipped).

    ``sefa_k`` SeFa directions (``sefa_0``…) are added to each model's directions (file directions win on a
    name clash); 0 disables them. Loading happens on first use and is cached.
    """

    def __init__(self, models_dir=None, device="cpu", include_default: bool = True, sefa_k: int = SEFA_K,
                 default_path=None):
        self.device = torch.device(device)
        self.sefa_k = int(sefa_k)
        self._paths: dict = {}  # name -> (path, is_default)
        self._loaded: dict = {}
        self._errors: dict = {}
        self._lock = threading.RLock()
        if include_default:
            path = pathlib.Path(default_path) if default_path is not None else _default_model_path()
            if path is not None and path.is_file():
                self.add(path, default=True)
        if models_dir is not None:
            folder = pathlib.Path(models_dir)
            if not folder.is_dir():
                raise InvalidInput(f"models folder not found: {folder}")
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES and not _is_direction_file(path):
                    self.add(path)

    def add(self, path, name: Optional[str] = None, default: bool = False) -> str:
        """Register a checkpoint under ``name`` (default: the file stem, made unique); returns the name."""
        path = pathlib.Path(path)
        base = name or path.stem
        name, i = base, 2
        with self._lock:
            while name in self._paths:
                if self._paths[name][0].resolve() == path.resolve():
                    return name
                name, i = f"{base}_{i}", i + 1
            self._paths[name] = (path, default)
        return name

    def names(self) -> list:
        """Registered model names (the default first), loaded or not."""
        return list(self._paths)

    @property
    def errors(self) -> dict:
        """``{name: message}`` for checkpoints that failed to load (they are left out of :meth:`list`)."""
        return dict(self._errors)

    def get(self, name: Optional[str] = None) -> LoadedModel:
        """The loaded model ``name`` (None: the default, else the first). Unknown name: :class:`UnknownModel`
        listing the known ones; a file that does not load: its loader's error (a ``LatentEditError``)."""
        with self._lock:
            if name is None:
                defaults = [n for n, (_, d) in self._paths.items() if d] or list(self._paths)
                if not defaults:
                    raise UnknownModel("no models available: no embedded default and no checkpoints in the models folder")
                name = defaults[0]
            if name not in self._paths:
                known = ", ".join(self._paths) or "none"
                raise UnknownModel(f"unknown model {name!r}; known models: {known}")
            if name not in self._loaded:
                path, is_default = self._paths[name]
                try:
                    self._loaded[name] = self._load(name, path, is_default)
                except LatentEditError as exc:
                    self._errors[name] = str(exc)
                    raise
                self._errors.pop(name, None)
            return self._loaded[name]

    def list(self) -> list:
        """One JSON-able dict per loadable model (name, file, default, resolution, num_ws, w_dim, z_dim,
        style_layers, spaces, directions [{name, space, layers, default_strength, range, description, source}],
        methods [{name, label, project_steps, tune_steps, options}] from core.session.method_catalog)."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name).info())
            except LatentEditError:
                continue  # recorded in self.errors
        return out

    def _load(self, name: str, path: pathlib.Path, is_default: bool) -> LoadedModel:
        from core.stylegan2.formats import load_generator

        G = load_generator(path, device=self.device)
        G.eval().requires_grad_(False)
        directions: dict = {}
        error = None
        if self.sefa_k > 0:
            directions.update(sefa(G, k=self.sefa_k))
        manifest = manifest_path_for(path)
        if manifest.is_file():
            try:
                directions.update(load_directions(manifest, G=G))
            except LatentEditError as exc:
                error = f"{manifest.name}: {exc}"
        # files first (they have names and meanings), then the computed ones
        ordered = {k: v for k, v in directions.items() if v.source != "sefa"}
        ordered.update({k: v for k, v in directions.items() if v.source == "sefa" and k not in ordered})
        return LoadedModel(name, path, G, ordered, default=is_default, directions_error=error)

    def directions(self, name: Optional[str] = None) -> dict:
        """``{direction name: Direction}`` of model ``name``."""
        return self.get(name).directions

    def __contains__(self, name) -> bool:
        return name in self._paths
