"""Exact count of what autograd saves for backward, the memory LoRA-FA is about."""
from __future__ import annotations

import torch


def saved_activation_bytes(fn, *modules: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saves while running ``fn()`` (a forward pass), each
    storage counted once, leaving out the parameters and buffers of ``modules`` (weights are
    resident anyway; only activations grow with batch x sequence)."""
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
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total
