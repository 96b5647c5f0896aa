"""Qt bindings: PyQt5 (Krita 5) or PyQt6 (Krita 6). Enums are written fully scoped
(``Qt.Orientation.Horizontal``), which both bindings accept."""
try:
    from PyQt5.QtCore import Qt, QTimer  # noqa: F401
    from PyQt5 import QtWidgets  # noqa: F401
except ImportError:  # Krita 6
    from PyQt6.QtCore import Qt, QTimer  # noqa: F401
    from PyQt6 import QtWidgets  # noqa: F401
