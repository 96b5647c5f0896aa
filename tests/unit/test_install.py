"""install.py: plugins and token steps, idempotence, --check / --uninstall, and bad environments.

The virtual-environment step itself is exercised by the README's first command (CI runs it); here it is
taken as present so these tests stay at seconds."""
from __future__ import annotations

import importlib.util
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("install_script", ROOT / "install.py")
install = importlib.util.module_from_spec(spec)
sys.modules["install_script"] = install  # dataclasses look their module up while the class is built
spec.loader.exec_module(install)


@pytest.fixture
def inst(tmp_path, monkeypatch):
    """An Installer whose venv counts as installed, with every host folder under tmp_path."""
    monkeypatch.setattr(install.Installer, "venv_missing", lambda self: [])
    venv = tmp_path / "venv"
    venv.mkdir()
    return install.Installer(venv=venv, krita_dir=tmp_path / "pykrita", kritarc=tmp_path / "kritarc",
                             gimp_dir=tmp_path / "gimp" / "plug-ins", data_dir=tmp_path / "data", weights=[])


def test_install_then_nothing_to_do_then_check_ok(inst, capsys):
    assert inst.check() == 1
    missing = capsys.readouterr().out
    assert "Krita plugin" in missing and "GIMP plug-in" in missing and "auth token" in missing
    assert inst.install() == 0
    assert "Latent Edit is installed." in capsys.readouterr().out
    assert (inst.krita_dir / "latent_edit" / "common" / "client.py").is_file()
    assert "enable_latent_edit=true" in inst.kritarc.read_text()
    entry = inst.gimp_dir / "latent-edit" / "latent-edit.py"
    assert entry.stat().st_mode & stat.S_IXUSR
    token = inst.data_dir / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) >= 32
    before = {p: p.stat().st_mtime_ns for p in inst.venv.parent.rglob("*") if p.is_file()}
    assert inst.install() == 0
    assert "nothing to do" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in inst.venv.parent.rglob("*") if p.is_file()}
    assert before == after, "a second run changed files"
    assert inst.check() == 0


def test_check_notices_an_outdated_plugin_file(inst, capsys):
    inst.install()
    (inst.gimp_dir / "latent-edit" / "common" / "flow.py").write_text("# edited by hand\n")
    assert inst.check() == 1
    assert "flow.py" in capsys.readouterr().out
    inst.install()
    assert inst.check() == 0


def test_uninstall_removes_what_was_added(inst, capsys, tmp_path):
    inst.kritarc.write_text("[General]\nfoo=bar\n")
    inst.install()
    assert inst.uninstall() == 0
    assert not (inst.krita_dir / "latent_edit").exists()
    assert not (inst.gimp_dir / "latent-edit").exists()
    assert "enable_latent_edit" not in inst.kritarc.read_text() and "foo=bar" in inst.kritarc.read_text()
    assert not inst.venv.exists()
    capsys.readouterr()
    assert inst.check() == 1  # after uninstall, --check fails and lists what is missing
    assert "Krita plugin" in capsys.readouterr().out


def test_host_not_installed_is_a_note_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install.Installer, "venv_missing", lambda self: [])
    monkeypatch.setattr(install, "krita_present", lambda: False)
    monkeypatch.setattr(install, "gimp_present", lambda: False)
    (tmp_path / "venv").mkdir()
    inst = install.Installer(venv=tmp_path / "venv", data_dir=tmp_path / "data")
    assert inst.install() == 0
    out = capsys.readouterr().out
    assert "Krita not found: Krita plugin skipped" in out and "GIMP 3 not found" in out


def test_no_write_permission_is_a_clear_error(inst, monkeypatch):
    """A host folder we may not write to (simulated: CI runs as root, which bypasses file modes)."""
    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(install.ip, "install_gimp", refuse)
    with pytest.raises(install.InstallError, match="no write permission for the gimp plugin folder .*--gimp-dir"):
        inst.install_plugins()


def test_unsupported_python_is_refused_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(install, "MIN_PYTHON", (9, 0))
    assert install.main([]) == 2
    assert "is not supported; use Python 9.0" in capsys.readouterr().err


def test_check_flag_from_the_command_line(tmp_path):
    """--check on an empty venv folder exits 1 and names the virtual environment."""
    proc = subprocess.run([sys.executable, str(ROOT / "install.py"), "--check", "--no-plugins",
                           "--venv", str(tmp_path / "none"), "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "virtual environment" in proc.stdout and "auth token" in proc.stdout


def test_the_printed_start_command_works_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install.Installer, "venv_missing", lambda self: [])
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"  # stands for the venv's python (a symlink would lose the venv's site-packages)
    py.write_text("#!/bin/sh\nexec '%s' \"$@\"\n" % sys.executable)
    py.chmod(0o755)
    inst = install.Installer(venv=venv, plugins=False, data_dir=tmp_path / "data", weights=[])
    assert inst.install() == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "start the server:" in x)
    cmd = line.split("start the server:", 1)[1].strip()
    assert cmd == str(install.launcher_path(venv))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([cmd, "--help"], cwd=str(elsewhere), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--data-dir" in proc.stdout, proc.stderr[-2000:]
    assert inst.launcher_missing() == [] and inst.check() == 0


def test_lpips_weights_are_fetched_by_default_and_offline_is_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install.Installer, "venv_missing", lambda self: [])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    asked = []
    monkeypatch.setattr(install.Installer, "_reachable", lambda self, url: asked.append(url) or "no route to host")
    inst = install.Installer(venv=tmp_path / "venv", plugins=False, data_dir=tmp_path / "data")
    assert inst.weights == ["lpips"] and not inst.weights_required
    assert inst.install() == 0  # offline: the install still succeeds ...
    out = capsys.readouterr().out
    assert asked and "note: offline: lpips weights not downloaded" in out and "fallback" in out
    assert inst.check() == 0  # ... and optional weights do not make --check fail
    required = install.Installer(venv=tmp_path / "venv", plugins=False, data_dir=tmp_path / "data",
                                 weights=["lpips"], weights_required=True)
    with pytest.raises(install.InstallError, match="unreachable"):
        required.install()
    args = install.parse_args(["--no-weights"])
    assert args.no_weights
