"""Read PyTorch's legacy (pre-zip) ``torch.save`` files into numpy, without PyTorch.

Why: the ImageNet EfficientNet-Lite0 weights we use offline ship as a legacy ``.pth`` file, and
PyTorch is not a dependency. ``pickle.load`` on such a file could run arbitrary code, so the
unpickler here only resolves an allow-list of names, each mapped to an inert local stand-in.

Layout of a legacy file: four pickles (magic number, protocol version, sys info, the object whose
tensors reference storages through persistent ids), a pickled list of storage keys, then for each
key in that order an 8-byte little-endian element count followed by the storage's raw bytes.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["LEGACY_MAGIC_NUMBER", "LEGACY_PROTOCOL_VERSION", "load_legacy_state_dict"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> little-endian numpy dtype of its elements (bfloat16 has no numpy dtype).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: all we need from it is the element dtype."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """What a persistent id says about a storage; its bytes come later in the file."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as pickled: a view (offset, size, stride in elements) into a storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_ignored: Any,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; requires_grad and hooks are irrelevant."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the names a legacy state dict needs, and records storages."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a .pth file")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names no storage type: {pid!r}")
        if view_metadata is not None:
            raise pickle.UnpicklingError("storage views (pre-1.0 torch files) are not supported")
        ref = _StorageRef(str(key), storage_type.dtype, int(numel))
        known = self.storages.setdefault(ref.key, ref)
        if known != ref:
            raise pickle.UnpicklingError(f"storage {ref.key} is declared twice differently")
        return ref


def _read_header(file: BinaryIO) -> None:
    """Check magic number, protocol version and byte order, so a wrong file fails clearly."""
    if _RestrictedUnpickler(file).load() != LEGACY_MAGIC_NUMBER:
        raise ValueError("not a legacy torch.save file (magic number mismatch)")
    version = _RestrictedUnpickler(file).load()
    if version != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"unsupported legacy protocol version {version!r}")
    sys_info = _RestrictedUnpickler(file).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise ValueError("only little-endian legacy files are supported")


def _read_storages(file: BinaryIO, refs: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    """Read the raw storages, in the order of the pickled key list that precedes them."""
    keys = _RestrictedUnpickler(file).load()
    if not isinstance(keys, list) or set(keys) != set(refs):
        raise ValueError("storage key list does not match the storages the tensors reference")
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        ref = refs[key]
        numel = int.from_bytes(file.read(8), "little", signed=True)
        if numel != ref.numel or numel < 0:
            raise ValueError(f"storage {key}: {numel} elements on disk, {ref.numel} declared")
        raw = file.read(numel * ref.dtype.itemsize)
        if len(raw) != numel * ref.dtype.itemsize:
            raise ValueError(f"storage {key}: file ends before its data")
        arrays[key] = np.frombuffer(raw, dtype=ref.dtype)
    return arrays


def _materialize(name: str, ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """Copy a strided view out of its storage, after checking it stays inside the storage."""
    dims = list(zip(ref.size, ref.stride, strict=False))
    if len(ref.size) != len(ref.stride) or ref.offset < 0 or any(n < 0 or s < 0 for n, s in dims):
        raise ValueError(f"{name}: bad view {ref.offset=} {ref.size=} {ref.stride=}")
    if 0 in ref.size:
        return np.empty(ref.size, dtype=storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in dims)
    if last >= storage.size:
        raise ValueError(f"{name}: view reaches outside its storage of {storage.size} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C", copy=True)


def _load(file: BinaryIO) -> dict[str, np.ndarray]:
    _read_header(file)
    unpickler = _RestrictedUnpickler(file)
    state = unpickler.load()
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, found {type(state).__name__}")
    storages = _read_storages(file, unpickler.storages)
    tensors: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise ValueError(f"state dict entry {name!r} is not a tensor")
        tensors[str(name)] = _materialize(name, ref, storages[ref.storage.key])
    return tensors


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a legacy-format PyTorch state dict as ``{name: numpy array}``, in file order.

    Raises ``pickle.UnpicklingError`` if the pickle references anything outside the allow-list,
    and ``ValueError`` for a file that is not a well-formed legacy state dict.
    """
    data = Path(path).read_bytes()
    if data[:2] == b"PK":
        raise ValueError(f"{path} is a zip-format torch file; only the legacy format is supported")
    return _load(io.BytesIO(data))
