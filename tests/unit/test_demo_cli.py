"""``python -m core demo``: writes the before/after sheet, and bad input is a clear message, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "core", "demo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_demo_writes_a_sheet_with_input_inversion_and_each_edit(tmp_path):
    proc = run_demo("--out", str(tmp_path), "--steps", "5", "--tune-steps", "2", "--edits", "hair_color,beard:-2")
    assert proc.returncode == 0, proc.stderr
    sheet = Path(proc.stdout.strip().splitlines()[-1])
    assert sheet == (tmp_path / "before_after.png").resolve()
    w, h = Image.open(sheet).size
    assert h == 256 + 22 and w == 4 * (256 + 6) - 6  # input, inversion, two edits
    assert Image.open(tmp_path / "input.png").size == (256, 256)


def test_demo_bad_input_is_one_clear_line(tmp_path):
    missing = run_demo("--photo", str(tmp_path / "nope.png"), "--out", str(tmp_path))
    assert missing.returncode == 1 and "cannot read the photo" in missing.stderr and "Traceback" not in missing.stderr
    unknown = run_demo("--edits", "nosuch", "--out", str(tmp_path))
    assert unknown.returncode == 1 and "unknown edit(s) ['nosuch']" in unknown.stderr and "smile" in unknown.stderr
    bad = run_demo("--edits", "smile:lots", "--out", str(tmp_path))
    assert bad.returncode == 1 and "must be a number" in bad.stderr and "Traceback" not in bad.stderr


def test_demo_pti_starts_from_the_encoder_when_the_model_has_one(tmp_path):
    """--pivot auto (the default) is the server's rule (core.session.default_pivot): the embedded model ships an
    encoder, so PTI starts from its code; --pivot w is PTI's own; a checkpoint without one says what to add."""
    from core.demo import default_encoder_path
    from core.stylegan2.formats import save_generator
    from tests.conftest import make_tiny_generator

    auto = run_demo("--out", str(tmp_path), "--tune-steps", "2", "--edits", "beard")
    assert auto.returncode == 0, auto.stderr
    want = "from the encoder" if default_encoder_path().is_file() else "from the W projection"
    assert f"method pti {want}," in auto.stdout, auto.stdout
    own = run_demo("--out", str(tmp_path), "--pivot", "w", "--steps", "3", "--tune-steps", "2", "--edits", "beard")
    assert own.returncode == 0 and "method pti from the W projection," in own.stdout, own.stderr
    save_generator(make_tiny_generator(resolution=32, w_dim=32, seed=1), tmp_path / "plain.pt")
    none = run_demo("--model", str(tmp_path / "plain.pt"), "--pivot", "encoder", "--out", str(tmp_path))
    assert none.returncode == 1 and "plain.encoder.pt" in none.stderr and "Traceback" not in none.stderr
