"""Install / uninstall the editor plugins (called by install.py; stdlib only).

Krita: ``<pykrita>/latent_edit.desktop`` + ``<pykrita>/latent_edit/`` (the package, with ``plugins/common``
copied inside it as ``latent_edit/common/``), and ``enable_latent_edit=true`` in kritarc's ``[python]``
group — without that line Krita does not load the plugin. Default locations (Linux):
``$XDG_DATA_HOME/krita/pykrita`` and ``$XDG_CONFIG_HOME/kritarc``.

GIMP 3: ``<plug-ins>/latent-edit/`` holds the contents of ``plugins/gimp/latent-edit/`` plus
``plugins/common`` copied as ``latent-edit/common/`` (GIMP loads a plug-in only from a same-name folder).
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = HERE / "common"
KRITA_NAME = "latent_edit"
GIMP_NAME = "latent-edit"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def default_pykrita_dir() -> Path:
    if sys.platform.startswith("win"):
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "krita" / "pykrita"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "krita" / "pykrita"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "krita" / "pykrita"


def default_kritarc() -> Path:
    if sys.platform.startswith("win"):
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "kritarc"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Preferences" / "kritarc"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kritarc"


def _copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=_IGNORE)


def set_ini_value(path: Path, group: str, key: str, value) -> None:
    """Set ``key=value`` in ``[group]`` of an INI-like file (kritarc), keeping every other line as it is.

    configparser is not used: it would rewrite Krita's keys (case, escapes, ordering).
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    header = "[%s]" % group
    out, in_group, done, seen_group = [], False, False, False
    for line in lines:
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            if in_group and not done and value is not None:
                out.append("%s=%s" % (key, value))
                done = True
            in_group = s == header
            seen_group = seen_group or in_group
            out.append(line)
            continue
        if in_group and s.split("=", 1)[0].strip() == key:
            if value is not None and not done:
                out.append("%s=%s" % (key, value))
                done = True
            continue  # replaced (or removed when value is None)
        out.append(line)
    if value is not None and not done:
        if in_group:
            out.append("%s=%s" % (key, value))
        else:
            if out and out[-1].strip():
                out.append("")
            out += [header, "%s=%s" % (key, value)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def install_krita(pykrita_dir=None, kritarc_path=None) -> Path:
    """Copy the Krita plugin and enable it; returns the installed package folder. Idempotent."""
    pykrita = Path(pykrita_dir) if pykrita_dir else default_pykrita_dir()
    kritarc = Path(kritarc_path) if kritarc_path else default_kritarc()
    src = HERE / "krita"
    pykrita.mkdir(parents=True, exist_ok=True)
    pkg = pykrita / KRITA_NAME
    _copy_tree(src / KRITA_NAME, pkg)
    _copy_tree(COMMON, pkg / "common")
    shutil.copy2(src / (KRITA_NAME + ".desktop"), pykrita / (KRITA_NAME + ".desktop"))
    set_ini_value(kritarc, "python", "enable_" + KRITA_NAME, "true")
    return pkg


def uninstall_krita(pykrita_dir=None, kritarc_path=None) -> None:
    """Remove what install_krita added (the package, the .desktop file and the enable line)."""
    pykrita = Path(pykrita_dir) if pykrita_dir else default_pykrita_dir()
    kritarc = Path(kritarc_path) if kritarc_path else default_kritarc()
    shutil.rmtree(pykrita / KRITA_NAME, ignore_errors=True)
    desktop = pykrita / (KRITA_NAME + ".desktop")
    if desktop.exists():
        desktop.unlink()
    if kritarc.exists():
        set_ini_value(kritarc, "python", "enable_" + KRITA_NAME, None)


def default_gimp_plugins_dir() -> Path:
    if sys.platform.startswith("win"):
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "GIMP" / "3.0" / "plug-ins"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "GIMP" / "3.0" / "plug-ins"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "GIMP" / "3.0" / "plug-ins"


def install_gimp(plugins_dir=None) -> Path:
    """Copy ``plugins/gimp/latent-edit/`` + ``plugins/common`` into GIMP's ``plug-ins/latent-edit/``."""
    src = HERE / "gimp" / GIMP_NAME
    if not src.is_dir():
        raise FileNotFoundError("the GIMP plug-in sources are missing: %s" % src)
    dst = (Path(plugins_dir) if plugins_dir else default_gimp_plugins_dir()) / GIMP_NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    _copy_tree(src, dst)
    _copy_tree(COMMON, dst / "common")
    entry = dst / (GIMP_NAME + ".py")
    if entry.exists():  # GIMP runs the same-name script; it must be executable
        entry.chmod(entry.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return dst


def uninstall_gimp(plugins_dir=None) -> None:
    shutil.rmtree((Path(plugins_dir) if plugins_dir else default_gimp_plugins_dir()) / GIMP_NAME, ignore_errors=True)


def _tree_differences(src: Path, dst: Path) -> list:
    """Files of ``src`` (caches ignored) that are missing from ``dst`` or differ from it."""
    out = []
    for f in sorted(src.rglob("*")):
        if not f.is_file() or "__pycache__" in f.parts or f.suffix in (".pyc", ".pyo"):
            continue
        target = dst / f.relative_to(src)
        if not target.is_file() or target.read_bytes() != f.read_bytes():
            out.append(target)
    return out


def _ini_value(path: Path, group: str, key: str):
    """The value of ``key`` in ``[group]`` of an INI-like file, or None."""
    if not path.exists():
        return None
    in_group = False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            in_group = s == "[%s]" % group
        elif in_group and "=" in s and s.split("=", 1)[0].strip() == key:
            return s.split("=", 1)[1].strip()
    return None


def check_krita(pykrita_dir=None, kritarc_path=None) -> list:
    """What install_krita would still change, as messages (empty: installed and current)."""
    pykrita = Path(pykrita_dir) if pykrita_dir else default_pykrita_dir()
    kritarc = Path(kritarc_path) if kritarc_path else default_kritarc()
    src, pkg = HERE / "krita", pykrita / KRITA_NAME
    stale = _tree_differences(src / KRITA_NAME, pkg) + _tree_differences(COMMON, pkg / "common")
    desktop = pykrita / (KRITA_NAME + ".desktop")
    if not desktop.is_file() or desktop.read_bytes() != (src / (KRITA_NAME + ".desktop")).read_bytes():
        stale.append(desktop)
    missing = ["Krita plugin file %s (missing or outdated)" % p for p in stale[:3]]
    if len(stale) > 3:
        missing.append("… and %d more Krita plugin files" % (len(stale) - 3))
    if _ini_value(kritarc, "python", "enable_" + KRITA_NAME) != "true":
        missing.append("Krita plugin not enabled in %s" % kritarc)
    return missing


def check_gimp(plugins_dir=None) -> list:
    """What install_gimp would still change, as messages (empty: installed and current)."""
    dst = (Path(plugins_dir) if plugins_dir else default_gimp_plugins_dir()) / GIMP_NAME
    stale = _tree_differences(HERE / "gimp" / GIMP_NAME, dst) + _tree_differences(COMMON, dst / "common")
    missing = ["GIMP plug-in file %s (missing or outdated)" % p for p in stale[:3]]
    if len(stale) > 3:
        missing.append("… and %d more GIMP plug-in files" % (len(stale) - 3))
    entry = dst / (GIMP_NAME + ".py")
    if entry.is_file() and not os.access(entry, os.X_OK):
        missing.append("GIMP plug-in %s is not executable" % entry)
    return missing
