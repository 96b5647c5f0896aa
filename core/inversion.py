"""The inversion state every method returns, and how a generator-resolution render is made from it.

An :class:`Inversion` is what "w", "wplus", "pti" and "chunks" all produce at the generator's resolution ``r``:
``n`` codes ``ws`` ``(n,num_ws,w_dim)`` (one per segment; the global methods have one segment, the selection),
segment weights ``masks`` ``(n,1,r,r)`` summing to 1 on the selection, the soft selection ``coverage``
``(1,1,r,r)``, the image that was inverted ``image`` ``(1,3,r,r)`` in [-1,1] and the generator that reproduces
it: ``G`` (a tuned copy after PTI, whose difference from ``base_G`` is saved as a delta) or ``base_G`` itself.

Its render is ``Σ_i G(X_i)·S_i`` on the selection and the input elsewhere (ChunkyGAN Eq. 2 with the static
region taken from the input); the unedited renders are cached, so a re-edit costs one batched forward of the
edited segments' codes.  It never changes once made: hole filling builds a new one.  Compositing into a
layer (feathered alpha, Poisson, geometry) lives in ``core.compositing``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping, Optional, Sequence

import torch

from core.common import InvalidInput
from core.edits.directions import edit_inputs


@dataclasses.dataclass(eq=False)
class Inversion:
    """Inversion state at generator resolution (see the module docstring for the shapes)."""

    method: str  # "w" | "wplus" | "pti" | "chunks"
    image: torch.Tensor  # (1,3,r,r) in [-1,1]: what was inverted
    ws: torch.Tensor  # (n,num_ws,w_dim)
    masks: torch.Tensor  # (n,1,r,r) segment weights, summing to 1 where anything is selected
    coverage: torch.Tensor  # (1,1,r,r) the soft selection in [0,1]
    G: object  # the generator that reproduces ``image`` (tuned copy, or base_G)
    base_G: object  # the model's generator (never modified)
    noise_mode: str = "const"  # PTI synthesis noise_mode='const'
    info: dict = dataclasses.field(default_factory=dict)  # method metadata (steps, space, losses, seconds...)
    # S-space codes (ChunkyGAN in StyleSpace): per-segment style offsets {style layer: (n, C_in)} added to the
    # styles of ``ws`` (None: the codes are ``ws`` alone)
    styles: Optional[dict] = None
    # ChunkyGAN's segment generator, when the masks came from one: X^S (1,num_ws,w_dim) -> (n,1,r,r) weights on
    # the support summing to 1, with X^S in info["mask_code"] (not saved: a loaded session's masks are static)
    mask_generator: Optional[object] = dataclasses.field(default=None, repr=False)
    _rec: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)
    _rec_mixed: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        self.ws = self.ws.detach()
        if self.ws.shape[0] != self.masks.shape[0]:
            raise InvalidInput(f"{self.ws.shape[0]} codes for {self.masks.shape[0]} segment masks")

    @property
    def tuned(self) -> bool:
        """True when ``G`` is a tuned copy (PTI) rather than the base generator."""
        return self.G is not self.base_G

    @property
    def segments(self) -> int:
        return int(self.ws.shape[0])

    @property
    def support(self) -> torch.Tensor:
        """(1,1,r,r) bool: pixels belonging to some segment."""
        return self.masks.sum(0, keepdim=True) > 0

    @torch.no_grad()
    def synthesize(self, ws: torch.Tensor, style_deltas: Optional[dict] = None,
                   rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One batched generator forward: ws (k,num_ws,w_dim) -> (k,3,r,r); ``rows`` (k segment indices, all
        when None) pick the segments' own S-space codes when the inversion has them."""
        if self.styles:
            own = {k: v if rows is None else v[list(rows)] for k, v in self.styles.items()}
            for k, v in (style_deltas or {}).items():
                own[k] = own[k] + v if k in own else v
            style_deltas = own
        if style_deltas:
            return self.G.synthesis(ws, noise_mode=self.noise_mode, style_deltas=style_deltas)
        return self.G.synthesis(ws, noise_mode=self.noise_mode)

    def reconstructions(self) -> torch.Tensor:
        """Cached unedited renders G(X_i), (n,3,r,r)."""
        if self._rec is None:
            self._rec = self.synthesize(self.ws)
        return self._rec

    def segment_indices(self, segments: Optional[Sequence[int]]) -> list[int]:
        """Validated, sorted segment indices (all when None)."""
        n = self.segments
        if segments is None:
            return list(range(n))
        idx = sorted({int(s) for s in segments})
        if any(i < 0 or i >= n for i in idx):
            raise InvalidInput(f"segment indices {idx} out of range for {n} segment(s)")
        return idx

    def edited_codes(self, edits=None, directions: Optional[Mapping] = None,
                     segments: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Codes with the W-space ``edits`` applied to ``segments`` (all by default), (n,num_ws,w_dim).
        Raises InvalidInput for StyleSpace edits (they are synthesis inputs, not codes)."""
        idx = self.segment_indices(segments)
        if not edits or not idx:
            return self.ws
        ws = self.ws.clone()
        for group, group_edits in self.edit_groups(edits, idx):
            ws[group], deltas = edit_inputs(self.ws[group], group_edits, self.G, directions)
            if deltas:
                raise InvalidInput("StyleSpace (S) edits cannot be baked into latent codes; use W-space edits here")
        return ws

    def edit_groups(self, edits, idx: Sequence[int]) -> list[tuple[list[int], list]]:
        """``[(segment indices, their edits), ...]`` for ``edits`` restricted to the segments ``idx``: an edit
        given as a mapping may carry ``"segments": [i, ...]`` (absent / None = every segment); segments with
        the same edits share one group (one batched forward); groups without edits are left out."""
        n = self.segments
        chosen = []
        for k, item in enumerate(edits):
            segs = item.get("segments") if isinstance(item, Mapping) else None
            if segs is not None:
                if isinstance(segs, (str, bytes)) or not isinstance(segs, Sequence) or not all(
                        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in segs):
                    raise InvalidInput(f"edit {k}: segments must be a list of segment indices; got {segs!r}")
                bad = [int(v) for v in segs if not 0 <= v < n]
                if bad:
                    raise InvalidInput(f"edit {k}: segment indices {bad} out of range for {n} segment(s)")
                segs = {int(v) for v in segs}
            chosen.append(segs)
        groups: dict = {}
        for i in idx:
            key = tuple(k for k, segs in enumerate(chosen) if segs is None or i in segs)
            if key:
                groups.setdefault(key, []).append(i)
        plain = [(e.get("direction"), e.get("strength"), e.get("layers")) if isinstance(e, Mapping) else e
                 for e in edits]  # the edit itself, without its segments
        return [(group, [plain[k] for k in key]) for key, group in groups.items()]

    def generated(self, edits=None, directions: Optional[Mapping] = None,
                  segments: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``Σ_i G(X_i)·S_i`` on the selection, the input image elsewhere; (1,3,r,r).

        ``edits`` [(direction, strength[, layers]) | {direction, strength, layers?, segments?}, ...] (names
        resolved in ``directions``) apply to ``segments`` (all by default) — a mapping's ``"segments"`` narrows
        that edit further (:meth:`edit_groups`); only the edited codes are synthesised (one batched forward
        per distinct set of edits).
        """
        rec = self.reconstructions()
        idx = self.segment_indices(segments)
        if not edits or not idx:
            if self._rec_mixed is None:
                self._rec_mixed = torch.where(self.support, (rec * self.masks).sum(0, keepdim=True), self.image)
            return self._rec_mixed
        outs = rec.clone()
        for group, group_edits in self.edit_groups(edits, idx):
            ws_e, deltas = edit_inputs(self.ws[group], group_edits, self.G, directions)
            outs[group] = self.synthesize(ws_e, deltas, rows=group)
        masks = self.edited_masks(edits, directions) if len(idx) == self.segments else self.masks
        return torch.where(self.support, (outs * masks).sum(0, keepdim=True), self.image)

    @torch.no_grad()
    def edited_masks(self, edits=None, directions: Optional[Mapping] = None) -> torch.Tensor:
        """The segment weights after ``edits`` (n,1,r,r): ChunkyGAN §4.2 applies a global edit to the segment code
        too, ``S = G^S(X^S + d)``, so e.g. a head turn moves the masks with the face.  Unchanged without a segment
        generator, for edits narrowed to some segments, and for StyleSpace edits (no X^S counterpart)."""
        code = self.info.get("mask_code")
        if not edits or self.mask_generator is None or code is None:
            return self.masks
        if any(isinstance(e, Mapping) and e.get("segments") is not None for e in edits):
            return self.masks
        code_e, deltas = edit_inputs(code, edits, self.base_G, directions)
        if deltas:
            return self.masks
        return self.mask_generator(code_e).to(self.masks)

    def replace(self, **changes) -> "Inversion":
        """A new inversion with ``changes`` (caches dropped); this one is unchanged."""
        changes.setdefault("_rec", None)
        changes.setdefault("_rec_mixed", None)
        return dataclasses.replace(self, **changes)

    # ---- persistence: plain tensors (the tuned generator is saved by the caller as a delta) ----
    def state_dict(self) -> dict:
        out = {"image": self.image, "masks": self.masks, "coverage": self.coverage, "ws": self.ws}
        out.update({f"style{k}": v for k, v in (self.styles or {}).items()})
        return out

    @classmethod
    def from_state(cls, method: str, G, state: Mapping, base_G=None, noise_mode: str = "const",
                   info: Optional[dict] = None) -> "Inversion":
        styles = {int(k[5:]): v for k, v in state.items() if k.startswith("style")} or None
        return cls(method, state["image"], state["ws"], state["masks"], state["coverage"], G,
                   G if base_G is None else base_G, noise_mode, dict(info or {}), styles=styles)
