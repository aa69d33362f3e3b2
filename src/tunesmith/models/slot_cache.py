"""The engine's KV cache: a transformers `Cache` whose layers hold every slot's keys and values in one tensor per
layer and write each row at that row's own position.

Our own because neither of transformers' caches fits continuous batching: DynamicCache concatenates every step and
keeps all rows at one length (padding), StaticCache has one write position for the batch. Here a decode step writes
row i's one new token at its own length, a prefill writes packed prompts into their slots, a finished row's slot is
reused, a shared prompt prefix is copied between slots, and the tensors grow in place (by half again) as rows and
lengths need.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot: [slots, kv heads, capacity, head dim], written at each row's own
    positions (the engine says where, `SlotCache.plan`), returned as the slots' views up to the longest length."""

    is_sliding = False

    def __init__(self, cache: "SlotCache"):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states, value_states) -> None:
        # zeros, not empty: a masked position's value is multiplied by an attention weight of 0, and 0 x NaN is NaN
        c = self.cache
        self.keys = key_states.new_zeros((c.slots, key_states.shape[1], c.capacity, key_states.shape[-1]))
        self.values = value_states.new_zeros((c.slots, value_states.shape[1], c.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kind, where, kv_len = self.cache.plan
        if kind == "decode":  # row i of the batch is slot i, its one new token at position where[i]
            rows = torch.arange(key_states.shape[0], device=key_states.device)
            self.keys[rows, :, where] = key_states[:, :, 0]
            self.values[rows, :, where] = value_states[:, :, 0]
            n = key_states.shape[0]
            return self.keys[:n, :, :kv_len], self.values[:n, :, :kv_len]
        # prefill: segments (slot, start, n) of the packed tokens, each written at its slot's positions
        offset = 0
        for slot, start, n in where:
            self.keys[slot, :, start:start + n] = key_states[0, :, offset:offset + n]
            self.values[slot, :, start:start + n] = value_states[0, :, offset:offset + n]
            offset += n
        if len(where) == 1:
            slot, start, n = where[0]
            return self.keys[slot:slot + 1, :, :start + n], self.values[slot:slot + 1, :, :start + n]
        # several prompts in one forward: each segment's keys in turn (the mask keeps the segments apart)
        return (torch.cat([self.keys[slot, :, :start + n] for slot, start, n in where], dim=1)[None],
                torch.cat([self.values[slot, :, :start + n] for slot, start, n in where], dim=1)[None])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.plan[2], 0

    def get_seq_length(self) -> int:
        return self.cache.plan[2] if self.cache.plan else 0

    def get_max_length(self) -> int:
        return self.cache.capacity

    def grow(self, slots: int, capacity: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros((slots, old.shape[1], capacity, old.shape[-1]))
                new[:old.shape[0], :, :old.shape[2]] = old
                setattr(self, name, new)

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s first `length` positions into slot `dst` (a finished row's place; a shared prefix)."""
        if self.is_initialized and length:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]


class SlotCache(Cache):
    """Slots and positions are allocated as rows need them (a batch of 16 requests holds 16 slots, not max_rows),
    growing by half again each time."""

    def __init__(self, num_layers: int, slots: int, capacity: int):
        self.slots, self.capacity, self.plan = slots, capacity, None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def ensure(self, length: int, rows: int = 0) -> None:
        if length > self.capacity or rows > self.slots:
            capacity = max(length, int(self.capacity * 1.5)) if length > self.capacity else self.capacity
            slots = max(rows, int(self.slots * 1.5)) if rows > self.slots else self.slots
            for layer in self.layers:
                layer.grow(slots, capacity)
            self.capacity, self.slots = capacity, slots

    def move(self, src: int, dst: int, length: int) -> None:
        for layer in self.layers:
            layer.move(src, dst, length)
