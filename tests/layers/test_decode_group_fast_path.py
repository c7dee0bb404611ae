"""The decode group when every history has the same length (batch 1 always): the slot history is the table's
rows (one row: a view of the table) and the mask is all True, exactly what the padded path computes."""

from __future__ import annotations

import pytest
import torch

from radixlm.kv.kv_pool import KVPool
from radixlm.layers.attention_backends.torch_backend import TorchAttnBackend
from radixlm.model.forward_batch import ForwardBatch


def _decode_batch(rows: list[int], seqs: list[int]) -> ForwardBatch:
    g = torch.Generator().manual_seed(0)
    table = torch.randint(1, 50, (8, 32), generator=g)  # stale slots past each seq_len: must never be read
    pool = KVPool(num_pages=64, page_size=1, num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32,
                  device="cpu")  # fmt: skip
    return ForwardBatch.from_spans(
        input_ids=[3] * len(rows),
        out_cache_loc=[1] * len(rows),
        req_pool_indices=rows,
        prefix_lens=[n - 1 for n in seqs],
        extend_lens=[1] * len(rows),
        sample_mask=[True] * len(rows),
        kv_pool=pool,
        req_to_token=table,
        attn_backend=TorchAttnBackend(min_shared_prefix=None),
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize(("rows", "seqs"), [([5], [9]), ([2, 0, 6], [7, 7, 7]), ([1, 4], [3, 11])])
def test_decode_group_equals_the_padded_formula(rows: list[int], seqs: list[int]) -> None:
    fb = _decode_batch(rows, seqs)
    group = fb.attn_metadata.decode
    longest = max(seqs)
    valid = torch.arange(longest)[None, :] < torch.tensor(seqs)[:, None]
    expected = fb.req_to_token[rows, :longest].masked_fill(~valid, 0)
    assert group.token_idx is None
    assert torch.equal(group.kv_idx, expected)
    assert torch.equal(group.mask(None), valid[:, None, None, :])
    # a window's mask is built from the same seq_lens, whichever path made the group
    assert torch.equal(
        group.mask(4)[:, 0, 0], valid & (torch.tensor(seqs)[:, None] - 1 - torch.arange(longest) < 4)
    )
