"""The draft heads' window: what the heads have not yet consumed, per row.

Per row: the trunk's hidden states at the positions fed since the heads last ran (index t is
position start + t, valid up to `last`) and the token that followed each. A drafting step
consumes the window (the heads run over it, then draft) and restarts it from the fed positions
that were accepted; plain steps (no drafting this step) append to it. A window that fills
during a plain stretch is dropped, not run through the heads: catching a sequential head up
costs one head layer per position, for drafts that did not pay anyway. The head then attends
only from `floor` (its first valid cache position) onwards.

Row state lives in views of the engine's per-row buffer (so compaction moves it with the rest);
this class knows nothing about sampling, the depth policy or the trunk.
"""
from __future__ import annotations

import torch


class HeadWindow:
    def __init__(self, row_state: torch.Tensor, capacity: int, hidden: int, dtype, device,
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None):
        """row_state [B, 3] int64: a view of the engine's per-row buffer (start, last, floor).
        buffers: zeroed (hidden [B, capacity, H], tokens [B, capacity]) to hold the window in
        (the engine's persistent buffers, which its CUDA graphs read in place); default new ones."""
        B = row_state.shape[0]
        self.capacity = capacity
        if buffers is None:
            buffers = (torch.zeros(B, capacity, hidden, dtype=dtype, device=device),
                       torch.zeros(B, capacity, dtype=torch.int64, device=device))
        self.hid, self.nxt = buffers  # [B, capacity, H], [B, capacity]
        self.start, self.last, self.floor = row_state.unbind(1)
        self.width = 1  # host: an upper bound of last + 1 over the rows in flight

    def tensors(self) -> list[torch.Tensor]:
        """The buffers compaction moves row by row (the row state moves with the engine's)."""
        return [self.hid, self.nxt]

    def admit(self, sl: slice, last_hidden: torch.Tensor, token: torch.Tensor, prompt_lens: torch.Tensor,
              heads_saw_prompt: bool) -> None:
        """New rows start from their last prompt position; without the heads' pass over the
        prompt, the heads attend from there on only."""
        self.hid[sl, 0], self.nxt[sl, 0] = last_hidden, token
        self.start[sl], self.last[sl] = prompt_lens - 1, 0
        self.floor[sl] = 0 if heads_saw_prompt else prompt_lens

    def append(self, n: int, hidden: torch.Tensor, token: torch.Tensor) -> None:
        """A plain step fed one position per row: hidden [n, H], the token sampled after it [n]."""
        if self.width >= self.capacity:
            self.drop(n)
        rows, idx = torch.arange(n, device=hidden.device), self.last[:n] + 1
        self.hid[rows, idx], self.nxt[rows, idx] = hidden, token
        self.last[:n] = idx
        self.width += 1

    def inputs(self, n: int, pad_to_16: bool):
        """(hidden [n, w, H], next tokens [n, w], positions [n, w], last index [n], floor [n])
        for heads.begin. pad_to_16 (a GPU): w is 16 or the whole window, so shapes rarely
        change (each new one costs first-call work); padding entries lie past `last`."""
        w = self.padded_width(pad_to_16)
        pos = self.start[:n, None] + torch.arange(w, device=self.hid.device)
        return self.hid[:n, :w], self.nxt[:n, :w], pos, self.last[:n], self.floor[:n]

    def padded_width(self, pad_to_16: bool) -> int:
        """The window width `inputs` hands out (see there)."""
        if not pad_to_16:
            return self.width
        return min(16, self.capacity) if self.width <= 16 else self.capacity

    def keep_last(self, n: int) -> None:
        """Shrink each row's window to its last entry (the heads then attend from there on)."""
        rows, last = torch.arange(n, device=self.hid.device), self.last[:n].clamp(min=0)
        self.hid[:n, 0], self.nxt[:n, 0] = self.hid[rows, last], self.nxt[rows, last]
        self.start[:n] += last
        self.floor[:n] = self.start[:n] + 1
        self.last[:n] = 0
        self.width = 1

    def drop(self, n: int) -> None:
        """Forget a full window: the heads restart at the next position, attending only to
        head-cache entries from there on (the depth-1 entry of position p sits at p + 1)."""
        self.start[:n] += self.last[:n] + 1
        self.floor[:n] = self.start[:n] + 1
        self.last[:n] = -1
        self.width = 0

    def restart(self, n: int, hidden: torch.Tensor, tokens: torch.Tensor, emitted: torch.Tensor,
                live: torch.Tensor, first_pos: torch.Tensor) -> None:
        """After a verify: the window holds the fed positions (hidden [n, W, H], the emitted
        tokens [n, W]) up to the accepted ones (emitted [n]); first_pos [n] is the position of
        each row's first fed token. Rows already done restart from index 0."""
        W = hidden.shape[1]
        self.hid[:n, :W], self.nxt[:n, :W] = hidden, tokens.clamp(min=0)
        self.start[:n] = torch.where(live, first_pos, self.start[:n])
        self.last[:n] = torch.where(live, emitted - 1, torch.zeros_like(emitted))
        self.width = W

    def has_context(self, n: int) -> torch.Tensor:
        """[n] bool: the heads saw every earlier position of the row (no prefill skipped, no
        window dropped or trimmed)."""
        return self.floor[:n] == 0
