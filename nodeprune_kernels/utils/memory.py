"""Exact accounting of what autograd saves for backward.

Counts the bytes of every distinct storage that autograd packs while the context is active (through
``torch.autograd.graph.saved_tensors_hooks``). This is device independent and exact, so tests may assert
it. Tensors that stay resident anyway (frozen weights, gate parameters) can be excluded with ``ignore``.
"""
from __future__ import annotations

import torch


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


class SavedTensorBytes:
    """Context manager: ``with SavedTensorBytes(ignore=[w]) as saved: loss = f(x)``; then ``saved.bytes``.

    ``saved.bytes`` is the sum of ``nbytes`` over distinct storages saved for backward, each counted once,
    excluding the storages of the tensors in ``ignore``. ``saved.tensors`` lists ``(shape, dtype)`` of what
    was counted, for messages.
    """

    def __init__(self, ignore=()):
        self._ignore = {_storage_key(t) for t in ignore}
        self._seen: dict = {}
        self.tensors: list = []
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self._ignore and key not in self._seen:
            self._seen[key] = t.untyped_storage().nbytes()
            self.tensors.append((tuple(t.shape), t.dtype))
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
