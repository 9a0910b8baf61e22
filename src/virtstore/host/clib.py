"""C libraries through ctypes, loaded on first use so that a host without one still runs
everything else."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

from virtstore.errors import Unsupported

# ctypes' names, short for the signature tables.
vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int

# A function's (return type, argument types); None: ctypes' default (int, unchecked).
Signature = tuple[Any, list[Any] | None]


class CLibrary:
    """``lib()`` is the library with its functions' types set; Unsupported with the
    message ``missing`` where it is not installed."""

    def __init__(self, name: str, soname: str, missing: str,
                 functions: dict[str, Signature], *, use_errno: bool = True) -> None:
        self.name, self.soname, self.missing = name, soname, missing
        self.functions, self.use_errno = functions, use_errno
        self._lib: ctypes.CDLL | None = None
        self._lock = threading.Lock()

    def __call__(self) -> ctypes.CDLL:
        with self._lock:
            if self._lib is None:
                try:
                    lib = ctypes.CDLL(ctypes.util.find_library(self.name) or self.soname,
                                      use_errno=self.use_errno)
                except OSError as exc:
                    raise Unsupported(self.missing) from exc
                for fname, (restype, argtypes) in self.functions.items():
                    fn = getattr(lib, fname)
                    if restype is not None:
                        fn.restype = restype
                    if argtypes is not None:
                        fn.argtypes = argtypes
                self._lib = lib
            return self._lib

    def available(self) -> bool:
        try:
            self()
        except Unsupported:
            return False
        return True
