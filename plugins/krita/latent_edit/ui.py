"""The Latent Edit dialog (non-modal, resizable, placed beside the canvas): server, model, method, one
slider per edit (filterable, scrolling), live preview, Invert / Apply / Cancel job / Close. All server
calls run off the UI thread; Krita's API is used on the UI thread only."""
from __future__ import annotations

import time

from krita import Krita

from . import document, layers, model, settings
from ._common import client as cl
from ._common import flow
from .qt import QtGui, Qt, QTimer, QtWidgets, drive, in_background
from .widgets import EditRow, escape as _escape, screen_rect as _screen_rect

PREVIEW_POLL_MS = 15  # how often the UI thread looks for a finished preview render
# the segment sources (flow.SEGMENT_CHOICES) in Krita's words
SEGMENT_LABELS = (("selection", "Selection"), ("auto", "Automatic"), ("layer", "From layer…"))
AUTO_TIP = "The model finds the face parts (eyes, brows, nose, mouth, hair…) inside the selection"


class LatentEditDialog(QtWidgets.QDialog):
    def __init__(self, ext):
        super().__init__(Krita.instance().activeWindow().qwindow())
        self.ext = ext
        self.setWindowTitle("Latent Edit")
        self.setSizeGripEnabled(True)
        self.catalog = None
        self.rows = []
        self.conf = settings.load(Krita.instance())
        self.preview = None  # layers.Preview of the layer the last inversion was for
        self.preview_target = None  # (session_id, LayerPixels) that slider moves re-render
        self.preview_latency_ms = []  # change -> preview layer written, per shown preview
        self._changed_at = None
        self._shown_job_preview = 0
        self.job_previews_shown = 0  # server progress previews shown during inversions (tests read it)
        self.renderer = flow.LatestOnly(self._render_preview)
        self.timer = QTimer(self)
        self.timer.timeout.connect(self._poll_preview)
        self.timer.start(PREVIEW_POLL_MS)
        lay = QtWidgets.QVBoxLayout(self)
        columns = QtWidgets.QHBoxLayout()
        left = QtWidgets.QVBoxLayout()
        columns.addLayout(left)
        lay.addLayout(columns, 1)

        server = QtWidgets.QGroupBox("Server")
        form = QtWidgets.QFormLayout(server)
        self.url = QtWidgets.QLineEdit(self.conf.server_url)
        self.token = QtWidgets.QLineEdit(self.conf.token_file)
        self.token.setPlaceholderText(settings.default_token_file())
        browse = QtWidgets.QPushButton("…")
        browse.clicked.connect(self._browse)
        tok = QtWidgets.QHBoxLayout()
        tok.addWidget(self.token)
        tok.addWidget(browse)
        self.server_status = QtWidgets.QLabel("Not connected yet.")
        self.server_status.setWordWrap(True)
        check = QtWidgets.QPushButton("Connect")
        check.clicked.connect(self.refresh)
        form.addRow("URL", self.url)
        form.addRow("Token file", tok)
        form.addRow(check, self.server_status)
        left.addWidget(server)

        opts = QtWidgets.QGroupBox("Inversion")
        form = QtWidgets.QFormLayout(opts)
        self.model_box = QtWidgets.QComboBox()
        self.model_box.currentIndexChanged.connect(self._model_changed)
        self.method_box = QtWidgets.QComboBox()
        self.method_box.currentIndexChanged.connect(lambda _i: self._method_changed())
        self.align = QtWidgets.QCheckBox("Detect and align the face")
        self.align.setChecked(self.conf.align)
        self.steps = QtWidgets.QSpinBox()
        self.steps.setRange(0, 5000)
        self.steps.setSpecialValueText("method default")
        self.steps.setValue(self.conf.project_steps)
        self.feather = QtWidgets.QDoubleSpinBox()
        self.feather.setRange(0.0, 256.0)
        self.feather.setSuffix(" px")
        self._feather_from_server = self.conf.feather < 0  # until the user sets one, the server's default
        self.feather.setValue(self.conf.feather if self.conf.feather >= 0 else flow.read_catalog({}).feather)
        self.feather.valueChanged.connect(self._feather_changed)
        self.segments_box = QtWidgets.QComboBox()
        for name, label in SEGMENT_LABELS:
            self.segments_box.addItem(label, name)
        self.segments_box.setToolTip("Where the segments come from: each segment gets its own latent code "
                                     "(ChunkyGAN). \"From layer…\": paint each segment in its own flat colour on "
                                     "a layer; transparent parts of it stay as they are.")
        self.label_layer_box = QtWidgets.QComboBox()
        self.label_layer_box.setToolTip("The layer whose flat colours are the segments (one segment per colour)")
        self.segments_box.setCurrentIndex(max(0, self.segments_box.findData(self.conf.segments)))
        self.segments_box.currentIndexChanged.connect(self._segments_changed)
        self.edit_segments = QtWidgets.QLineEdit()
        self.edit_segments.setPlaceholderText("all segments (or e.g. 1, 3)")
        self.edit_segments.setToolTip("Apply the edits only to these segments, numbered from 0 in the order their "
                                      "colours appear from the top-left (Automatic: in the order the model finds "
                                      "them); empty: every segment")
        self.edit_segments.textChanged.connect(lambda _t: self._edits_changed())
        self.keep_detail = QtWidgets.QCheckBox(flow.KEEP_DETAIL)
        self.keep_detail.setToolTip("Blend the photo's own detail back into the edited result where the edit does "
                                    "not change it (the first render after Invert takes longer)")
        self.keep_detail.setChecked(self.conf.keep_detail)
        self.keep_detail.toggled.connect(lambda _on: self._edits_changed())
        form.addRow("Model", self.model_box)
        form.addRow("Method", self.method_box)
        form.addRow("Segments", self.segments_box)
        form.addRow("Label layer", self.label_layer_box)
        form.addRow("Edit segments", self.edit_segments)
        form.addRow("", self.keep_detail)
        form.addRow("", self.align)
        form.addRow("Projection steps", self.steps)
        form.addRow("Feather", self.feather)
        left.addWidget(opts)

        edits = QtWidgets.QGroupBox("Edits")
        v = QtWidgets.QVBoxLayout(edits)
        self.filter = QtWidgets.QLineEdit()
        self.filter.setPlaceholderText("Filter edits…")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self._filter)
        v.addWidget(self.filter)
        self.scroll = QtWidgets.QScrollArea()
        self.scroll.setWidgetResizable(True)
        inner = QtWidgets.QWidget()
        self.grid = QtWidgets.QGridLayout(inner)
        self.grid.setColumnStretch(1, 1)
        self.grid.setVerticalSpacing(1)  # compact rows: a model with dense and sparse directions lists ~30 edits
        self.grid.setAlignment(Qt.AlignmentFlag.AlignTop)
        self.scroll.setWidget(inner)
        v.addWidget(self.scroll, 1)
        columns.addWidget(edits, 1)

        self.use_selection = QtWidgets.QCheckBox("Only inside the selection (whole layer when nothing is selected)")
        self.use_selection.setChecked(self.conf.use_selection)
        self.each_region = QtWidgets.QCheckBox("Each selected region is a face\n(group photos: one job, one result)")
        self.each_region.setChecked(self.conf.each_region)
        self.batch = QtWidgets.QCheckBox("Batch over selected layers")
        self.live = QtWidgets.QCheckBox("Live preview (after the layer is inverted)")
        self.live.setChecked(self.conf.live_preview)
        self.live.toggled.connect(lambda _on: self._edits_changed())
        self.use_selection.setText("Only inside the selection\n(whole layer when nothing is selected)")
        for w in (self.use_selection, self.each_region, self.batch, self.live):
            left.addWidget(w)
        left.addStretch(1)
        status = QtWidgets.QHBoxLayout()
        self.job_preview = QtWidgets.QLabel()
        self.job_preview.setFixedSize(64, 64)
        self.job_preview.setVisible(False)
        col = QtWidgets.QVBoxLayout()
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 100)
        self.message = QtWidgets.QLabel("")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Preferred)
        col.addWidget(self.progress)
        col.addWidget(self.message)
        status.addWidget(self.job_preview)
        status.addLayout(col, 1)
        lay.addLayout(status)
        self.hint = QtWidgets.QLabel("")
        self.hint.setWordWrap(True)
        lay.addWidget(self.hint)
        buttons = QtWidgets.QHBoxLayout()
        self.invert_btn = QtWidgets.QPushButton("Invert")
        self.invert_btn.setToolTip("Invert the layer now, so that moving a slider previews the edit on the canvas")
        self.invert_btn.clicked.connect(self.invert)
        self.apply_btn = QtWidgets.QPushButton("Apply")
        self.apply_btn.clicked.connect(self.apply)
        self.cancel_btn = QtWidgets.QPushButton("Cancel job")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.ext.cancel)
        close = QtWidgets.QPushButton("Close")
        close.clicked.connect(self.close)
        buttons.addStretch(1)
        for b in (self.invert_btn, self.apply_btn, self.cancel_btn, close):
            buttons.addWidget(b)
        lay.addLayout(buttons)
        self._update_buttons()
        self.resize(760, 560)

    # --- placement ---

    def open_beside_canvas(self):
        """Show the dialog beside Krita's canvas: right of the window when the screen has room, else at the
        screen's right edge; never centred over the canvas."""
        self.show()
        win = Krita.instance().activeWindow()
        if win is not None and win.qwindow() is not None:
            g = win.qwindow().frameGeometry()
            screen = _screen_rect(win.qwindow()) or g
            x = g.right() + 8 if g.right() + 8 + self.width() <= screen.right() else screen.right() - self.width()
            self.move(max(screen.left(), x), max(screen.top(), g.top()))
        self.raise_()
        self.activateWindow()
        self.refresh()

    def _fit_rows(self):
        """Grow the height so that every edit row shows at once (up to the screen's height)."""
        if not self.rows:
            return
        row = max(self.rows[0].spin.sizeHint().height(), self.rows[0].check.sizeHint().height())
        m = self.grid.contentsMargins()
        need = len(self.rows) * (row + max(0, self.grid.verticalSpacing())) + m.top() + m.bottom()
        grow = need - self.scroll.viewport().height()
        screen = _screen_rect(self)
        limit = screen.height() - 60 if screen is not None else self.height() + grow
        if grow > 0:
            self.resize(self.width(), min(self.height() + grow, limit))

    # --- settings and server ---

    def _browse(self):
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Token file", self.token.text() or settings.default_token_file())
        if path:
            self.token.setText(path)

    def _save_settings(self) -> settings.Settings:
        c = self.conf
        c.server_url, c.token_file = self.url.text().strip() or cl.DEFAULT_URL, self.token.text().strip()
        c.method = self.method_box.currentData() or c.method
        c.feather = -1.0 if self._feather_from_server else self.feather.value()
        c.project_steps = self.steps.value()
        c.model = self.model_box.currentData() or ""
        c.align, c.use_selection, c.live_preview = self.align.isChecked(), self.use_selection.isChecked(), self.live.isChecked()
        c.each_region = self.each_region.isChecked()
        source = self.segments_box.currentData() or "selection"
        c.segments = "selection" if source == "layer" else source  # a label layer belongs to one document
        c.keep_detail = self.keep_detail.isChecked()
        settings.save(Krita.instance(), c)
        return c

    def refresh(self):
        try:
            client = self._save_settings().client()
        except cl.ClientError as e:
            self.server_status.setText(str(e))
            return
        self.server_status.setText("Connecting…")

        def fetch():
            return client.health(), flow.fetch_catalog(client)

        def done(result, error):
            if error is not None:
                self.server_status.setText("<b>%s</b>" % _escape(str(error)))
                return
            health, catalog = result
            self.server_status.setText("Connected: server %s on %s, perceptual loss %s." % (
                health.get("version", "?"), health.get("device", "?"), health.get("perceptual_backbone", "?")))
            self._set_catalog(catalog)

        in_background(fetch, done)

    def _set_catalog(self, catalog):
        self.catalog = catalog
        self.model_box.blockSignals(True)
        self.model_box.clear()
        for m in catalog.models:
            self.model_box.addItem("%s (%s px)" % (m.get("name"), m.get("resolution", "?")), m.get("name"))
        idx = max(0, self.model_box.findData(self.conf.model or catalog.default_model))
        self.model_box.blockSignals(False)
        self.model_box.setCurrentIndex(idx)
        if self._feather_from_server:
            self.feather.blockSignals(True)
            self.feather.setValue(catalog.feather)
            self.feather.blockSignals(False)
        self._model_changed(idx)

    def _model_changed(self, idx):
        while self.grid.count():
            w = self.grid.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.rows = []
        self.method_box.clear()
        if self.catalog is None or not 0 <= idx < len(self.catalog.models):
            self._update_buttons()
            return
        info = self.catalog.models[idx]
        for m in self.catalog.methods_for(info["name"]):
            self.method_box.addItem(m.label, m.name)
        self.method_box.setCurrentIndex(max(0, self.method_box.findData(self.conf.method)))
        self._set_segmenter(info)
        for r, spec in enumerate(flow.direction_specs(info)):
            self.rows.append(EditRow(self.grid, r, *spec, on_change=self._edits_changed))
        self._filter(self.filter.text())
        self._fit_rows()
        self._update_buttons()

    def _method_changed(self):
        """"Projection steps" is greyed out, saying why, for a method that projects nothing (the encoder)."""
        model = self.model_box.currentData() or None
        m = self.catalog.method(self.method_box.currentData() or "", model) if self.catalog is not None else None
        used = m is None or flow.uses_projection_steps(m)
        self.steps.setEnabled(used)
        self.steps.setToolTip("How long the inversion searches for the latent code (0: the method's default)" if used
                              else "This method takes its latent code from the encoder in one pass: it has no "
                                   "projection steps")

    def _set_segmenter(self, info):
        """"Automatic" is offered only when the model has a segmenter; otherwise disabled, saying what to add."""
        i = self.segments_box.findData("auto")
        ok = flow.has_segmenter(info)
        self.segments_box.model().item(i).setEnabled(ok)
        self.segments_box.setItemData(i, AUTO_TIP if ok else flow.segmenter_missing(info), Qt.ItemDataRole.ToolTipRole)
        if not ok and self.segments_box.currentData() == "auto":
            self.segments_box.setCurrentIndex(self.segments_box.findData("selection"))
        self._segments_changed()

    def _label_layers(self):
        """The document's paint layers a label map can come from: (name, uniqueId), top first."""
        doc = Krita.instance().activeDocument()
        out = []

        def walk(node):
            for child in reversed(node.childNodes()):
                if child.type() == "paintlayer" and not flow.is_result_group_name(child.name()) and \
                        child.name() != flow.PREVIEW_NAME:
                    out.append((child.name(), str(child.uniqueId())))
                walk(child)

        if doc is not None:
            walk(doc.rootNode())
        return out

    def _segments_changed(self, _idx=None):
        source = self.segments_box.currentData()
        from_layer = source == "layer"
        if from_layer:
            keep = self.label_layer_box.currentData()
            self.label_layer_box.clear()
            for name, uid in self._label_layers():
                self.label_layer_box.addItem(name, uid)
            self.label_layer_box.setCurrentIndex(max(0, self.label_layer_box.findData(keep)))
        self.label_layer_box.setEnabled(from_layer)
        self.edit_segments.setEnabled(source != "selection")
        if source != "selection":  # several segments are ChunkyGAN's: its method
            i = self.method_box.findData(flow.SEGMENTS_METHOD)
            if i >= 0:
                self.method_box.setCurrentIndex(i)
        self._update_buttons()

    def _filter(self, text):
        words = text.lower().split()
        for row in self.rows:
            row.set_visible(all(w in row.name.lower() for w in words))

    def _feather_changed(self, _value):
        self._feather_from_server = False
        self._edits_changed()

    # --- options ---

    def edits(self) -> list:
        return [e for e in (r.edit() for r in self.rows) if e is not None]

    def options(self, conf) -> model.EditOptions:
        return model.EditOptions(
            edits=self.edits(), model=conf.model or None, method=conf.method,
            align="auto" if self.align.isChecked() else "none", feather=self.feather.value(),
            project_steps=conf.project_steps or None, use_selection=self.use_selection.isChecked(),
            each_region=self.each_region.isChecked(), segments=self.segments_box.currentData() or "selection",
            label_layer=self.label_layer_box.currentData(), keep_detail=self.keep_detail.isChecked(),
            edit_segments=self.chosen_segments())

    def chosen_segments(self):
        """The "Edit segments" numbers (None: every segment, or the selection as the one segment)."""
        if self.segments_box.currentData() == "selection":
            return None
        return flow.parse_segments(self.edit_segments.text())

    def _update_buttons(self):
        busy = self.ext.busy()
        has_edit = bool(self.edits())
        self.apply_btn.setEnabled(has_edit and not busy and bool(self.rows))
        self.invert_btn.setEnabled(not busy and bool(self.rows))
        self.cancel_btn.setEnabled(busy)
        if not self.rows:
            self.hint.setText("Connect to the server to list the edits.")
        elif not has_edit:
            self.hint.setText("Tick at least one edit to enable Apply.")
        elif self.preview_target is None and self.live.isChecked():
            self.hint.setText("Click Invert (or Apply) once; after that, moving a slider previews the edit on the canvas.")
        else:
            self.hint.setText("")

    def _nodes(self):
        app = Krita.instance()
        doc = app.activeDocument()
        nodes = [doc.activeNode()]
        if self.batch.isChecked():
            view = app.activeWindow().activeView()
            selected = [n for n in (view.selectedNodes() if view is not None else []) if n.type() == "paintlayer"]
            nodes = selected or nodes
        return doc, model.resolve_sources(doc, nodes)

    # --- live preview ---

    def _edits_changed(self):
        self._update_buttons()
        target = self.preview_target
        if target is None or not self.live.isChecked():
            return
        edits = self.edits()
        if not edits:
            self._drop_preview_layer()
            return
        try:
            segments = self.chosen_segments()
        except flow.FlowError as e:
            self.message.setText(str(e))
            return
        self._changed_at = time.perf_counter()
        self.renderer.submit((target, edits, self.feather.value(), self._changed_at, self.keep_detail.isChecked(),
                              segments))

    def _render_preview(self, request):
        """Worker thread: one render of the preview target (no Krita calls here)."""
        (session_id, item, client), edits, feather, _t, keep, segments = request
        extra = {"fusion": flow.EditOptions(keep_detail=keep).fusion} if keep else {}
        body = client.render(session_id, flow.wire_edits(edits, segments), feather=feather,
                             format=item.space.wire_format, **extra)
        return document.wire_to_krita(cl.result_layers(body)[0], item.space, item.rect)

    def _poll_preview(self):
        done = self.renderer.take()
        if done is None:
            return
        (target, edits, feather, t0, keep, segments), pixels, error = done
        if error is not None:
            self.message.setText("Preview failed: %s" % _escape(str(error)))
            return
        if target is not self.preview_target or self.preview is None or self.ext.busy():
            return
        doc = Krita.instance().activeDocument()
        if doc is None:
            return
        self.preview.show(doc, target[1].rect, pixels, edits, feather, keep, segments)
        ms = (time.perf_counter() - t0) * 1000.0
        self.preview_latency_ms.append(round(ms, 1))
        self.message.setText("Preview: %s (%d ms)." % (flow.edit_label(edits), round(ms)))

    def _set_preview_target(self, run, doc, nodes):
        """After an inversion of one layer: slider moves now re-render its session into the preview layer."""
        if run is None or len(nodes) != 1 or len(run.session_ids) != 1:
            return  # batches and group photos (several sessions) are not previewed
        item = document.read_layer(doc, nodes[0], use_selection=self.use_selection.isChecked(), convert=False)
        if self.preview is not None and self.preview.source is not None and \
                str(self.preview.source.uniqueId()) != str(nodes[0].uniqueId()):
            self._drop_preview_layer()
        self.preview = self.preview or layers.Preview(nodes[0], layers.content_digest(item))
        self.preview.digest = layers.content_digest(item)
        self.preview_target = (run.session_ids[0], item, run.client)
        self._update_buttons()

    def _drop_preview_layer(self):
        if self.preview is not None and self.preview.node is not None:
            doc = Krita.instance().activeDocument()
            if doc is not None:
                drive(self.preview.remove(doc))

    # --- invert / apply ---

    def _start(self, render: bool):
        conf = self._save_settings()
        app = Krita.instance()
        if app.activeDocument() is None:
            self.message.setText("Open a document first.")
            return
        doc, nodes = self._nodes()
        try:
            options = self.options(conf)
            client = conf.client()
        except (cl.ClientError, flow.FlowError) as e:
            self.message.setText(str(e))
            return
        self.progress.setValue(0)
        self._shown_job_preview = 0
        self.message.setText("Starting…")

        def finished(added, error):
            self.job_preview.setVisible(False)
            self._finished(added, error, render)
            if error is None:
                self._set_preview_target(self.ext.running, doc, nodes)
                if not render:
                    self._edits_changed()

        if render:
            preview = self.preview if self.preview is not None and self.preview.node is not None else None
            self.ext.apply(nodes, options, client, on_finished=finished, on_status=self._status, preview=preview)
        else:
            self._invert(doc, nodes, options, client, finished)
        self._update_buttons()

    def apply(self):
        if not self.edits():
            self._update_buttons()
            return
        self._start(render=True)

    def invert(self):
        self._start(render=False)

    def _invert(self, doc, nodes, options, client, finished):
        try:
            items = model.read_items(doc, nodes[:1], options)
        except document.DocumentError as e:
            finished(None, e)
            return
        run = model.EditRun(client, items, options, self.ext.cache, render=False).start()
        self.ext.running = run

        def wait():
            while not run.finished.is_set():
                self._status(run.status())
                yield model.POLL_MS
            if run.error is not None:
                raise run.error
            return []

        drive(wait(), lambda added: finished(added, None), lambda err: finished(None, err))

    def _status(self, st):
        self.progress.setValue(int(round(st.progress * 100)))
        self.message.setText(st.message)
        self._update_buttons()
        if st.job_id and st.preview_seq > self._shown_job_preview:
            self._shown_job_preview = st.preview_seq
            client, job_id = self.ext.running.client, st.job_id
            in_background(lambda: client.job_preview(job_id), self._show_job_preview)

    def _show_job_preview(self, png, error):
        if error is not None or not png or not self.ext.busy():
            return
        img = QtGui.QImage.fromData(png)
        if not img.isNull():
            self.job_preview.setPixmap(QtGui.QPixmap.fromImage(img).scaled(
                64, 64, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation))
            self.job_preview.setVisible(True)
            self.job_previews_shown += 1

    def _finished(self, added, error, render):
        self._update_buttons()
        if error is None:
            self.progress.setValue(100)
            if not render:
                self.message.setText("Inverted. Move a slider to preview the edit; Apply adds it as a layer group.")
                return
            run = self.ext.running
            how = " (re-rendered the cached inversion)" if run is not None and run.reused else \
                " (from the preview)" if run is None else ""
            self.message.setText("Added %s%s." % (", ".join(g.name() for g, _l, _m in added), how))
        elif isinstance(error, cl.JobCancelled):
            self.message.setText("Cancelled. Nothing was added.")
        else:
            self.message.setText("<b>%s</b>" % _escape(str(error)))

    # --- closing ---

    def _cleanup(self):
        """Closing cancels a running job and removes the preview layer (nothing half-done stays behind)."""
        if self.ext.busy():
            self.ext.cancel()
        self._drop_preview_layer()
        self.preview, self.preview_target = None, None
        self._save_settings()

    def closeEvent(self, event):
        self._cleanup()
        event.accept()

    def reject(self):  # Esc
        self._cleanup()
        super().reject()
