"""The device's personal state on disk: encrypted at rest (AES-GCM), written atomically.

The token is the user's personal concept, so it is stored only encrypted, with a key that lives
in a separate device key file (created with 0600 permissions). Layout of the state file:

    MAGIC (8 bytes) | nonce (12 bytes) | AES-256-GCM(safetensors bytes, associated data = MAGIC)

The safetensors payload carries `PersonalState.to_tensors()` plus metadata (model fingerprint,
last round). A lost or wrong key is a clear error and the state file is never overwritten then:
the store refuses to save until it has read (or verified the absence of) the existing state.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAGIC = b"FZDSTv1\x00"
NONCE_BYTES = 12
KEY_BYTES = 32
STATE_FILE = "personal-state.enc"


class StateKeyError(RuntimeError):
    """The device key is missing, malformed, too permissive, or does not decrypt the state."""


def create_device_key(path: Path) -> None:
    """Create a new random 256-bit key file with mode 0600; refuse to replace an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(AESGCM.generate_key(bit_length=KEY_BYTES * 8))
        fh.flush()
        os.fsync(fh.fileno())


def read_device_key(path: Path) -> bytes:
    """Read and check the device key (exists, 32 bytes, not readable by group or others)."""
    if not path.is_file():
        raise StateKeyError(f"device key file {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StateKeyError(f"device key file {path} has mode {oct(mode)}; it must be 0600")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise StateKeyError(f"device key file {path} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


class EncryptedStateStore:
    """Load / save a device's personal state, encrypted with the device key.

    Parameters
    ----------
    state_dir
        directory of the state file.
    key_path
        the device key file. Created on first use only when no state exists yet; if a state
        exists and the key is missing, that is a lost key (StateKeyError), never a fresh start.
    """

    def __init__(self, state_dir: str | Path, key_path: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.key_path = Path(key_path)
        self.path = self.state_dir / STATE_FILE
        self._verified = False

    def _key(self) -> bytes:
        if not self.key_path.exists():
            if self.path.exists():
                raise StateKeyError(
                    f"the device key {self.key_path} is missing but an encrypted state exists at "
                    f"{self.path}; restore the key (the state is left untouched)"
                )
            create_device_key(self.key_path)
        return read_device_key(self.key_path)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata) of the saved state, or None when there is none yet."""
        key = self._key()
        if not self.path.exists():
            self._verified = True
            return None
        blob = self.path.read_bytes()
        if blob[: len(MAGIC)] != MAGIC or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
            raise ValueError(f"{self.path} is not a fedzoodip state file (bad header or truncated)")
        nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            payload = AESGCM(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], MAGIC)
        except InvalidTag as exc:
            raise StateKeyError(
                f"cannot decrypt {self.path} with the key in {self.key_path}: wrong key or a "
                "tampered file (the state is left untouched)"
            ) from exc
        tensors = st_load(payload)
        meta = _read_metadata(payload)
        self._verified = True
        return tensors, meta

    def save(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """Encrypt and write atomically (temp file + fsync + rename in the same directory)."""
        if not self._verified:
            # Guarantees that a state we could not read (wrong key) is never replaced.
            self.load()
        key = self._key()
        payload = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        nonce = os.urandom(NONCE_BYTES)  # fresh per write: GCM must never reuse (key, nonce)
        blob = MAGIC + nonce + AESGCM(key).encrypt(nonce, payload, MAGIC)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return self.path


def _read_metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (safetensors' `load` drops it)."""
    import json
    import struct

    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + size])
    return dict(header.get("__metadata__", {}))
