"""Reads ``torch.save`` files (``.pt``, ``.ckpt``) with numpy and the standard library only; torch is
not needed.

Layout (``docs/spec/data-notes.md`` §6.6): a zip archive whose single top-level folder (any
name: ``archive/``, or the file stem) holds ``data.pkl`` (a pickle whose tensor storages are
persistent ids ``('storage', <torch.XStorage>, key, location, numel)``), ``data/<key>`` (raw
little-endian storage bytes) and ``byteorder``. Tensors are rebuilt by
``torch._utils._rebuild_tensor_v2``; here that becomes a strided numpy view. Storages are
memory-mapped when the zip entry is stored uncompressed (torch always writes them so), so a
multi-GB file costs no RAM until a slice is read.

Only an allow-list of globals can be unpickled, which also makes loading safe against code in the
pickle:

* tensors, storages, ``torch.Size``, ``collections.OrderedDict`` and a few builtins, also under
  their Python 2 names (``__builtin__.bytes``: protocol-2 pickles of numpy payloads, e.g. an
  empty array, refer to it), mapped with the standard library's own table (``_compat_pickle``);
* numpy arrays and dtypes;
* ``torch_geometric`` objects, as plain dicts of their pickled state (:class:`PygObject`);
* the Lightning callback classes that ``pytorch_lightning`` 1.x checkpoints use as the keys of
  their ``callbacks`` dict (``ModelCheckpoint``, ``EarlyStopping``), as inert class stand-ins
  that cannot be instantiated (:class:`LightningClassRef`).

Everything else is refused with :class:`TorchFileError`.

Public API: :func:`load` (any object) and :func:`pyg_collated` (PyG ``InMemoryDataset`` files,
both the PyG >= 2.4 ``(dict, slices, cls)`` layout and the legacy ``(Data, slices)`` layout).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import zipfile
import zlib
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a readable torch zip file; the message names the file and the fault."""


class PygObject(dict):
    """Stand-in for any pickled ``torch_geometric`` object: a dict of its pickled state."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)
        else:
            self["__state__"] = state


class LightningClassRef(type):
    """Metaclass of the inert stand-ins for Lightning callback classes referenced by a checkpoint.

    ``pytorch_lightning`` 1.x keys a checkpoint's ``callbacks`` dict by the callback classes
    themselves. A stand-in is a class named like the original (``repr`` shows the dotted name),
    usable as a dict key and comparable by identity; it has no behaviour, and instantiating it
    (a pickled callback *instance*) is refused.
    """

    def __repr__(cls):
        return f"<class {cls.__module__}.{cls.__qualname__} (stand-in)>"

    def __call__(cls, *args, **kwargs):
        raise TorchFileError(f"refusing to instantiate {cls.__module__}.{cls.__qualname__}")


def _refuse_new(cls, *args, **kwargs):
    raise TorchFileError(f"refusing to instantiate {cls.__module__}.{cls.__qualname__}")


# The callback classes of Lightning 1.x checkpoints (Frad and MolSpectra pin pytorch_lightning
# 1.3.8). Lightning 2.x writes string keys instead.
_LIGHTNING_CLASSES = {
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"),
}
_lightning_refs: dict[tuple[str, str], type] = {}


def _lightning_ref(module: str, name: str) -> type:
    """One stand-in class per (module, name), so keys from several files compare equal."""
    if (module, name) not in _lightning_refs:
        _lightning_refs[(module, name)] = LightningClassRef(
            name, (), {"__module__": module, "__qualname__": name, "__new__": _refuse_new}
        )
    return _lightning_refs[(module, name)]


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """``(module, name)`` with Python 2 names (``__builtin__``, ``copy_reg``...) mapped to
    Python 3 ones, as ``pickle``'s own ``fix_imports`` does; the allow-list is checked after."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """[size] array = the strided view of ``storage`` starting at element ``offset``."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    n = int(np.prod(size)) if size else 1
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if n == 0:
        return np.zeros(size, storage.dtype)
    if stride == contiguous or n == 1:
        return storage[offset : offset + n].reshape(size)  # a view (lazy for memory maps)
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride]
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, *_unused):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str, mmap: bool):
        super().__init__(file)
        self._archive, self._prefix, self._path, self._mmap = archive, prefix, path, mmap
        self._storages: dict[str, np.ndarray] = {}
        self._file_map: np.ndarray | None = None

    def find_class(self, module, name):
        # Overriding find_class bypasses pickle's own Python 2 name mapping: redo it here.
        module3, name3 = _python3_name(module, name)
        if (module3, name3) in _ALLOWED:
            return _ALLOWED[(module3, name3)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module.startswith("torch_geometric"):
            return type(name, (PygObject,), {"__module__": module})
        if (module, name) in _LIGHTNING_CLASSES:
            return _lightning_ref(module, name)
        raise TorchFileError(
            f"{self._path}: refusing to unpickle {module}.{name} (not a tensor, storage, PyG, "
            "numpy or Lightning callback-key object)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchFileError(f"{self._path}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            if not isinstance(storage_type, _StorageType):
                raise TorchFileError(f"{self._path}: unsupported storage type {storage_type!r}")
            self._storages[key] = self._read_storage(str(key), storage_type.dtype, int(numel))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise TorchFileError(f"{self._path}: tensor storage {name} is missing") from None
        if info.file_size != numel * dtype.itemsize:
            raise TorchFileError(
                f"{self._path}: storage {name} has {info.file_size} bytes, expected "
                f"{numel} x {dtype.itemsize} (truncated or corrupt file)"
            )
        if self._mmap and info.compress_type == zipfile.ZIP_STORED and numel > 0:
            # One memory map of the whole file, sliced per storage: a file with millions of
            # small tensors (e.g. a list of PyG Data objects) must not create one mapping each.
            if self._file_map is None:
                self._file_map = np.memmap(self._path, dtype=np.uint8, mode="r")
            start = info.header_offset
            header = bytes(self._file_map[start : start + 30])
            if header[:4] != b"PK\x03\x04":
                raise TorchFileError(f"{self._path}: corrupt zip header for {name}")
            start += 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            nbytes = numel * dtype.itemsize
            if start + nbytes > self._file_map.size:
                raise TorchFileError(f"{self._path}: storage {name} runs past the end of the file")
            data = self._file_map[start : start + nbytes]
            _check_crc(self._path, info, data)
            return data.view(dtype.newbyteorder("<"))
        data = _read_entry(self._archive, self._path, name)
        return np.frombuffer(data, dtype=dtype.newbyteorder("<")).copy()


def _check_crc(path: str, info: zipfile.ZipInfo, data) -> None:
    """Raises if ``data`` (an entry's bytes, e.g. a memory-mapped slice) does not match the CRC-32
    stored in the zip: the memory-mapped path bypasses zipfile, which would otherwise check it,
    and a flipped bit would be read as a wrong value. Costs one pass over the storage."""
    actual = zlib.crc32(data) & 0xFFFFFFFF
    if actual != info.CRC:
        raise TorchFileError(f"{path}: {info.filename}: CRC-32 mismatch (stored {info.CRC:08x}, "
                             f"data {actual:08x}): the file is corrupt")


def _read_entry(archive: zipfile.ZipFile, path: str, name: str) -> bytes:
    """The whole entry ``name``; zipfile checks its CRC-32 once the last byte is read."""
    try:
        return archive.read(name)
    except zipfile.BadZipFile as e:
        if "CRC" not in str(e):
            raise
        raise TorchFileError(f"{path}: {name}: CRC-32 mismatch ({e}): the file is corrupt") from None


def load(path: str, mmap: bool = True) -> Any:
    """The object saved by ``torch.save`` at ``path``, with tensors as numpy arrays.

    Raises:
      TorchFileError: not a zip-format torch file (e.g. truncated, or the pre-1.6 legacy format),
        big-endian, a storage is missing/short, an entry's CRC-32 does not match its bytes (a
        flipped bit; checked for every entry, memory-mapped ones too, so loading reads the whole
        file once), or the pickle names a non-allowed global.
    """
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchFileError(
            f"{path}: not a readable torch zip file ({e}); the file is truncated/corrupt or uses "
            "the pre-1.6 legacy torch format (re-save it with a current torch)"
        ) from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise TorchFileError(f"{path}: expected one */data.pkl entry, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist():
            order = archive.read(prefix + "byteorder").decode().strip()
            if order != "little":
                raise TorchFileError(f"{path}: byteorder {order!r} is not supported")
        try:
            # Read whole, so the CRC is checked even where the unpickler stops before the end.
            data = io.BytesIO(_read_entry(archive, path, pkl[0]))
            return _Unpickler(data, archive, prefix, path, mmap).load()
        except TorchFileError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
                AttributeError, KeyError) as e:
            raise TorchFileError(f"{path}: corrupt pickle in {pkl[0]} ({type(e).__name__}: {e})") from None


def pyg_collated(obj: Any, path: str = "<pt>") -> tuple[dict, dict]:
    """``(arrays, slices)`` of a PyG ``InMemoryDataset`` file loaded with :func:`load`.

    Graph ``g`` of key ``k`` is ``arrays[k][slices[k][g]:slices[k][g+1]]`` (along the last axis
    for keys containing ``index`` or ``face``); see :func:`graph_item`.
    """
    if not (isinstance(obj, (tuple, list)) and len(obj) >= 2):
        raise TorchFileError(f"{path}: not a PyG InMemoryDataset file (got {type(obj).__name__})")
    data, slices = obj[0], obj[1]
    if isinstance(data, PygObject):  # legacy layout: a collated Data object
        store = data.get("_store", data)
        data = dict(store.get("_mapping", store))
    if not isinstance(data, dict) or not isinstance(slices, dict):
        raise TorchFileError(f"{path}: unexpected PyG layout ({type(data).__name__}, "
                             f"{type(slices).__name__})")
    arrays = {k: v for k, v in data.items() if not str(k).startswith("_")}
    slices = {k: np.asarray(v, np.int64) for k, v in slices.items()}
    return arrays, slices


def graph_item(arrays: dict, slices: dict, key: str, g: int):
    """Value of ``key`` for graph ``g`` (a numpy slice, or a list element for list-valued keys)."""
    lo, hi = int(slices[key][g]), int(slices[key][g + 1])
    value = arrays[key]
    if isinstance(value, list):
        return value[lo] if hi - lo == 1 else value[lo:hi]
    if "index" in key or "face" in key:
        return np.asarray(value[..., lo:hi])
    return np.asarray(value[lo:hi])
