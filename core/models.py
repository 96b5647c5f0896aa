"""The models a server offers: the embedded default plus the generator checkpoints found in a models folder,
each with its directions (a ``<stem>.directions.json`` manifest beside it, plus SeFa eigenvectors computed
from the generator so that any checkpoint offers edits).

``ModelRegistry.list()`` is the data ``GET /v1/models`` returns (plain JSON-able types);
``ModelRegistry.get(name)`` loads a model once (lazily, thread-safe) and caches it.

Methods beyond a generator (core.session.CAPABILITIES) need files beside the checkpoint:

* "magec": an attribute descriptor — the shipped scorer for the embedded model, ``<stem>.attributes.pt`` +
  ``<stem>.attributes.json`` otherwise (core.magec.load_descriptor).  Its LinkNet is fitted once and cached
  as ``<stem>.linknet.pt`` beside the checkpoint (core.magec.fit_linknet); where that folder is not writable
  (an installed read-only copy) the fit is cached in ``cache_dir`` when the registry has one, else kept in
  memory for the life of the process.
* "encoder": an e4e/pSp encoder for it — ``core.demo.default_encoder_path()`` for the embedded model,
  ``<stem>.encoder.pt`` otherwise, or the checkpoint itself when it is an e4e/pSp file (its ``encoder.*``).
* "segmenter": automatic segments (core.segmenter.find_segmenter) — the shipped head for the embedded model,
  ``<stem>.segmenter.pt`` or ``<stem>.faceparsing.pth`` otherwise.

A model without one lists neither the method nor the PTI pivot in ``methods``, and asking for it raises
InvalidInput naming the file to add.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
from typing import Mapping, Optional

import torch

from core.common import InvalidInput, LatentEditError
from core.edits import Direction, load_directions, manifest_path_for, sefa

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl")
SEFA_K = 5  # SeFa (Shen & Zhou 2021) shows the top-5 eigenvectors per layer group; offered when a model has no files
SPACES = ["w", "w+", "s"]  # every StyleGAN2 supports W, W+ and StyleSpace edits
ENCODER_SUFFIX = ".encoder.pt"  # an e4e/pSp encoder for ``<stem>.pt`` lives in ``<stem>.encoder.pt``


def encoder_path_for(checkpoint) -> pathlib.Path:
    """``ffhq.pkl`` -> ``ffhq.encoder.pt`` beside it."""
    p = pathlib.Path(checkpoint)
    return p.with_name(p.stem + ENCODER_SUFFIX)


def _holds_encoder(path: pathlib.Path) -> bool:
    """True for an e4e/pSp checkpoint file (``state_dict`` with ``encoder.*`` tensors), read safely."""
    try:
        from core.encoder import read_checkpoint

        sd = read_checkpoint(path)["state_dict"]
    except Exception:  # noqa: BLE001 - not an e4e/pSp file
        return False
    return any(str(k).startswith("encoder.") for k in sd)


def find_encoder(checkpoint, default: bool = False) -> tuple[Optional[pathlib.Path], str]:
    """(the encoder file for a checkpoint or None, why there is none); ``default``: the checkpoint is the
    embedded model."""
    checkpoint = pathlib.Path(checkpoint)
    if default:
        from core.demo import default_encoder_path

        path = pathlib.Path(default_encoder_path())
        return (path, "") if path.is_file() else (None, f"the embedded model's encoder {path.name} is not installed")
    own = encoder_path_for(checkpoint)
    if own.is_file():
        return own, ""
    if _holds_encoder(checkpoint):
        return checkpoint, ""
    return None, (f"add an e4e/pSp encoder trained for {checkpoint.name} as {own.name} beside it "
                  "(an official e4e/pSp .pt file works)")


def content_path_for(checkpoint, default: bool = False) -> pathlib.Path:
    """Where a checkpoint's learned content extractor lives (core.expanded, "Keep photo detail" in one forward):
    ``<stem>.content.pt`` beside it, or ``core/demo/weights/face64.content.pt`` for the embedded model."""
    from core.expanded import CONTENT_SUFFIX

    if default:
        from core.demo import WEIGHTS_DIR

        return WEIGHTS_DIR / ("face64" + CONTENT_SUFFIX)
    p = pathlib.Path(checkpoint)
    return p.with_name(p.stem + CONTENT_SUFFIX)


def find_descriptor(checkpoint, default: bool = False) -> str:
    """'' when MAGEC has a descriptor for the checkpoint, else what to add (core.magec.load_descriptor);
    ``default``: the checkpoint is the embedded model (its scorer is the descriptor)."""
    if default:
        return ""
    from core.magec import descriptor_paths

    pt, js = descriptor_paths(checkpoint)
    if pt.is_file() and js.is_file():
        return ""
    return (f"add an attribute classifier for {pathlib.Path(checkpoint).name}: {pt.name} (TorchScript, "
            f"(N,3,H,W) in [-1,1] -> (N,K)) and {js.name} (its attribute names) beside it")


def linknet_cache_path(checkpoint, cache_dir=None) -> Optional[pathlib.Path]:
    """Where the LinkNet fit of a checkpoint is cached: beside it when that folder is writable, else in
    ``cache_dir`` (None: nowhere, the fit stays in memory)."""
    from core.magec import linknet_path_for

    own = linknet_path_for(checkpoint)
    if (own.is_file() and os.access(own, os.W_OK)) or (not own.exists() and os.access(own.parent, os.W_OK)):
        return own
    if own.is_file() and cache_dir is None:
        return own  # read-only but present (e.g. shipped): read it; a stale one is refitted in memory
    return None if cache_dir is None else pathlib.Path(cache_dir) / own.name


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
    missing: dict = dataclasses.field(default_factory=dict)  # {capability: what to add} (see the module doc)
    encoder_path: Optional[pathlib.Path] = None
    segmenter_path: Optional[pathlib.Path] = None  # core.segmenter.find_segmenter
    content_path: Optional[pathlib.Path] = None  # core.expanded's learned content extractor (content_path_for)
    cache_dir: Optional[pathlib.Path] = None
    _assets: dict = dataclasses.field(default_factory=dict, repr=False)
    _lock: object = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def capabilities(self) -> list:
        """The core.session.CAPABILITIES this model has ("magec", "encoder")."""
        from core.session import CAPABILITIES

        return [c for c in CAPABILITIES if c not in self.missing]

    def method_assets(self, needs=("magec", "encoder")):
        """core.session.MethodAssets with what ``needs`` asks for, loaded once (the LinkNet fitted or read
        from its cache); an unavailable capability stays None with its reason in ``missing``; a file that
        exists but does not load raises its InvalidInput."""
        from core.session import MethodAssets

        from core.segmenter import FACE_PARSING_SUFFIX

        parser = self.segmenter_path is not None and self.segmenter_path.name.endswith(FACE_PARSING_SUFFIX)
        if "segmenter" in needs and "encoder" not in needs and "encoder" not in self.missing and not parser:
            needs = (*needs, "encoder")  # a part head starts its segment code from the encoder's (a face parser:
            #                              static masks from pixels, no code)
        with self._lock:
            for need in needs:
                if need in self._assets or need in self.missing:
                    continue
                if need == "magec":
                    from core.magec import fit_linknet, load_descriptor

                    descriptor = load_descriptor(self.path)
                    cache = linknet_cache_path(self.path, self.cache_dir)
                    if cache is not None and cache.parent != self.path.parent:
                        cache.parent.mkdir(parents=True, exist_ok=True)
                    self._assets["magec"] = (descriptor, fit_linknet(self.generator, descriptor, cache_path=cache))
                elif need == "encoder":
                    from core.encoder import check_compatible, load_encoder

                    E = load_encoder(self.encoder_path, device=self.generator.w_avg.device)
                    check_compatible(E, self.generator)
                    self._assets["encoder"] = E
                elif need == "segmenter":
                    from core.segmenter import load_segmenter

                    seg = load_segmenter(self.segmenter_path)
                    seg.check_generator(self.generator)
                    self._assets["segmenter"] = seg.to(self.generator.w_avg.device)
                elif need == "content" and self.content_path is not None:
                    from core.expanded import load_content_extractor

                    self._assets["content"] = load_content_extractor(self.content_path, self.generator)
            descriptor, linknet = self._assets.get("magec", (None, None))
            return MethodAssets(descriptor, linknet, self._assets.get("encoder"),
                                {k: v for k, v in self.missing.items() if k in needs}, self._assets.get("segmenter"),
                                self._assets.get("content"))

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
            "methods": _methods(self.capabilities),
        }
        if self.directions_error:
            out["directions_error"] = self.directions_error
        if self.missing:
            out["unavailable"] = dict(self.missing)  # {capability: what to add}
        return out


def _methods(capabilities) -> list:
    """The inversion methods a model with ``capabilities`` supports (core.session.method_catalog)."""
    from core.session import method_catalog

    return method_catalog(capabilities)


def _is_sidecar(path: pathlib.Path) -> bool:
    """True for the files that belong to a checkpoint beside them (encoder, descriptor, LinkNet fit, segmenter,
    content extractor)."""
    from core.expanded import CONTENT_SUFFIX
    from core.magec import DESCRIPTOR_SUFFIX, LINKNET_SUFFIX
    from core.segmenter import SIDECAR_SUFFIXES

    return path.name.lower().endswith((ENCODER_SUFFIX, DESCRIPTOR_SUFFIX, LINKNET_SUFFIX, CONTENT_SUFFIX,
                                       *SIDECAR_SUFFIXES))


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
    ``*.pt``/``*.pth``/``*.pkl`` generator checkpoint in ``models_dir`` (direction files and a checkpoint's
    ``.encoder.pt`` / ``.attributes.pt`` / ``.linknet.pt`` are skipped).  ``cache_dir``: where LinkNet fits of
    checkpoints in read-only folders are cached (None: in memory).

    ``sefa_k`` SeFa directions (``sefa_0``…) are added to each model's directions (file directions win on a
    name clash); 0 disables them. Loading happens on first use and is cached.
    """

    def __init__(self, models_dir=None, device="cpu", include_default: bool = True, sefa_k: int = SEFA_K,
                 default_path=None, cache_dir=None):
        self.device = torch.device(device)
        self.cache_dir = None if cache_dir is None else pathlib.Path(cache_dir)  # LinkNet fits of read-only models
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
                if (path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES and not _is_sidecar(path)
                        and not _is_direction_file(path)):
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
        missing = {}
        shipped = _default_model_path()
        embedded = shipped is not None and path.resolve() == shipped.resolve()
        why = find_descriptor(path, default=embedded)
        if why:
            missing["magec"] = why
        encoder, why = find_encoder(path, default=embedded)
        if encoder is None:
            missing["encoder"] = why
        from core.segmenter import find_segmenter

        segmenter, why = find_segmenter(path, default=embedded)
        if segmenter is None:
            missing["segmenter"] = why
        content = content_path_for(path, default=embedded)
        return LoadedModel(name, path, G, ordered, default=is_default, directions_error=error, missing=missing,
                           encoder_path=encoder, segmenter_path=segmenter,
                           content_path=content if content.is_file() else None, cache_dir=self.cache_dir)

    def directions(self, name: Optional[str] = None) -> dict:
        """``{direction name: Direction}`` of model ``name``."""
        return self.get(name).directions

    def __contains__(self, name) -> bool:
        return name in self._paths
