"""A fix for Triton's CPU interpreter (``TRITON_INTERPRET=1``) in the releases where it breaks loop bounds.

In the interpreter every scalar (a program id, an int kernel argument and whatever is computed from them) is
a one-element 1-d numpy array, and ``range(0, n)`` over one calls the tensor's ``__index__``, which Triton 3.6
defines as ``int(data)``: NumPy 2 refuses that for a 1-d array (2.4.6: "only 0-dimensional arrays can be
converted to Python scalars"), so every kernel with a runtime loop bound fails there. Triton 3.9 squeezes the
array first; ``patch()`` installs that same definition on the releases that lack it. It changes
nothing outside the interpreter and nothing for a compiled kernel.
"""
from __future__ import annotations

import os

_DONE = False


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def patch() -> None:
    """Idempotent; a no-op unless ``TRITON_INTERPRET=1`` and the interpreter has the 1-d ``__index__``."""
    global _DONE
    if _DONE or os.environ.get("TRITON_INTERPRET") != "1":
        return
    _DONE = True
    try:
        import inspect

        from triton.runtime import interpreter
        original = interpreter._patch_lang_tensor
        src = inspect.getsource(original)
    except (ImportError, AttributeError, OSError, TypeError):
        return
    if "squeeze" in src or "__index__" not in src:
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = _patch_lang_tensor
