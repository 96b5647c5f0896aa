"""Small widgets and helpers for the dialog: one edit row (tick, slider, value), screen geometry, escaping."""
from __future__ import annotations

from .qt import Qt, QtWidgets

SLIDER_SCALE = 100  # slider ticks per strength unit


class EditRow:
    def __init__(self, grid: QtWidgets.QGridLayout, row: int, name, default, lo, hi, description, on_change):
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
        self.spin.valueChanged.connect(lambda _v: on_change())
        self.check.toggled.connect(self._enable)
        self.check.toggled.connect(lambda _on: on_change())
        self._enable(False)
        self.widgets = (self.check, self.slider, self.spin)
        for col, w in enumerate(self.widgets):
            grid.addWidget(w, row, col)

    def _enable(self, on):
        self.slider.setEnabled(on)
        self.spin.setEnabled(on)

    def set_visible(self, on: bool) -> None:
        for w in self.widgets:
            w.setVisible(on)

    def edit(self):
        return (self.name, round(self.spin.value(), 3)) if self.check.isChecked() else None


def screen_rect(widget):
    """The available geometry of the screen showing ``widget`` (Qt 5 and 6), or None."""
    screen = widget.screen() if hasattr(widget, "screen") else None
    if screen is None and hasattr(QtWidgets.QApplication, "desktop"):
        return QtWidgets.QApplication.desktop().availableGeometry(widget)
    return screen.availableGeometry() if screen is not None else None


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
