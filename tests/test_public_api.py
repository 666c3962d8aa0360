"""The curated public API: names users, docs and examples rely on."""

from __future__ import annotations

import subprocess
import sys

import jaxfp4
import jaxfp4.nn

NO_TORCH = (
    "import sys, jaxfp4, jaxfp4.nn, jaxfp4.checkpoint\n"
    "bad = [m for m in ('torch', 'compressed_tensors', 'transformers') if m in sys.modules]\n"
    "print(bad)\n"
    "sys.exit(bool(bad))\n"
)


def test_public_names():
    for name in ("load_checkpoint", "dequantize", "fp4_linear", "Checkpoint", "CheckpointError", "make_params"):
        assert name in jaxfp4.__all__ and hasattr(jaxfp4, name)
    assert jaxfp4.nn.Fp4Linear.__name__ == "Fp4Linear"


def test_import_needs_no_torch():
    """``import jaxfp4`` (the package, layers and loader) must not import torch or any reference library."""
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
