"""Block masks: which key blocks each query block attends to.

A :class:`BlockMask` stores, for every (batch, head, query block), the kept key
blocks in the layout of FlexAttention's ``kv_num_blocks`` / ``kv_indices``: row
``(b, h, u)`` keeps the key blocks ``kv_indices[b, h, u, :kv_num_blocks[b, h, u]]``,
listed in ascending order; the entries after them are 0. Queries and keys share
one sequence of ``seq_len`` tokens cut into blocks of ``block`` tokens; the last
block may be short (``seq_len % block`` tokens) and densities count only real
token pairs (docs/theory.md, rho(S)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfsviz.sparse._validate import block_sizes, check_block, check_int, check_seq_len, num_blocks

__all__ = ["BlockMask", "check_mask_for"]

def _check_int_tensor(x: object, name: str, dims: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {layout} (got {type(x).__name__})")
    if x.dtype != torch.int32:
        raise ValueError(f"`{name}` must have dtype torch.int32 (got {x.dtype}); use .to(torch.int32)")
    if x.dim() != dims:
        raise ValueError(f"`{name}` must have shape {layout} (got {tuple(x.shape)})")
    return x


def _kv_layout(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks int32 [B, H, Mq], kv_indices int32 [B, H, Mq, Mk]) of a bool block mask, by
    device ops only."""
    m = dense.shape[-1]
    counts = dense.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not kept" puts the kept block indices first, already ascending.
    idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    valid = torch.arange(m, device=dense.device) < counts.unsqueeze(-1)
    return counts, torch.where(valid, idx, torch.zeros((), dtype=torch.int32, device=dense.device))


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Per-head block-sparse mask in FlexAttention's kv layout.

    Fields:
        kv_num_blocks: int32 [B, H, Mq], kept key blocks per query block, in [0, Mk].
        kv_indices: int32 [B, H, Mq, Mk]; the first ``kv_num_blocks[b, h, u]`` entries of
            row (b, h, u) are the kept key block indices in strictly ascending order, in
            [0, Mk); the remaining entries are 0.
        seq_len: N, tokens in the (self-attention) sequence, >= 1.
        block: tokens per block, a power of two in [16, 256]; Mq = Mk = ceil(N / block).

    Construction validates all of the above and raises ValueError/TypeError otherwise.
    Equality is identity (tensors have no single truth value); compare ``to_dense()``.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    seq_len: int
    block: int

    def __post_init__(self) -> None:
        seq_len = check_seq_len(self.seq_len)
        block = check_block(self.block)
        m = num_blocks(seq_len, block)
        counts = _check_int_tensor(self.kv_num_blocks, "kv_num_blocks", 3, "[B, H, Mq]")
        idx = _check_int_tensor(self.kv_indices, "kv_indices", 4, "[B, H, Mq, Mk]")
        if counts.device != idx.device:
            raise ValueError(
                f"`kv_num_blocks` and `kv_indices` must be on one device (got {counts.device} and "
                f"{idx.device}); move one of them"
            )
        expected = (*counts.shape, m)
        if tuple(idx.shape) != expected or counts.shape[2] != m:
            raise ValueError(
                f"`kv_indices` must have shape [B, H, Mq, Mk] = {expected} and `kv_num_blocks` "
                f"[B, H, Mq] with Mq = Mk = ceil(seq_len / block) = ceil({seq_len} / {block}) = {m} "
                f"(got {tuple(idx.shape)} and {tuple(counts.shape)}); check seq_len and block"
            )
        if counts.numel() == 0:
            raise ValueError(f"`kv_num_blocks` must have B >= 1 and H >= 1 (got shape {tuple(counts.shape)})")
        lo, hi = int(counts.min()), int(counts.max())
        if lo < 0 or hi > m:
            raise ValueError(
                f"`kv_num_blocks` must lie in [0, Mk] = [0, {m}] (got values in [{lo}, {hi}]); "
                "count kept key blocks per query block"
            )
        ilo, ihi = int(idx.min()), int(idx.max())
        if ilo < 0 or ihi >= m:
            raise ValueError(
                f"`kv_indices` must lie in [0, Mk) = [0, {m}) (got values in [{ilo}, {ihi}]); "
                "indices are key block numbers, not token indices"
            )
        valid = torch.arange(m, device=idx.device) < counts.unsqueeze(-1)
        if bool((idx[~valid] != 0).any()):
            raise ValueError(
                "`kv_indices` entries after the first `kv_num_blocks` of each row must be 0 "
                "(got non-zero padding); build masks with BlockMask.from_dense"
            )
        if m > 1:
            both = valid[..., 1:]
            if bool(((idx[..., 1:] <= idx[..., :-1]) & both).any()):
                raise ValueError(
                    "`kv_indices` kept entries must be strictly ascending within each row (got a "
                    "repeat or a descent); sort them or build masks with BlockMask.from_dense"
                )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_dense(cls, dense: torch.Tensor, seq_len: int, block: int) -> "BlockMask":
        """Build from a bool [B, H, Mq, Mk] block mask (True = key block kept)."""
        seq_len = check_seq_len(seq_len)
        block = check_block(block)
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"`dense` must be a torch.Tensor of shape [B, H, Mq, Mk] (got {type(dense).__name__})")
        if dense.dtype != torch.bool:
            raise ValueError(f"`dense` must have dtype torch.bool (got {dense.dtype}); use `scores > threshold`")
        m = num_blocks(seq_len, block)
        if dense.dim() != 4 or dense.shape[2] != m or dense.shape[3] != m:
            raise ValueError(
                f"`dense` must have shape [B, H, {m}, {m}] for seq_len={seq_len}, block={block} "
                f"(got {tuple(dense.shape)}); Mq = Mk = ceil(seq_len / block)"
            )
        counts, idx = _kv_layout(dense)
        return cls._of_layout(counts.contiguous(), idx.contiguous(), seq_len, block)

    @classmethod
    def _of_layout(cls, counts: torch.Tensor, idx: torch.Tensor, seq_len: int, block: int) -> "BlockMask":
        """A mask whose layout this class built (``_kv_layout``, :meth:`full`, :meth:`to`): valid by
        construction, so ``__post_init__``'s checks of every index (host reads: 25 ms for 12 heads
        of 256 x 256 blocks on a CPU, a device sync on a GPU) are skipped."""
        mask = object.__new__(cls)
        for name, value in (("kv_num_blocks", counts), ("kv_indices", idx), ("seq_len", seq_len), ("block", block)):
            object.__setattr__(mask, name, value)
        return mask

    @classmethod
    def full(
        cls, batch: int, heads: int, seq_len: int, block: int, device: torch.device | str | None = None
    ) -> "BlockMask":
        """The dense mask: every query block keeps every key block (density 1)."""
        check_int(batch, "batch", 1)
        check_int(heads, "heads", 1)
        seq_len = check_seq_len(seq_len)
        block = check_block(block)
        m = num_blocks(seq_len, block)
        counts = torch.full((batch, heads, m), m, dtype=torch.int32, device=device)
        idx = torch.arange(m, dtype=torch.int32, device=device).expand(batch, heads, m, m).contiguous()
        return cls._of_layout(counts, idx, seq_len, block)

    # ----------------------------------------------------------------- in place
    def copy_dense_(self, dense: torch.Tensor) -> "BlockMask":
        """Overwrite this mask in place with a bool [B, H, Mq, Mk] block mask of its shape and device.

        Device ops only, no host read: the refresh of a cached mask can be captured in a CUDA
        graph (the kernels read the same ``kv_num_blocks`` / ``kv_indices`` tensors on replay).
        Only the type, dtype, shape and device of ``dense`` are checked. Returns ``self``.
        """
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"`dense` must be a torch.Tensor of shape {self.shape} (got {type(dense).__name__})")
        if dense.dtype != torch.bool:
            raise ValueError(f"`dense` must have dtype torch.bool (got {dense.dtype}); use `scores > threshold`")
        if tuple(dense.shape) != self.shape or dense.device != self.device:
            raise ValueError(
                f"`dense` must have the mask's shape {self.shape} on its device {self.device} "
                f"(got {tuple(dense.shape)} on {dense.device}); build a new mask with BlockMask.from_dense"
            )
        counts, idx = _kv_layout(dense)
        self.kv_num_blocks.copy_(counts)
        self.kv_indices.copy_(idx)
        return self

    # ----------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Mq, Mk)."""
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    @property
    def num_q_blocks(self) -> int:
        """Mq, query blocks."""
        return self.kv_indices.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        """Mk, key blocks."""
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def __repr__(self) -> str:
        b, h, mq, mk = self.shape
        return (
            f"BlockMask(B={b}, H={h}, Mq={mq}, Mk={mk}, seq_len={self.seq_len}, block={self.block}, "
            f"device={self.device})"
        )

    # ----------------------------------------------------------------- conversions
    def _valid(self) -> torch.Tensor:
        """bool [B, H, Mq, Mk]: True where position j of a row's index list is a kept entry."""
        m = self.num_kv_blocks
        return torch.arange(m, device=self.device) < self.kv_num_blocks.unsqueeze(-1)

    def to_dense(self) -> torch.Tensor:
        """bool [B, H, Mq, Mk], True where key block v is kept for query block u."""
        m = self.num_kv_blocks
        # Padding entries scatter into a spare column m that is dropped afterwards.
        target = torch.where(self._valid(), self.kv_indices.long(), torch.full((), m, device=self.device))
        dense = torch.zeros((*self.shape[:3], m + 1), dtype=torch.bool, device=self.device)
        dense.scatter_(-1, target, True)
        return dense[..., :m].contiguous()

    def to(self, device: torch.device | str) -> "BlockMask":
        """The same mask with its tensors on ``device``."""
        return BlockMask._of_layout(self.kv_num_blocks.to(device), self.kv_indices.to(device), self.seq_len, self.block)

    def budget(self) -> torch.Tensor:
        """float64 [B, H, Mq]: gamma_u = |S_u| / Mk, the kept fraction of key blocks per query block."""
        return self.kv_num_blocks.to(torch.float64) / self.num_kv_blocks

    def density(self) -> torch.Tensor:
        """float64 [B, H]: rho(S) = sum_u sum_{v in S_u} |U_u| n_v / N^2 (docs/theory.md).

        Only real token pairs count, so a kept short last block weighs ``seq_len % block``
        tokens, not ``block``. ``1 - density`` is the sparsity of result tables.
        """
        sizes = block_sizes(self.seq_len, self.block, device=self.device).to(torch.float64)
        return (self.kept_key_tokens().to(torch.float64) * sizes).sum(dim=-1) / float(self.seq_len) ** 2

    def kept_key_tokens(self) -> torch.Tensor:
        """int64 [B, H, Mq]: sum_{v in S_u} n_v, the key tokens each query block keeps (a kept short
        last block counts ``seq_len % block``)."""
        counts = self.kv_num_blocks.long()
        # Kept indices ascend, so a row keeps the short last key block iff it is the row's last
        # kept entry: |S_u| * block less what that block lacks, exact in integers.
        last = self.kv_indices.gather(-1, (counts - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
        keeps_last = (counts > 0) & (last == self.num_kv_blocks - 1)
        return counts * self.block - keeps_last.long() * (self.num_kv_blocks * self.block - self.seq_len)

    def to_flex_block_mask(self):
        """A ``torch.nn.attention.flex_attention.BlockMask`` with the same token-level mask.

        Kept blocks are passed as FlexAttention *full* blocks (no per-element mask work in
        compiled kernels) with ``seq_lengths=(N, N)``, so the short last block is cut at N by
        FlexAttention's own boundary handling. The ``mask_mod`` looks the block pair up in
        this mask; it is what the eager (uncompiled) FlexAttention path evaluates, so both
        paths compute the same attention. Compiled FlexAttention needs its kernel tile to divide
        the block: for block < 128 pass ``kernel_options={"BLOCK_M": block, "BLOCK_N": block}``
        (checked on an H200 with torch 2.11: blocks 16, 32, 64 and 128 at ragged N match a dense
        masked softmax to 1e-6 in float32).
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        dense = self.to_dense()
        block = self.block

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[b, h, q_idx // block, kv_idx // block]

        empty_counts = torch.zeros_like(self.kv_num_blocks)
        empty_idx = torch.zeros_like(self.kv_indices)
        return FlexBlockMask.from_kv_blocks(
            empty_counts,
            empty_idx,
            full_kv_num_blocks=self.kv_num_blocks,
            full_kv_indices=self.kv_indices,
            BLOCK_SIZE=block,
            mask_mod=mask_mod,
            seq_lengths=(self.seq_len, self.seq_len),
        )


def check_mask_for(mask: BlockMask, q: torch.Tensor) -> None:
    """Raise ValueError unless ``mask`` fits queries ``q`` [B, H, N, D] (same B, H, N, device)."""
    if not isinstance(mask, BlockMask):
        raise TypeError(f"`mask` must be a dfsviz BlockMask (got {type(mask).__name__}); use BlockMask.from_dense")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"`q` must be a tensor of shape [B, H, N, D] (got {shape})")
    b, h, n, _ = q.shape
    if mask.seq_len != n:
        raise ValueError(
            f"`mask.seq_len` must equal N = q.shape[2] = {n} (got {mask.seq_len}); "
            "build the mask for this sequence length"
        )
    if mask.shape[:2] != (b, h):
        raise ValueError(
            f"`mask` must have B, H = {(b, h)} like q (got {mask.shape[:2]}); "
            "select one mask per batch element and head"
        )
    if mask.device != q.device:
        raise ValueError(f"`mask` must be on q's device {q.device} (got {mask.device}); use mask.to(q.device)")
