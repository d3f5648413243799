"""Exact count of what autograd saves for backward, the memory LoRA-FA is about."""
from __future__ import annotations

from collections import Counter

import torch


def saved_activation_bytes(fn, *modules: torch.nn.Module, by_shape: Counter | None = None) -> int:
    """Bytes of the tensors autograd saves while running ``fn()`` (a forward pass), each
    storage counted once, leaving out the parameters and buffers of ``modules`` (weights are
    resident anyway; only activations grow with batch x sequence). ``by_shape``, if given, is
    filled with a count per (shape, dtype) of the tensors counted."""
    resident = {t.untyped_storage().data_ptr()
                for m in modules for t in (*m.parameters(), *m.buffers())}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in resident and key not in seen:
            seen.add(key)
            total += storage.nbytes()
            if by_shape is not None:
                by_shape[(tuple(t.shape), str(t.dtype).replace("torch.", ""))] += 1
        # Pack a detached alias (same storage): returning ``t`` itself would, for ops that save
        # their own output (softmax, exp, tanh), make the saved tensor hold its grad_fn - a
        # cycle through C++ that gc cannot break, leaking every counted activation.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total
