"""Unpickling that can never run code: plain containers of numpy arrays only.

A pickle may name any importable callable and have it called while it loads, so a
data file in pickle format is a program. The project reads two such files: the
CIFAR-10 python release's batches (``data/cifar.py``) and the LPIPS backbone weights
(fetched by the ``make weights`` tool, ``scripts/lpips_weights.py``). Both go through :class:`NumpyArrayUnpickler`, which
resolves only the globals numpy's arrays are rebuilt from and refuses every other
global, and every persistent id, before anything is called. Dicts, lists, tuples,
bytes, strings and numbers need no global at all.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global other than numpy's array reconstruction."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 writes for ``bytes`` at protocol 2 (``_codecs.encode(text, 'latin1')``), admitted only so."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"Refused to unpickle: '_codecs.encode' called with encoding {encoding!r}; only the 'latin1' "
            "form protocol 2 writes for bytes is allowed."
        )
    return text.encode("latin1")


def _numpy_reconstruct():
    # NumPy 2 moved numpy.core to numpy._core (numpy.core remains as a deprecated alias).
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays and nothing else.

    Resolves only ``numpy.core.multiarray._reconstruct`` (or NumPy 2's ``numpy._core``
    spelling), ``numpy.ndarray`` and ``numpy.dtype``; any other global or a persistent
    id raises :class:`UnsafePickleError` naming it, before it is called. ``_codecs.encode``
    (bytes written by Python 3 at protocol 2) resolves to a function that accepts only the
    ``latin1`` encoding of a string.
    """

    ALLOWED_GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"Refused to unpickle: the pickle names the global '{module}.{name}'; only numpy's array "
                f"globals are allowed ({', '.join(sorted(f'{m}.{n}' for m, n in self.ALLOWED_GLOBALS))})."
            )
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("Refused to unpickle: the pickle uses a persistent id; plain numpy arrays have none.")


def load_numpy_pickle(data: bytes, encoding: str = "ASCII") -> Any:
    """Unpickle ``data`` with :class:`NumpyArrayUnpickler` (numpy's array globals only).

    ``encoding`` is how Python 2 strings are read (``"bytes"`` keeps them as bytes, as the
    CIFAR-10 release needs).
    """
    return NumpyArrayUnpickler(io.BytesIO(data), encoding=encoding).load()
