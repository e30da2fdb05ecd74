"""Backend choice: without an importable Triton, dfsviz.kernels still imports and every
public function falls back to its PyTorch reference."""

import os
import subprocess
import sys
import textwrap

# Runs in a fresh interpreter whose import system refuses `triton` (as on a machine without it).
_WITHOUT_TRITON = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, NoTriton())

    import torch
    import dfsviz.kernels as kernels
    from dfsviz.kernels import _dispatch
    from dfsviz.sparse.attention import block_sparse_attention_ref
    from dfsviz.sparse.masks import BlockMask
    from dfsviz.sparse.scoring import block_scores_ref
    from dfsviz.sparse.stats import block_stats_ref

    assert "triton" not in sys.modules, "importing dfsviz.kernels imported triton"
    assert not _dispatch.triton_available()
    q, k, v = (torch.randn(1, 2, 100, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = BlockMask.full(1, 2, 100, 32)
    assert torch.equal(kernels.block_sparse_attention(q, k, v, mask), block_sparse_attention_ref(q, k, v, mask))
    assert torch.equal(kernels.block_scores(q, k, block=32), block_scores_ref(q, k, block=32))
    assert torch.equal(kernels.block_stats(q, k, block=32).m, block_stats_ref(q, k, block=32).m)
    x = torch.randn(1, 100, 128)
    cos, sin = torch.ones(1, 100, 1, 64), torch.zeros(1, 100, 1, 64)
    w = torch.ones(128)
    # cos 1, sin 0: the rotation is the identity, so the result is the norm alone
    assert torch.equal(kernels.qk_norm_rope(x, w, 1e-6, cos, sin), torch.nn.functional.rms_norm(x, (128,), w, 1e-6))
    assert torch.equal(kernels.gated_residual(x, x, torch.ones(1, 1, 128)), x + x)
    try:
        kernels.block_sparse_attention(q, k, v, mask, backend="triton")
    except ValueError as err:
        assert "importable triton" in str(err), str(err)
    else:
        raise AssertionError("backend='triton' ran without triton")
    assert "triton" not in sys.modules, "a fallback call imported triton"
    print("fallback ok")
    """
)


def test_kernels_import_and_fall_back_without_triton():
    env = {name: value for name, value in os.environ.items() if name != "DFSVIZ_KERNEL_BACKEND"}
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "fallback ok" in run.stdout, run.stderr[-3000:]
