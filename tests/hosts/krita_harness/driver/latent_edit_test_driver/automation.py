"""The test driver's job runner: Krita started with ``LATENT_EDIT_KRITA_JOB=job.json`` opens a document,
prepares it, runs the Latent Edit plugin's Apply (``LatentEditExtension.apply``, what the dialog calls) or
drives the real dialog, saves and quits.

job.json keys (all paths absolute):
  out_dir       where result.json, log.txt and raw pixel dumps go (required)
  open          image/.kra to open (required)
  convert       optional {"depth": "U16", "profile": "sRGB-elle-V2-srgbtrc.icc"}: Document.setColorSpace
  add_layers    optional [{"name", "raw", "x", "y", "w", "h", "visible"?}]: extra paint layers from raw bytes in
                Krita's layout (``visible: false`` hides one, e.g. a label layer)
  selection     optional path of a gray8 file (document width*height bytes) made the global selection
  layers        optional layer names to edit (several = batch); default: the active layer
  settings      optional {"server_url", "token_file", ...}: written to Krita's settings, then read back
  dialog        optional {"method", "steps", "align", "batch", "edits": [[name, strength]], "edits2",
                "preview": [[name, strength], ...], "screenshot": png path, "segments": "selection" | "auto" |
                "layer", "label_layer": layer name, "edit_segments": "1, 3", "keep_detail": bool}: drive the real
                dialog (open it with
                the real menu action, wait for the models, screenshot, set the widgets; with "preview": click
                Invert, then move each slider and wait for the preview layer; click Apply; with "edits2": change
                the edits and click Apply again without re-selecting; Close)
  options       EditOptions fields: edits [[name, strength]], model, method, align, feather, project_steps...
  options2      optional: Apply a second time with these options, on the layer that is active after the first
                Apply (no re-selection: the plugin must keep or find the source)
  cancel        optional: cancel the first run once the server reports progress (expects it cancelled)
  undo_probe    optional N: after the runs, trigger Edit > Undo N times and record the layer tree each time
  save_kra, save_png   outputs
Dumps in out_dir (Krita's layout, whole canvas): source{i}_before/after.raw, projection_before/after.raw
(Document.pixelData, the merged image), run{k}_result{j}.raw and run{k}_mask{j}.raw; result.json holds the
layer tree, timings and errors.
Exit: rc 0 (file_quit) on success; os._exit(11) on failure (QApplication.exit segfaults in Krita 5.1.5).
"""
from __future__ import annotations

import json
import os
import time
import traceback

from krita import InfoObject, Krita, Selection
from PyQt5.QtCore import QTimer

from latent_edit import model, settings
from latent_edit._common import client as cl
from latent_edit.qt import drive

SETTLE_MS = 250


class Automation:
    def __init__(self, ext, job_path: str):
        self.ext = ext
        with open(job_path, "r", encoding="utf-8") as f:
            self.job = json.load(f)
        self.out = self.job["out_dir"]
        os.makedirs(self.out, exist_ok=True)
        self.result = {"code": None, "errors": [], "runs": []}
        self.started = False

    def log(self, *parts):
        with open(os.path.join(self.out, "log.txt"), "a", encoding="utf-8") as f:
            f.write("%.2f %s\n" % (time.time(), " ".join(str(p) for p in parts)))

    def excepthook(self, kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        self.result["errors"].append(text)
        self.log("uncaught:", text)

    def start(self):
        if self.started:
            return
        self.started = True
        drive(self.steps(), self.finish_ok, self.finish_error)

    def dump(self, name: str, data: bytes):
        with open(os.path.join(self.out, name), "wb") as f:
            f.write(bytes(data))

    def steps(self):
        app = Krita.instance()
        job = self.job
        doc = app.openDocument(job["open"])
        if doc is None:
            raise RuntimeError("Krita could not open %s" % job["open"])
        app.activeWindow().addView(doc)
        doc.setBatchmode(True)
        doc.waitForDone()
        yield SETTLE_MS
        if job.get("convert"):
            c = job["convert"]
            ok = doc.setColorSpace(c.get("model", "RGBA"), c["depth"], c.get("profile", ""))
            self.log("setColorSpace", c, ok)
            doc.waitForDone()
            yield SETTLE_MS
        root = doc.rootNode()
        for spec in job.get("add_layers") or []:
            node = doc.createNode(spec["name"], "paintlayer")
            root.addChildNode(node, None)
            with open(spec["raw"], "rb") as f:
                node.setPixelData(f.read(), spec["x"], spec["y"], spec["w"], spec["h"])
            if spec.get("visible") is False:
                node.setVisible(False)
            doc.waitForDone()
            yield SETTLE_MS
        if job.get("selection"):
            with open(job["selection"], "rb") as f:
                mask = f.read()
            sel = Selection()
            sel.setPixelData(mask, 0, 0, doc.width(), doc.height())
            doc.setSelection(sel)
        defaults = settings.Settings()  # every run starts from these, whatever an earlier run left in kritarc
        isolated = {"segments": defaults.segments, "keep_detail": defaults.keep_detail}
        for key, value in dict(isolated, **(job.get("settings") or {})).items():
            app.writeSetting(settings.GROUP, key, str(value))
        conf = settings.load(app)
        self.log("settings", vars(conf))
        names = job.get("layers")
        if names:
            nodes = [doc.nodeByName(n) for n in names]
            missing = [n for n, node in zip(names, nodes) if node is None]
            if missing:
                raise RuntimeError("no layer named %s" % ", ".join(missing))
        else:
            paint = [n for n in doc.topLevelNodes() if n.type() == "paintlayer"]
            doc.setActiveNode(paint[0])
            doc.waitForDone()
            yield SETTLE_MS
            nodes = [doc.activeNode()]
        for i, node in enumerate(nodes):
            self.dump("source%d_before.raw" % i, node.pixelData(0, 0, doc.width(), doc.height()))
        doc.refreshProjection()
        doc.waitForDone()
        self.dump("projection_before.raw", doc.pixelData(0, 0, doc.width(), doc.height()))
        self.result.update(width=doc.width(), height=doc.height(), depth=doc.colorDepth(), model=doc.colorModel(),
                           profile=doc.colorProfile(), sources=[n.name() for n in nodes])
        if job.get("dialog"):
            yield from self.dialog_steps(job["dialog"])
        passes = ([job["options"]] if job.get("options") else []) + ([job["options2"]] if job.get("options2") else [])
        for k, opts in enumerate(passes):
            options = model.EditOptions(**{**opts, "edits": [tuple(e) for e in opts.get("edits", [])]})
            box = {}
            if k > 0:  # Apply -> Apply: whatever the first Apply left active, as a user would
                nodes = [doc.activeNode()]
                self.result["active_before_run%d" % k] = [n.name() for n in nodes]
            t0 = time.time()
            self.ext.apply(nodes, options, on_finished=lambda added, err, box=box: box.update(added=added, err=err))
            while "err" not in box:
                run = self.ext.running
                if job.get("cancel") and run is not None and run.status().progress > 0 and not run.cancelled:
                    self.log("cancelling at", run.status())
                    self.ext.cancel()  # what the dialog's "Cancel job" button does
                yield 100
            if job.get("cancel") and isinstance(box["err"], cl.JobCancelled):
                self.result["runs"].append({"seconds": round(time.time() - t0, 2), "cancelled": True})
                continue
            if box["err"] is not None:
                raise box["err"]
            run = self.ext.running
            self.result["runs"].append({"seconds": round(time.time() - t0, 2), "reused": run.reused,
                                        "segments": run.segments,
                                        "groups": [g.name() for g, _l, _m in box["added"]],
                                        "active_after": doc.activeNode().name()})
            for j, (group, layer, mask) in enumerate(box["added"]):
                self.dump("run%d_result%d.raw" % (k, j), layer.pixelData(0, 0, doc.width(), doc.height()))
                if mask is not None:
                    self.dump("run%d_mask%d.raw" % (k, j), mask.pixelData(0, 0, doc.width(), doc.height()))
            doc.waitForDone()
            yield SETTLE_MS
        for i, node in enumerate(nodes):
            self.dump("source%d_after.raw" % i, node.pixelData(0, 0, doc.width(), doc.height()))
        sel = doc.selection()
        self.result["selection_after"] = None if sel is None else [sel.x(), sel.y(), sel.width(), sel.height()]
        self.result["tree"] = tree(doc.rootNode())
        doc.refreshProjection()
        doc.waitForDone()
        yield SETTLE_MS
        self.dump("projection_after.raw", doc.pixelData(0, 0, doc.width(), doc.height()))
        if job.get("save_kra"):
            self.result["saved_kra"] = bool(doc.saveAs(job["save_kra"]))
        if job.get("save_png"):
            self.result["saved_png"] = bool(doc.exportImage(job["save_png"], InfoObject()))
        if job.get("undo_probe"):  # after saving: record what Edit > Undo takes back, one undo at a time
            self.result["undo_trees"] = []
            for _ in range(int(job["undo_probe"])):
                app.action("edit_undo").trigger()
                doc.waitForDone()
                yield SETTLE_MS
                self.result["undo_trees"].append(tree(doc.rootNode()))
        self.doc = doc

    def dialog_steps(self, spec: dict):
        """Drive the real dialog like a user (see the module docstring)."""
        app = Krita.instance()
        doc = app.activeDocument()
        app.action("latent_edit_dialog").trigger()  # the real menu action opens the dialog
        dlg = self.ext.dialog
        for _ in range(600):
            if dlg.rows:
                break
            yield 100
        yield SETTLE_MS  # let the layout settle at its default size
        win = app.activeWindow().qwindow().frameGeometry()
        geo = dlg.frameGeometry()
        info = {"server_status": dlg.server_status.text(), "models": [dlg.model_box.itemData(i) for i in range(dlg.model_box.count())],
                "directions": [r.name for r in dlg.rows], "defaults": [r.spin.value() for r in dlg.rows],
                "methods": [dlg.method_box.itemData(i) for i in range(dlg.method_box.count())],
                "apply_enabled_without_edit": dlg.apply_btn.isEnabled(), "hint_without_edit": dlg.hint.text(),
                "size": [dlg.width(), dlg.height()], "dialog_rect": [geo.x(), geo.y(), geo.width(), geo.height()],
                "window_rect": [win.x(), win.y(), win.width(), win.height()],
                "rows_fully_visible": sum(1 for r in dlg.rows if r.check.visibleRegion().boundingRect().height()
                                          >= r.check.height() and r.spin.visibleRegion().boundingRect().height() >= r.spin.height()),
                "resizable": dlg.minimumSize() != dlg.maximumSize()}
        steps_enabled = {}
        for i in range(dlg.method_box.count()):  # the steps box follows the chosen method
            dlg.method_box.setCurrentIndex(i)
            steps_enabled[dlg.method_box.itemData(i)] = [dlg.steps.isEnabled(), dlg.steps.toolTip()]
        info["steps_enabled"] = steps_enabled
        if spec.get("screenshot"):
            info["screenshot"] = bool(dlg.grab().save(spec["screenshot"]))
        seg = dlg.segments_box
        info["segment_sources"] = [{"name": seg.itemData(i), "label": seg.itemText(i),
                                    "enabled": bool(seg.model().item(i).isEnabled()),
                                    "tooltip": seg.itemData(i, 3) or ""} for i in range(seg.count())]  # 3: ToolTipRole
        if spec.get("segments"):
            seg.setCurrentIndex(seg.findData(spec["segments"]))
            info["method_after_segments"] = dlg.method_box.currentData()
            info["label_layers"] = [dlg.label_layer_box.itemText(i) for i in range(dlg.label_layer_box.count())]
            info["label_layer_enabled"] = dlg.label_layer_box.isEnabled()
        if spec.get("label_layer"):
            dlg.label_layer_box.setCurrentIndex(dlg.label_layer_box.findText(spec["label_layer"]))
        dlg.keep_detail.setChecked(bool(spec.get("keep_detail", False)))
        if spec.get("edit_segments") is not None:
            dlg.edit_segments.setText(spec["edit_segments"])
            info["edit_segments"] = dlg.chosen_segments()
            info["edit_segments_enabled"] = dlg.edit_segments.isEnabled()
        dlg.method_box.setCurrentIndex(dlg.method_box.findData(spec["method"]))
        dlg.steps.setValue(int(spec["steps"]))
        dlg.align.setChecked(bool(spec.get("align", False)))
        dlg.batch.setChecked(bool(spec.get("batch", False)))
        if spec.get("close_during_job"):  # Close while the inversion runs: the job must be cancelled
            dlg.invert_btn.click()
            while self.ext.running is None or self.ext.running.status().progress <= 0:
                yield 20
            dlg.close()
            run = self.ext.running
            while not run.finished.is_set():
                yield 20
            info.update(state_after_close=run.status().state, error_type=type(run.error).__name__,
                        visible_after_close=dlg.isVisible(), job_id=run.status().job_id)
            self.result["dialog"] = info
            return
        if spec.get("preview"):
            dlg.invert_btn.click()
            while self.ext.busy() or dlg.preview_target is None:
                if not self.ext.busy() and "Inverted" not in dlg.message.text() and self.ext.running is not None \
                        and self.ext.running.finished.is_set() and self.ext.running.error is not None:
                    raise self.ext.running.error
                yield 20
            info["after_invert"] = dlg.message.text()
            info["job_previews_shown"] = dlg.job_previews_shown
            moves = []
            for name, strength in spec["preview"]:
                row = next(r for r in dlg.rows if r.name == name)
                n = len(dlg.preview_latency_ms)
                row.check.setChecked(True)
                row.spin.setValue(float(strength))  # the slider follows the spin box
                for _ in range(2000):
                    if len(dlg.preview_latency_ms) > n and dlg.preview.edits == dlg.edits():
                        break
                    yield 5
                node = dlg.preview.node
                moves.append({"edits": [list(e) for e in dlg.preview.edits], "ms": dlg.preview_latency_ms[-1],
                              "layer": node.name(), "locked": bool(node.locked()),
                              "siblings": [c.name() for c in node.parentNode().childNodes()]})
                self.dump("preview%d.raw" % len(moves), node.pixelData(0, 0, doc.width(), doc.height()))
            info["preview_moves"] = moves
            info["preview_latency_ms"] = list(dlg.preview_latency_ms)
        else:
            for name, strength in spec["edits"]:
                row = next(r for r in dlg.rows if r.name == name)
                row.check.setChecked(True)
                row.spin.setValue(float(strength))
        info["apply_enabled_with_edit"] = dlg.apply_btn.isEnabled()
        applies = [None] + ([spec["edits2"]] if spec.get("edits2") else [])
        info["applies"] = []
        for edits2 in applies:
            if edits2 is not None:
                for r in dlg.rows:
                    r.check.setChecked(False)
                for name, strength in edits2:
                    row = next(r for r in dlg.rows if r.name == name)
                    row.check.setChecked(True)
                    row.spin.setValue(float(strength))
            before = doc.activeNode().name()
            dlg.apply_btn.click()
            yield 0
            enabled_while_running = dlg.apply_btn.isEnabled()
            seen = set()
            while self.ext.busy() or not dlg.message.text().startswith(("Added", "<b>", "Cancelled")):
                seen.add(dlg.progress.value())
                yield 20
            run = self.ext.running
            info["applies"].append({"message": dlg.message.text(), "progress": dlg.progress.value(),
                                    "progress_seen": sorted(seen), "enabled_while_running": enabled_while_running,
                                    "active_before": before, "active_after": doc.activeNode().name(),
                                    "reused": None if run is None else run.reused, "from_preview": run is None,
                                    "segments": None if run is None else run.segments})
        first = info["applies"][0]
        info.update(message=first["message"], progress=first["progress"], progress_seen=first["progress_seen"],
                    enabled_while_running=first["enabled_while_running"])
        dlg.close()
        doc.waitForDone()
        yield SETTLE_MS
        info["tree_after_close"] = tree(doc.rootNode())
        self.result["dialog"] = info

    def write_result(self, code: int):
        self.result["code"] = code
        with open(os.path.join(self.out, "result.json"), "w", encoding="utf-8") as f:
            json.dump(self.result, f, indent=1)

    def finish_ok(self, _value):
        code = 1 if self.result["errors"] else 0
        self.write_result(code)
        if code:
            os._exit(11)
        for d in Krita.instance().documents():
            d.setModified(False)  # else a "save changes?" dialog blocks the quit
        QTimer.singleShot(0, lambda: Krita.instance().action("file_quit").trigger())

    def finish_error(self, err):
        self.result["errors"].append("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        self.result["error_message"] = str(err)
        self.result["error_type"] = type(err).__name__
        self.log("failed:", self.result["errors"][-1])
        self.write_result(2)
        os._exit(12)


def tree(node) -> dict:
    """{name, type, children} of a node and its descendants (bottom to top, as Krita lists them)."""
    return {"name": node.name(), "type": node.type(), "visible": bool(node.visible()), "locked": bool(node.locked()),
            "children": [tree(c) for c in node.childNodes()]}


