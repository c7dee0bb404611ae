"""The slot table: row r lists, in order, the KV slots of the request that holds row r.

Attention reads a request's whole KV history through its row, so a prefix hit, a chunk and a decode token
are all just more entries in the same row (DESIGN.md invariant 1). The table has two halves, each with one
owner and one device (invariant 4):

    ReqToToken (host, KVManager's)            DeviceReqToToken (device, the model runner's)
    rows[r] = [s0, s1, ...]   --writes-->      table[r, start:start+n] = slots
                              (StepInput)

The scheduler reads and changes only the host rows. Every change is also logged as a write
``(row, start, slots)``; the scheduler hands the writes of a step to the runner inside its StepInput, and
the runner applies them to the device table before the forward pass (so do tensor-parallel ranks, which
receive the same StepInput). The host never reads the device table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TableWrite = tuple[int, int, list[int]]  # (row, start column, slots)


class ReqToToken:
    """The host half: free rows and each row's slots, plus the log of writes not yet sent to the device."""

    def __init__(self, num_rows: int, max_context_len: int) -> None:
        self.num_rows = num_rows
        self.max_context_len = max_context_len
        self._free_rows: list[int] = list(range(num_rows - 1, -1, -1))
        self.rows: list[list[int]] = [[] for _ in range(num_rows)]
        self._writes: list[TableWrite] = []

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free_row(self, row: int) -> None:
        self.rows[row] = []
        self._free_rows.append(row)

    def append(self, row: int, slots: list[int]) -> None:
        """The next len(slots) tokens of the row's sequence live in these slots."""
        cur = self.rows[row]
        if len(cur) + len(slots) > self.max_context_len:
            raise RuntimeError(
                f"slot table row {row}: {len(cur) + len(slots)} slots exceed the context length "
                f"{self.max_context_len}"
            )
        self._writes.append((row, len(cur), slots))
        cur.extend(slots)

    def append_each(self, rows: list[int], slots: list[list[int]]) -> None:
        """append(row, s) for each pair, in order (a decode step's one slot per row, in one call)."""
        table, writes, limit = self.rows, self._writes, self.max_context_len
        for row, s in zip(rows, slots, strict=True):
            cur = table[row]
            if len(cur) + len(s) > limit:
                raise RuntimeError(
                    f"slot table row {row}: {len(cur) + len(s)} slots exceed the context length {limit}"
                )
            writes.append((row, len(cur), s))
            cur.extend(s)

    def replace_head(self, row: int, slots: list[int]) -> None:
        """The first len(slots) tokens now live in these slots (the prefix cache kept its own copies)."""
        cur = self.rows[row]
        cur[: len(slots)] = slots
        self._writes.append((row, 0, slots))

    def take_writes(self) -> list[TableWrite]:
        out, self._writes = self._writes, []
        return out


class DeviceReqToToken:
    """The device half: the table attention reads, updated only by applying host writes."""

    def __init__(self, num_rows: int, max_context_len: int, device: torch.device | str) -> None:
        import torch

        self.device = torch.device(device)
        self.table = torch.zeros(num_rows, max_context_len, dtype=torch.int64, device=self.device)
        # A host copy that gets the same writes, for step planning that reads slots (shared-prefix groups)
        # without a device-to-host read; on a CPU device the table is its own host copy.
        self.host = (
            self.table
            if self.device.type == "cpu"
            else torch.zeros(num_rows, max_context_len, dtype=torch.int64)
        )
        # The host copy's memory as a numpy array: a step's writes (one slot per decode) land there as
        # plain stores, ~0.3 us each, where building index tensors for one index_copy_ cost ~60 us per
        # step at batch 1 (measured, 2-core CPU). Writes are applied in order, so a cell written twice in
        # one step keeps the later value.
        self._host_np = self.host.numpy()

    def apply(self, writes: list[TableWrite]) -> None:
        """All of a step's writes into the host copy in order; on a device that is not the host, one
        upload of the touched cells' final values and one indexed store."""
        if not writes:
            return
        host = self._host_np
        for row, start, slots in writes:
            if len(slots) == 1:  # a decode's slot: a scalar store is 4x cheaper than a slice's
                host[row, start] = slots[0]
            else:
                host[row, start : start + len(slots)] = slots
        if self.host is self.table:
            return
        import torch

        width = self.table.shape[1]
        # Each touched cell once (a row freed and reused, or a head replaced after an append, writes a cell
        # twice): its value is the host copy's, which saw the writes in order.
        touched = (
            range(row * width + start, row * width + start + len(slots)) for row, start, slots in writes
        )
        cells = list(dict.fromkeys(c for cols in touched for c in cols))
        idx = torch.tensor(cells, dtype=torch.int64)
        vals = self.host.view(-1).index_select(0, idx)
        both = torch.stack([idx, vals])
        if self.device.type == "cuda":
            both = both.pin_memory()
        c, v = both.to(self.device, non_blocking=True)
        self.table.view(-1).index_copy_(0, c, v)
