#!/usr/bin/env python3
"""Latent Edit for GIMP 3: Filters ▸ Latent Edit…

Sends the active layer (or every selected layer, with "batch") and the selection to the local Latent Edit
server, follows the inversion job with GIMP's progress bar, renders the chosen edits and inserts each result
as a new layer with a layer mask, inside a layer group named after the edit, above the source's earlier
results, all in one undo group.  The source layer is never modified.  The shared flow (``common/flow.py``)
checks the edit names before any upload and remembers each layer's server session in GIMP's profile
folder, so editing the same layer again only re-renders.

Non-interactive use (scripts, batch mode) passes every option as a procedure argument; see
the README (GIMP section).  Standard library + GIMP's GObject introspection only: the protocol code is the shared
``common`` package that the installer copies next to this file.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gi  # noqa: E402

gi.require_version("Gimp", "3.0")
from gi.repository import GLib, GObject, Gimp  # noqa: E402

import gimp_document as doc  # noqa: E402
from common import client as le_client  # noqa: E402
from common import flow as le_flow  # noqa: E402
from common import paths as le_paths  # noqa: E402
from common import pixels as le_pixels  # noqa: E402

PROC = "python-fu-latent-edit"
# GIMP registers a procedure's arguments before any server is reachable, so the choice lists its method
# names from the flow's static list (every method and PTI pivot); the server's own list for the chosen model is
# checked before any work (a model without MAGEC or an encoder is refused, naming the methods it offers).
METHODS = [(m["name"], m["label"]) for m in le_flow.STATIC_METHODS]
ALIGN = [("auto", "Find and align the face"), ("none", "Layer is already an aligned crop")]
SEGMENTS = list(le_flow.SEGMENT_CHOICES)  # GIMP's "From layer" takes the layer from the "Label layer" option
SEGMENT_HELP = {"auto": "Only models with a segmenter (others are refused, saying what to add)",
                "layer": "Paint each segment in its own flat colour on a layer; transparent parts stay unchanged"}
EDIT_SLOTS = 3
SESSIONS_FILE = "latent-edit-sessions.json"  # in GIMP's profile folder: layer content -> server session


def _choice(items, help=None):
    choice = Gimp.Choice.new()
    for i, (nick, label) in enumerate(items):
        choice.add(nick, i, label, (help or {}).get(nick, ""))
    return choice


def _offer_automatic(procedure, config):
    """Interactive only: grey out "Automatic" when the chosen model has no segmenter (asked of the server; a
    server that cannot be reached leaves it, and the run then reports the problem)."""
    try:
        client = le_client.Client(config.get_property("server-url") or le_client.DEFAULT_URL, timeout=3.0,
                                  token_file=config.get_property("token-file") or le_paths.default_token_file())
        model = le_flow.fetch_catalog(client).model(config.get_property("model") or None)
    except (le_client.ClientError, le_flow.FlowError, OSError):
        return
    choice = Gimp.param_spec_choice_get_choice(procedure.find_argument("segments"))
    choice.set_sensitive("auto", le_flow.has_segmenter(model))


def _error(procedure, message):
    return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(message))


def _edits_from_config(config):
    """[(name, strength)] from the three edit slots and the free-form 'edits' string."""
    edits = []
    for i in range(1, EDIT_SLOTS + 1):
        name = (config.get_property("edit-%d" % i) or "").strip()
        strength = config.get_property("strength-%d" % i)
        if name and strength:
            edits.append((name, float(strength)))
    edits += le_flow.parse_edits(config.get_property("edits") or "")
    return edits


def _label_map(label, layer, px):
    """The protocol label map of ``label`` over ``layer`` (flow.label_map: each flat colour one segment)."""
    name, rgba8 = doc.read_label_layer(label, layer)
    return le_flow.label_map(rgba8, px.width, px.height, name).wire


class _Progress:
    """GIMP's progress bar fed from job polls; Ctrl-C / SIGTERM ask the server to cancel."""

    def __init__(self):
        self.stop = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, *_):
        self.stop = True

    def __call__(self, progress):
        Gimp.progress_set_text("Latent Edit: %s" % progress.message)
        Gimp.progress_update(min(max(progress.fraction, 0.0), 1.0))


def run(procedure, run_mode, image, drawables, config, data):
    try:
        return _run(procedure, run_mode, image, drawables, config)
    except (doc.DocumentError, le_client.ClientError, le_pixels.PixelError, le_flow.FlowError) as exc:
        if run_mode == Gimp.RunMode.INTERACTIVE:
            Gimp.message("Latent Edit: %s" % exc)
        return _error(procedure, str(exc))


def _run(procedure, run_mode, image, drawables, config):
    if run_mode == Gimp.RunMode.INTERACTIVE:
        gi.require_version("GimpUi", "3.0")
        from gi.repository import GimpUi

        GimpUi.init(PROC)
        _offer_automatic(procedure, config)
        dialog = GimpUi.ProcedureDialog.new(procedure, config, "Latent Edit")
        dialog.fill(None)
        ok = dialog.run()
        dialog.destroy()
        if not ok:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, None)

    layers = list(drawables or [])
    if not layers:
        raise doc.DocumentError("No layer is active. Click the layer to edit in the Layers dialog.")
    if not config.get_property("batch"):
        layers = layers[:1]
    edits = _edits_from_config(config)
    if not edits:
        raise le_flow.FlowError("Choose at least one edit with a non-zero strength (for example smile, 1.5).")

    client = le_client.Client(config.get_property("server-url") or le_client.DEFAULT_URL,
                              token_file=config.get_property("token-file") or le_paths.default_token_file())
    client.health()  # a clear "server not running" before any upload (run_edit checks the edit names first)
    options = le_flow.EditOptions(
        edits=edits, model=config.get_property("model") or None, method=config.get_property("method"),
        align=config.get_property("align"), feather=float(config.get_property("feather")),
        project_steps=config.get_property("steps") or None, tune_steps=config.get_property("tune-steps") or None,
        each_region=bool(config.get_property("each-region")), segments=config.get_property("segments"),
        keep_detail=bool(config.get_property("keep-detail")),
        edit_segments=le_flow.parse_segments(config.get_property("edit-segments") or ""))

    progress = _Progress()
    Gimp.progress_init("Latent Edit")
    inputs = [doc.read_layer(image, layer) for layer in layers]
    labels = [None] * len(layers)
    if options.segments == "layer":
        label = config.get_property("label-layer")
        labels = [_label_map(label, layer, px) for layer, px in zip(layers, inputs)]
    items = [le_flow.Item(le_pixels.pack_layer(px.data, px.width, px.height, px.format, px.offset_x, px.offset_y, px.name),
                          le_pixels.pack_selection(px.selection, px.width, px.height, px.offset_x, px.offset_y)
                          if px.selection is not None else None, lab) for px, lab in zip(inputs, labels)]
    cache = le_flow.SessionCache(path=os.path.join(Gimp.directory(), SESSIONS_FILE))
    try:
        out = le_flow.run_edit(client, items, options, cache, on_progress=progress, should_cancel=lambda: progress.stop)
    finally:
        Gimp.progress_end()
    created = []
    title = le_flow.edit_title(edits)
    image.undo_group_start()
    try:
        for layer, px, result, sid in zip(layers, inputs, out.layers, out.session_ids):
            data, _w, _h, fmt, _x, _y = le_pixels.unpack_layer(result)
            if fmt != px.format:
                data = le_pixels.convert_samples(data, fmt, px.format)
            position = doc.result_position(image, layer, le_flow.is_result_group_name, le_flow.stack_top)
            group = doc.insert_result(image, layer, title, [(le_flow.result_layer_name(px.name, edits), data)],
                                      px.format, px.selection is not None, position)
            created.append({"group": group.get_name(), "session_id": sid})
    finally:
        image.undo_group_end()
    Gimp.displays_flush()
    import json

    return Gimp.ValueArray.new_from_values([
        GObject.Value(Gimp.PDBStatusType, Gimp.PDBStatusType.SUCCESS),
        GObject.Value(GObject.TYPE_STRING, json.dumps({"created": created, "reused": out.reused,
                                                       "segments": out.segments})),
    ])


class LatentEdit(Gimp.PlugIn):
    def do_query_procedures(self):
        return [PROC]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        p = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
        p.set_image_types("RGB*")
        p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE | Gimp.ProcedureSensitivityMask.DRAWABLES)
        p.set_menu_label("Latent Edit…")
        p.add_menu_path("<Image>/Filters")
        p.set_documentation("StyleGAN-based semantic edits (smile, age, pose…) as new layers",
                            "Inverts the face in the active layer with the local Latent Edit server and inserts "
                            "the edited result as a new masked layer in a group above it. The source layer is "
                            "never modified.", name)
        p.set_attribution("Latent Edit", "Latent Edit", "2026")
        rw = GObject.ParamFlags.READWRITE
        p.add_choice_argument("method", "_Method", "Inversion method", _choice(METHODS), "pti", rw)
        p.add_choice_argument("align", "_Alignment", "Face alignment", _choice(ALIGN), "auto", rw)
        p.add_string_argument("model", "Mo_del", "Model name on the server (empty: the server's default)", "", rw)
        p.add_choice_argument("segments", "_Segments", "Where the segments come from (each gets its own code; "
                              "anything but the selection needs the method 'Segments (ChunkyGAN)')",
                              _choice(SEGMENTS, SEGMENT_HELP), "selection", rw)
        p.add_layer_argument("label-layer", "_Label layer", "Segments 'From layer': the layer whose flat colours "
                             "are the segments", True, rw)
        p.add_string_argument("edit-segments", "Edit _segments", "Apply the edits only to these segments, e.g. "
                              "'1, 3' (numbered from 0 in the order the label colours appear from the top-left); "
                              "empty: all", "", rw)
        p.add_boolean_argument("keep-detail", "_" + le_flow.KEEP_DETAIL, "Blend the photo's own detail back into "
                               "the edited result where the edit does not change it", False, rw)
        for i in range(1, EDIT_SLOTS + 1):
            p.add_string_argument("edit-%d" % i, "Edit %d" % i, "Direction name (e.g. smile)",
                                  "smile" if i == 1 else "", rw)
            p.add_double_argument("strength-%d" % i, "Strength %d" % i, "Edit strength", -10.0, 10.0,
                                  1.5 if i == 1 else 0.0, rw)
        p.add_string_argument("edits", "More edits", "Extra edits as 'name=strength; name=strength'", "", rw)
        p.add_double_argument("feather", "_Feather", "Feather radius in pixels", 0.0, 200.0,
                              le_flow.read_catalog({}).feather, rw)
        p.add_int_argument("steps", "Inversion steps", "0 = the method's default; not used where the code comes "
                           "from the encoder (Fast, or pivotal tuning starting from the encoder's code)", 0, 5000, 0, rw)
        p.add_int_argument("tune-steps", "Tuning steps", "PTI tuning steps (0 = default)", 0, 5000, 0, rw)
        p.add_boolean_argument("batch", "_Batch over selected layers", "Edit every selected layer", False, rw)
        p.add_boolean_argument("each-region", "_Each selected region is a face",
                               "Group photos: every separate selected region is aligned, inverted and pasted back, "
                               "in one job and one result layer", False, rw)
        p.add_string_argument("server-url", "Server URL", None, le_client.DEFAULT_URL, rw)
        p.add_string_argument("token-file", "Token file", "Empty: the server's default token file", "", rw)
        p.add_string_return_value("result", "Result", "JSON: created groups, sessions, re-used inversions, segments", "", rw)
        return p


Gimp.main(LatentEdit.__gtype__, sys.argv)
