# Runs inside GIMP 3's python-fu-eval (globals: Gimp, Gegl, GLib, Gio, GObject).
# Builds an image from a case file, calls python-fu-latent-edit NON-INTERACTIVELY (once, then once per
# "more_calls" entry with those arguments changed; "label_layer": the index of the layer passed as the label layer)
# and dumps what the test checks: the source layers' pixels
# before/after, the visible composite before and after each call, and the layer tree after each call.
import json
import os

CASE = json.load(open(os.environ["LE_CASE"]))
OUT = CASE["out"]
os.makedirs(OUT, exist_ok=True)
PIX = CASE["pixel_format"]  # babl format used for every dump, e.g. "R'G'B'A u8" / "R'G'B'A u16"


def log(*parts):
    print("LE-HARNESS:", *parts, flush=True)


def dump_drawable(drawable, name, rect=None):
    """Raw pixels of ``rect`` (x, y, w, h in the drawable's coordinates; default: all of it); transparent
    outside the drawable."""
    x, y, w, h = rect or (0, 0, drawable.get_width(), drawable.get_height())
    data = drawable.get_buffer().get(Gegl.Rectangle.new(x, y, w, h), 1.0, PIX, Gegl.AbyssPolicy.NONE)
    open(os.path.join(OUT, name), "wb").write(bytes(data))


def dump_composite(image, name):
    """The visible composite over the whole canvas (the merged layer only spans the layers' union)."""
    dup = image.duplicate()
    merged = dup.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
    _ok, ox, oy = merged.get_offsets()
    dump_drawable(merged, name, (-ox, -oy, image.get_width(), image.get_height()))
    dup.delete()


def tree(item):
    _ok, x, y = item.get_offsets()
    node = {"name": item.get_name(), "group": item.is_group(), "x": x, "y": y,
            "width": item.get_width(), "height": item.get_height(),
            "mask": item.get_mask() is not None}
    if item.is_group():
        node["children"] = [tree(c) for c in item.get_children()]
    return node


image = Gimp.Image.new_with_precision(CASE["canvas"][0], CASE["canvas"][1], Gimp.ImageBaseType.RGB,
                                      getattr(Gimp.Precision, CASE["precision"]))
layers = []
for spec in CASE["layers"]:
    layer = Gimp.Layer.new(image, spec["name"], spec["width"], spec["height"], Gimp.ImageType.RGBA_IMAGE,
                           100.0, Gimp.LayerMode.NORMAL)
    image.insert_layer(layer, None, 0)
    layer.set_offsets(spec["x"], spec["y"])
    buf = layer.get_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, spec["width"], spec["height"]), "R'G'B'A u8", open(spec["rgba8"], "rb").read())
    buf.flush()
    layer.update(0, 0, spec["width"], spec["height"])
    if spec.get("visible") is False:  # e.g. a label layer: a guide the user paints, not part of the picture
        layer.set_visible(False)
    layers.append(layer)

x, y, w, h = CASE["selection"]
image.select_ellipse(Gimp.ChannelOps.REPLACE, x, y, w, h)
sel = image.get_selection().get_buffer().get(Gegl.Rectangle.new(0, 0, *CASE["canvas"]), 1.0, "Y u8",
                                              Gegl.AbyssPolicy.NONE)
open(os.path.join(OUT, "selection.y8"), "wb").write(bytes(sel))

targets = [layers[i] for i in CASE["targets"]]
image.set_selected_layers(targets)
for i, layer in enumerate(layers):
    dump_drawable(layer, "before_%d.raw" % i)
dump_composite(image, "composite_before.raw")

proc = Gimp.get_pdb().lookup_procedure("python-fu-latent-edit")
if proc is None:
    raise RuntimeError("python-fu-latent-edit is not registered (plug-in not installed or not executable)")
log("menu", proc.get_menu_paths())
calls = []
for k, overrides in enumerate([{}] + CASE.get("more_calls", [])):  # later calls: the same layers again
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    cfg.set_property("image", image)
    cfg.set_core_object_array("drawables", targets)
    for key, value in dict(CASE["args"], **overrides).items():
        cfg.set_property(key, value)
    if CASE.get("label_layer") is not None:  # a layer argument: the index of one of the case's layers
        cfg.set_property("label-layer", layers[CASE["label_layer"]])
    res = proc.run(cfg)
    status = res.index(0)
    message = res.index(1) if res.length() > 1 else ""
    log("status", k, status, message)
    calls.append({"status": str(status.value_nick), "message": message,
                  "tree": [tree(item) for item in image.get_layers()]})
    dump_composite(image, "composite_after_%d.raw" % k)

for i, layer in enumerate(layers):
    dump_drawable(layer, "after_%d.raw" % i)
dump_composite(image, "composite_after.raw")
info = {"status": calls[0]["status"], "message": calls[0]["message"], "calls": calls, "menu": list(proc.get_menu_paths()),
        "tree": [tree(item) for item in image.get_layers()], "undo_enabled": image.undo_is_enabled()}
json.dump(info, open(os.path.join(OUT, "info.json"), "w"), indent=1)
image.delete()
