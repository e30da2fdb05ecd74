"""Backwards compatibility: tests/data/format_v1.h5 (written by dfsviz 0.1.0, format version 1)
must stay readable with the same meaning. Regenerate it only with a new format version:

    python tests/capture/test_format_v1.py   # writes tests/data/format_v1.h5
"""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "format_v1.h5"


def test_fixture_reads_and_means_what_it_meant():
    from brute import dense_block_stats

    from dfsviz.analysis.measured_capture import MeasuredCapture

    assert FIXTURE.stat().st_size < 200_000
    with MeasuredCapture(FIXTURE) as reader:
        assert int(reader.attrs["format_version"]) == 1
        assert reader.complete and reader.validate() == []
        assert reader.grid.name == "f3h8w8" and reader.block == 16
        assert reader.steps == [1] and reader.layers == [1] and reader.heads == [0, 1]
        assert reader.orders == ["raster", "hilbert3d"] and reader.methods == ["meanpool", "dfs_tile", "antidiagonal"]
        assert reader.layer_names == {1: "blocks.1.attn1"}
        q, k, _ = reader.qkv(1, 1)
        scale = float(reader.attrs["softmax_scale"])
        for order in reader.orders:
            perm = reader.perm(order)
            want = dense_block_stats(q[0][:, perm], k[0][:, perm], 16, scale)
            got = reader.block_stats(1, 1, order)
            torch.testing.assert_close(got.m[0].double(), want["m"], atol=2e-6, rtol=1e-4)
            torch.testing.assert_close(got.J[0].double(), want["J"], atol=2e-5, rtol=1e-4)
        recall = reader.recall(1, 1, "hilbert3d", "dfs_tile", gamma=0.25)
        assert recall.shape == (1, 2) and bool(((recall > 0.25) & (recall < 1)).all())


def _regenerate() -> None:  # pragma: no cover - run by hand for a new format version
    import tempfile

    import diffusers

    from dfsviz.capture import CaptureConfig, run_capture

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(100)
        diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
        ).save_pretrained(tmp)
        cfg = CaptureConfig(out=str(FIXTURE), model=tmp, embeddings="random", num_steps=2, capture_steps=(1,),
                            layers=(1,), latent="3x16x16", block=16, tile=4, stride=4, footprints=2, save_qkv=(1,),
                            device="cpu", dtype="float16", prompt="format v1 fixture", overwrite=True)
        run_capture(cfg, progress=False)
    print(FIXTURE, FIXTURE.stat().st_size, "bytes")


if __name__ == "__main__":
    _regenerate()
