"""`open_clip` adapter: lazy import with an install hint (torchvision is missing here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mmrag.encoders.base import EncoderSpec, load_encoder
from mmrag.encoders.open_clip import INSTALL_HINT, OpenClipEncoder, import_open_clip, parse_spec


def test_spec_is_model_name_colon_checkpoint() -> None:
    assert parse_spec("ViT-B-32:/ckpt/open_clip_model.safetensors") == (
        "ViT-B-32",
        Path("/ckpt/open_clip_model.safetensors"),
    )
    for bad in ("ViT-B-32", ":file.bin", "ViT-B-32:"):
        with pytest.raises(ValueError, match="MODEL_NAME:CHECKPOINT_FILE"):
            parse_spec(bad)


def test_missing_checkpoint_file_is_reported_before_importing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        OpenClipEncoder.from_spec(f"ViT-B-32:{tmp_path / 'absent.bin'}")


def test_failed_import_raises_importerror_with_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(b"\0")
    with pytest.raises(ImportError, match="pip install open_clip_torch torchvision") as info:
        load_encoder(EncoderSpec(name="open_clip", path=f"ViT-B-32:{checkpoint}"))
    assert INSTALL_HINT in str(info.value)


def test_open_clip_imports_where_torchvision_works() -> None:
    try:
        open_clip = import_open_clip()
    except ImportError as e:
        pytest.skip(f"open_clip unavailable (needs torchvision, see FINDINGS.md): {e}")
    assert hasattr(open_clip, "create_model_and_transforms")
