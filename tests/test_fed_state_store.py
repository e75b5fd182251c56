"""The device's encrypted personal-state store (client/state_store.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from client.state_store import STATE_FILE, EncryptedStateStore, StateKeyError, create_device_key


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"theta": torch.randn(2, 8, generator=g), "step": torch.tensor([7], dtype=torch.int64)}


def test_roundtrip_key_mode_and_ciphertext(tmp_path: Path) -> None:
    store = EncryptedStateStore(tmp_path / "s", tmp_path / "s" / "device.key")
    assert store.load() is None
    t = _tensors()
    path = store.save(t, {"model-fingerprint": "abc", "round": "1"})
    assert stat.S_IMODE((tmp_path / "s" / "device.key").stat().st_mode) == 0o600
    blob = path.read_bytes()
    assert t["theta"].numpy().tobytes() not in blob  # encrypted at rest
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())
    loaded, meta = EncryptedStateStore(tmp_path / "s", tmp_path / "s" / "device.key").load()  # type: ignore[misc]
    assert torch.equal(loaded["theta"], t["theta"]) and meta == {"model-fingerprint": "abc", "round": "1"}


def test_wrong_key_is_an_error_and_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    EncryptedStateStore(tmp_path, key).save(_tensors(), {})
    before = (tmp_path / STATE_FILE).read_bytes()
    other = tmp_path / "other.key"
    create_device_key(other)
    wrong = EncryptedStateStore(tmp_path, other)
    with pytest.raises(StateKeyError, match="cannot decrypt"):
        wrong.load()
    with pytest.raises(StateKeyError, match="cannot decrypt"):
        wrong.save(_tensors(1), {})  # save verifies first: the old state survives
    assert (tmp_path / STATE_FILE).read_bytes() == before


def test_lost_key_is_an_error(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    EncryptedStateStore(tmp_path, key).save(_tensors(), {})
    key.unlink()
    with pytest.raises(StateKeyError, match="missing"):
        EncryptedStateStore(tmp_path, key).load()
    assert not key.exists()  # no new key was made behind the user's back


def test_permissive_key_and_tampering_are_refused(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    store = EncryptedStateStore(tmp_path, key)
    store.save(_tensors(), {})
    os.chmod(key, 0o644)
    with pytest.raises(StateKeyError, match="0600"):
        EncryptedStateStore(tmp_path, key).load()
    os.chmod(key, 0o600)
    blob = bytearray((tmp_path / STATE_FILE).read_bytes())
    blob[-1] ^= 1
    (tmp_path / STATE_FILE).write_bytes(bytes(blob))
    with pytest.raises(StateKeyError, match="tampered"):
        EncryptedStateStore(tmp_path, key).load()
