"""The Latent Edit dialog (non-modal): server status, model, method, edit sliders with the model's default
strengths, feather, Apply / Cancel, and "Batch over selected layers". All server calls run off the UI thread."""
from __future__ import annotations

from krita import Krita

from . import model, settings
from ._common import client as cl
from .qt import Qt, QtWidgets

SLIDER_SCALE = 100  # slider ticks per strength unit


def direction_specs(model_info: dict) -> list:
    """[(name, default_strength, lo, hi, description)] from a /v1/models entry (names or dicts)."""
    out = []
    for d in model_info.get("directions") or []:
        if isinstance(d, str):
            out.append((d, 1.0, -3.0, 3.0, ""))
            continue
        lo, hi = (d.get("range") or [-3.0, 3.0])[:2]
        out.append((str(d["name"]), float(d.get("default_strength", 1.0)), float(lo), float(hi),
                    str(d.get("description") or "")))
    return out


class EditRow:
    def __init__(self, grid: QtWidgets.QGridLayout, row: int, name, default, lo, hi, description):
        self.name, self.default = name, default
        self.check = QtWidgets.QCheckBox(name)
        self.check.setToolTip(description)
        self.slider = QtWidgets.QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(int(lo * SLIDER_SCALE), int(hi * SLIDER_SCALE))
        self.spin = QtWidgets.QDoubleSpinBox()
        self.spin.setRange(lo, hi)
        self.spin.setSingleStep(0.1)
        self.spin.setDecimals(2)
        self.spin.setValue(default)
        self.slider.setValue(int(round(default * SLIDER_SCALE)))
        self.slider.valueChanged.connect(lambda v: self.spin.setValue(v / SLIDER_SCALE))
        self.spin.valueChanged.connect(lambda v: self.slider.setValue(int(round(v * SLIDER_SCALE))))
        self.check.toggled.connect(self._enable)
        self._enable(False)
        grid.addWidget(self.check, row, 0)
        grid.addWidget(self.slider, row, 1)
        grid.addWidget(self.spin, row, 2)

    def _enable(self, on):
        self.slider.setEnabled(on)
        self.spin.setEnabled(on)

    def edit(self):
        return (self.name, round(self.spin.value(), 3)) if self.check.isChecked() else None


class LatentEditDialog(QtWidgets.QDialog):
    def __init__(self, ext):
        super().__init__(Krita.instance().activeWindow().qwindow())
        self.ext = ext
        self.setWindowTitle("Latent Edit")
        self.models = []
        self.rows = []
        self.conf = settings.load(Krita.instance())
        lay = QtWidgets.QVBoxLayout(self)

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
        self.server_status = QtWidgets.QLabel("not checked")
        self.server_status.setWordWrap(True)
        check = QtWidgets.QPushButton("Connect")
        check.clicked.connect(self.refresh)
        form.addRow("URL", self.url)
        form.addRow("Token file", tok)
        form.addRow(check, self.server_status)
        lay.addWidget(server)

        opts = QtWidgets.QGroupBox("Inversion")
        form = QtWidgets.QFormLayout(opts)
        self.model_box = QtWidgets.QComboBox()
        self.model_box.currentIndexChanged.connect(self._model_changed)
        self.method_box = QtWidgets.QComboBox()
        for m in model.METHODS:
            self.method_box.addItem(model.METHOD_LABELS[m], m)
        self.method_box.setCurrentIndex(max(0, model.METHODS.index(self.conf.method) if self.conf.method in model.METHODS else 0))
        self.align = QtWidgets.QCheckBox("Detect and align the face")
        self.align.setChecked(True)
        self.steps = QtWidgets.QSpinBox()
        self.steps.setRange(0, 5000)
        self.steps.setSpecialValueText("method default")
        self.steps.setValue(self.conf.project_steps)
        self.feather = QtWidgets.QDoubleSpinBox()
        self.feather.setRange(0.0, 256.0)
        self.feather.setSuffix(" px")
        self.feather.setValue(self.conf.feather)
        form.addRow("Model", self.model_box)
        form.addRow("Method", self.method_box)
        form.addRow("", self.align)
        form.addRow("Projection steps", self.steps)
        form.addRow("Feather", self.feather)
        lay.addWidget(opts)

        edits = QtWidgets.QGroupBox("Edits")
        v = QtWidgets.QVBoxLayout(edits)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidgetResizable(True)
        inner = QtWidgets.QWidget()
        self.grid = QtWidgets.QGridLayout(inner)
        scroll.setWidget(inner)
        v.addWidget(scroll)
        lay.addWidget(edits)

        self.batch = QtWidgets.QCheckBox("Batch over selected layers")
        self.use_selection = QtWidgets.QCheckBox("Only inside the selection (whole layer when nothing is selected)")
        self.use_selection.setChecked(True)
        lay.addWidget(self.use_selection)
        lay.addWidget(self.batch)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 100)
        self.message = QtWidgets.QLabel("")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.progress)
        lay.addWidget(self.message)
        buttons = QtWidgets.QHBoxLayout()
        self.apply_btn = QtWidgets.QPushButton("Apply")
        self.apply_btn.clicked.connect(self.apply)
        self.cancel_btn = QtWidgets.QPushButton("Cancel job")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.ext.cancel)
        close = QtWidgets.QPushButton("Close")
        close.clicked.connect(self.hide)
        buttons.addStretch(1)
        for b in (self.apply_btn, self.cancel_btn, close):
            buttons.addWidget(b)
        lay.addLayout(buttons)
        self.resize(460, 640)

    # --- settings and server ---

    def _browse(self):
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Token file", self.token.text() or settings.default_token_file())
        if path:
            self.token.setText(path)

    def _save_settings(self) -> settings.Settings:
        c = self.conf
        c.server_url, c.token_file = self.url.text().strip() or cl.DEFAULT_URL, self.token.text().strip()
        c.method, c.feather, c.project_steps = self.method_box.currentData(), self.feather.value(), self.steps.value()
        c.model = self.model_box.currentData() or ""
        settings.save(Krita.instance(), c)
        return c

    def refresh(self):
        from .extension import in_background

        try:
            client = self._save_settings().client()
        except cl.ClientError as e:
            self.server_status.setText(str(e))
            return
        self.server_status.setText("connecting…")

        def fetch():
            health = client.health()
            return health, client.models()

        def done(result, error):
            if error is not None:
                self.server_status.setText("<b>%s</b>" % _escape(str(error)))
                return
            health, models = result
            self.server_status.setText("connected: server %s on %s, perceptual loss %s" % (
                health.get("version", "?"), health.get("device", "?"), health.get("perceptual_backbone", "?")))
            self._set_models(models, health.get("default_model"))

        in_background(fetch, done)

    def _set_models(self, models, default):
        self.models = models
        self.model_box.blockSignals(True)
        self.model_box.clear()
        for m in models:
            self.model_box.addItem("%s (%s px)" % (m.get("name"), m.get("resolution", "?")), m.get("name"))
        want = self.conf.model or default
        idx = max(0, self.model_box.findData(want))
        self.model_box.blockSignals(False)
        self.model_box.setCurrentIndex(idx)
        self._model_changed(idx)

    def _model_changed(self, idx):
        while self.grid.count():
            w = self.grid.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.rows = []
        if 0 <= idx < len(self.models):
            for r, spec in enumerate(direction_specs(self.models[idx])):
                self.rows.append(EditRow(self.grid, r, *spec))

    # --- apply ---

    def apply(self):
        conf = self._save_settings()
        app = Krita.instance()
        doc = app.activeDocument()
        if doc is None:
            self.message.setText("Open a document first.")
            return
        nodes = [doc.activeNode()]
        if self.batch.isChecked():
            view = app.activeWindow().activeView()
            selected = [n for n in (view.selectedNodes() if view is not None else []) if n.type() == "paintlayer"]
            nodes = selected or nodes
        options = model.EditOptions(
            edits=[e for e in (r.edit() for r in self.rows) if e is not None], model=conf.model or None,
            method=conf.method, align="auto" if self.align.isChecked() else "none", feather=conf.feather,
            project_steps=conf.project_steps or None, use_selection=self.use_selection.isChecked())
        try:
            client = conf.client()
        except cl.ClientError as e:
            self.message.setText(str(e))
            return
        self.apply_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.message.setText("starting…")
        self.ext.apply(nodes, options, client, on_finished=self._finished, on_status=self._status)

    def _status(self, st):
        self.progress.setValue(int(round(st.progress * 100)))
        self.message.setText("%s %s" % (st.stage, st.message) if st.message != st.stage else st.message)

    def _finished(self, added, error):
        self.apply_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        if error is None:
            self.progress.setValue(100)
            reused = getattr(self.ext.running, "reused", 0)
            self.message.setText("Added %s%s." % (", ".join(g.name() for g, _l, _m in added),
                                                  " (re-rendered the cached inversion)" if reused else ""))
        elif isinstance(error, cl.JobCancelled):
            self.message.setText("Cancelled; nothing was added.")
        else:
            self.message.setText("<b>%s</b>" % _escape(str(error)))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
