"""The server's only view of the engine: a model registry plus ``core.session``'s three entry points.

:class:`Engine` is deliberately thin; tests build it from an in-test fake registry and session API that
honour the same contract (docs/architecture.md, "core.session" and "core.models").

Progress contract (engine -> jobs): :meth:`Engine.create` passes the job's ``on_progress`` straight to
``core.session.create_session``, which calls ``on_progress(event)`` with a ``core.common.ProgressEvent``
(``stage``, ``step``, ``total``, ``fraction`` of the whole session in [0,1], ``message`` in user words,
``loss``, ``preview`` ``(h,w,3)`` uint8 or None) — nothing is translated here.  ``on_progress`` may raise
``core.common.Cancelled`` to stop the work between steps.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from typing import Any, Callable, Optional

log = logging.getLogger("server.engine")


class Engine:
    """``registry``: has ``list()`` and ``get(name) -> LoadedModel(generator, directions)``.
    ``session_api``: has ``create_session``, ``EditSession`` (with ``.load``) and ``SessionOptions``.
    ``backbone``: callable returning a short description of the active perceptual backbone.
    """

    def __init__(self, registry, session_api, device: str = "cpu", backbone: Optional[Callable[[], str]] = None):
        self.registry, self.api, self.device = registry, session_api, device
        self._backbone_fn = backbone
        self._backbone: Optional[str] = None
        self._lock = threading.Lock()  # registry.get may load weights: once, from any thread
        self._models_cache: Optional[list] = None

    @classmethod
    def from_core(cls, models_dir, device: str = "cpu") -> "Engine":
        """The real engine: ``core.models.ModelRegistry`` + ``core.session``."""
        from core import session as session_api
        from core.models import ModelRegistry

        def backbone() -> str:
            from core.losses import perceptual_loss
            return str(getattr(perceptual_loss("vgg", device=device), "backbone", "unknown"))

        return cls(ModelRegistry(models_dir, device), session_api, device, backbone)

    # --- description -----------------------------------------------------------------------------
    def models(self) -> list:
        """JSON-able model list as the registry gives it (name, resolution, directions, presets...)."""
        if self._models_cache is None:
            self._models_cache = list(self.registry.list())
        return self._models_cache

    def model_errors(self) -> dict:
        """``{name: message}`` for checkpoints in the models folder that failed to load."""
        return dict(getattr(self.registry, "errors", {}) or {})

    def model_names(self) -> list:
        return [str(m["name"]) for m in self.models()]

    def default_model(self) -> Optional[str]:
        models = self.models()
        for m in models:
            if m.get("default"):
                return str(m["name"])
        return str(models[0]["name"]) if models else None

    def direction_names(self, model: str) -> set:
        for m in self.models():
            if m["name"] == model:
                dirs = m.get("directions") or []
                if isinstance(dirs, dict):
                    return set(dirs)
                return {d["name"] if isinstance(d, dict) else str(d) for d in dirs}
        return set()

    def num_ws(self, model: str) -> Optional[int]:
        for m in self.models():
            if m["name"] == model and isinstance(m.get("num_ws"), int):
                return m["num_ws"]
        return None

    def _listed_methods(self, model: str) -> tuple[dict, dict]:
        """``({method name: its listing}, {method or pivot: why unavailable})`` for ``model`` (core.models);
        both empty when the model or its methods are not listed."""
        info = next((m for m in self.models() if m["name"] == model), None) or {}
        methods = {str(x.get("name")): x for x in info.get("methods") or [] if isinstance(x, dict)}
        return methods, info.get("unavailable") or {}

    def default_pivot(self, model: str) -> str:
        """The pivot a PTI request for ``model`` without one gets: its listed ``default_pivot``
        (core.session.default_pivot: the encoder's code where the model has an encoder), else PTI's "w"."""
        return str(self._listed_methods(model)[0].get("pti", {}).get("default_pivot") or "w")

    def method_refusal(self, model: str, options: dict) -> Optional[str]:
        """Why ``model`` cannot run ``options``' method (or PTI pivot), from its listed ``methods`` and
        ``unavailable`` reasons (core.models); None when it can (or the registry lists no methods)."""
        methods, reasons = self._listed_methods(model)
        if not methods:
            return None
        method, pivot = options.get("method", "pti"), options.get("pivot", "w")
        if method not in methods:
            why = reasons.get(method)
            return f"model {model!r} does not offer method {method!r}" + (f": {why}" if why else "")
        pivots = methods[method].get("pivots")
        if pivots is not None and pivot not in {p.get("name") for p in pivots}:
            why = reasons.get(pivot)
            return f"model {model!r} cannot start PTI from pivot {pivot!r}" + (f": {why}" if why else "")
        return None

    def segments_refusal(self, model: str, options: dict) -> Optional[str]:
        """Why ``model`` cannot take ``options.segments: "auto"`` (no segmenter: its ``unavailable`` reason,
        naming what to add); None when it can or the options ask for another segment source."""
        if options.get("segments") != "auto":
            return None
        from server.protocol import SEGMENTER, model_listing

        info = next((m for m in model_listing(self.models()) if m["name"] == model), None)
        if info is None or info["segmenter"]:
            return None
        why = (info.get("unavailable") or {}).get(SEGMENTER)
        return (f"model {model!r} has no segmenter for automatic segments" + (f": {why}" if why else "") +
                "; use the selection or a label map (options.segments)")

    def backbone(self) -> str:
        """The active perceptual backbone, ``"loading"`` until :meth:`warm_up` has run."""
        if self._backbone_fn is None:
            return "none"
        return self._backbone or "loading"

    def warm_up(self, model: Optional[str]) -> None:
        """Load the default model and the perceptual backbone (called on the worker thread)."""
        if model:
            self.loaded(model)
        if self._backbone_fn is not None and self._backbone is None:
            try:
                self._backbone = self._backbone_fn()
            except Exception as exc:  # reported in health, never fatal
                log.warning("perceptual backbone unavailable: %s", exc)
                self._backbone = f"unavailable ({exc.__class__.__name__})"

    # --- work ------------------------------------------------------------------------------------
    def loaded(self, model: str):
        with self._lock:
            return self.registry.get(model)

    def options(self, fields: dict):
        """SessionOptions from validated wire fields (unknown names are a server bug, not a client one)."""
        cls = self.api.SessionOptions
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(fields)
        return cls(**{k: v for k, v in fields.items() if k in names})

    def create(self, model: str, image, selection, options: dict, progress, cancel) -> Any:
        """A new session; ``progress(event: ProgressEvent)`` (see the module docstring), ``cancel`` an Event."""
        lm = self.loaded(model)
        opts = self.options(options)
        kwargs = {}
        needs = set(opts.needs()) if hasattr(opts, "needs") else set()
        if hasattr(lm, "method_assets"):  # MAGEC's descriptor + LinkNet, the encoder, ... (loaded once); the
            kwargs["assets"] = lm.method_assets(tuple(sorted(needs | {"content"})))  # content extractor if any
        return self.api.create_session(lm.generator, image, selection, options=opts, progress=progress,
                                       cancel=cancel, directions=lm.directions, **kwargs)

    def load(self, directory, model: str) -> Any:
        lm = self.loaded(model)
        load = self.api.EditSession.load
        kwargs = {}
        try:
            if "directions" in inspect.signature(load).parameters:
                kwargs["directions"] = lm.directions
        except (TypeError, ValueError):
            pass
        session = load(directory, lm.generator, **kwargs)
        if hasattr(lm, "method_assets") and hasattr(session, "content_extractor"):
            session.content_extractor = lm.method_assets(("content",)).content
        return session


def render_session(session, req) -> tuple:
    """``(rgba (H,W,4) float32, metadata)`` for a :class:`server.protocol.RenderRequest`: edits with
    ``segments`` go to core as mappings ``{direction, strength, layers?, segments}`` (core.inversion
    ``Inversion.edit_groups``); ``fusion`` is passed when given; ``metadata`` = ``{"segments":
    session.segment_info()}`` ([{index, area[, label]}], small: a remote session sends it, not the masks) when
    the session has segments."""
    from server.errors import ProtocolError, invalid

    info = session.segment_info() if hasattr(session, "segment_info") else None
    n = None if info is None else len(info)
    edits = []
    for i, (edit, seg) in enumerate(zip(req.edits, req.segments or [None] * len(req.edits))):
        if seg is None:
            edits.append(edit)
            continue
        if n is None:
            raise invalid(f"edits[{i}].segments", "this session has no segments (its engine predates them)")
        if max(seg) >= n:
            raise invalid(f"edits[{i}].segments", f"segment {max(seg)} does not exist: the session has {n} "
                                                  f"segment{'s' if n != 1 else ''} (0..{n - 1})")
        edits.append(dict({"direction": edit[0], "strength": edit[1], "segments": list(seg)},
                          **({"layers": edit[2]} if len(edit) > 2 else {})))
    kwargs = {} if req.color_match is None else {"color_match": req.color_match}
    if req.fusion is not None:
        try:
            takes = "fusion" in inspect.signature(session.render).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            kwargs["fusion"] = req.fusion
        elif req.fusion != "none":  # "none" is what an engine without fusion renders anyway
            raise ProtocolError(422, "unknown_field", "fusion: is not supported by this server's engine", "fusion")
    out = session.render(edits=edits, feather=req.feather, blend=req.blend, **kwargs)
    return out, ({"segments": info} if info is not None else {})
