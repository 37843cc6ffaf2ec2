"""Factories for small models written in the test's temporary folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

StateDict = dict[str, np.ndarray]


def tiny_state_dict(seed: int = 0) -> StateDict:
    """A few tensors of mixed dtypes and ranks, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return {
        "encoder.layer.0.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "encoder.layer.0.bias": rng.standard_normal(16).astype(np.float32),
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float16),
        "embed.ids": np.arange(7, dtype=np.int64),
        "scale": np.array(2.5, dtype=np.float32),
    }


@pytest.fixture
def write_safetensors(tmp_path: Path) -> Callable[..., Path]:
    """Write a state dict as safetensors under tmp_path and return the path."""

    def write(
        sd: StateDict | None = None, name: str = "model.safetensors", **metadata: str
    ) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd if sd is not None else tiny_state_dict(), str(path), metadata=metadata or None)
        return path

    return write
