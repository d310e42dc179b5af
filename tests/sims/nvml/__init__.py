"""The NVML stand-in (`pynvml.py` here): load it in-process, or put FAKE_DIR first on a child's PYTHONPATH."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

FAKE_DIR = Path(__file__).parent


def load_fake(config: dict[str, Any]) -> ModuleType:
    """A fresh copy of the stand-in answering from `config`."""
    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CONFIG = config
    return module


def write_config(path: Path, config: dict[str, Any]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
