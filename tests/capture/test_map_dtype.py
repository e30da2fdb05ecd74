"""Map storage: the block-mass row-sum tolerance of float16; the config settings (`map_dtype`,
`step_budget`); how `auto` chooses, and that its default fits a Wan2.1-14B 720p step in 8 GB."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dfsviz.capture.config import CaptureConfig, format_size
from dfsviz.capture.resolve import choose_map_dtype
from dfsviz.capture.schema import MAP_DTYPES, StoreLayout
from dfsviz.capture.validation import ROW_SUM_TOL, map_problem
from dfsviz.sparse.grid import LatentGrid

MK = 591  # key blocks of a Wan2.1-14B 720p step at block 128


def _row_rounded_up() -> np.ndarray:
    """A float32 row of MK masses summing to 1 whose float16 roundings all round up by almost
    half a float16 ulp: the worst the float16 storage of a row can do."""
    base = np.float16(1.0 / MK)  # a float16 value in the binade of 1/MK
    ulp = np.spacing(base).astype(np.float32)
    row = np.full(MK, np.float32(base) + np.float32(0.499) * ulp, dtype=np.float32)
    row[-1] = np.float32(1.0) - row[:-1].sum(dtype=np.float64)  # float32 row sums to 1
    return row


def test_float16_rounding_of_a_row_of_591_passes():
    row = _row_rounded_up()
    assert abs(row.sum(dtype=np.float64) - 1) < 1e-6
    stored = row.astype(np.float16)
    assert map_problem("m", stored[None], MK) is None
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(MK, MK)) * 4
    mass = np.exp(logits - logits.max(axis=-1, keepdims=True))
    mass = (mass / mass.sum(axis=-1, keepdims=True)).astype(np.float32)
    assert map_problem("m", mass.astype(np.float16), MK) is None


def _float16_row(excess: float) -> np.ndarray:
    """A float16 row of MK masses whose sum exceeds 1 by ``excess`` to within a float16 ulp of 1/MK."""
    base = np.float16(1.0 / MK)
    ulp = float(np.spacing(base))
    missing = int(round((1 + excess - MK * float(base)) / ulp))  # ulps to add, spread over the entries
    ulps = np.full(MK, missing // MK)
    ulps[: missing % MK] += 1
    return (float(base) + ulps * ulp).astype(np.float16)  # exact: every entry stays in base's binade


def test_the_float16_tolerance_is_derived_from_the_dtype_and_float32_keeps_its_own():
    # a row sum ROW_SUM_TOL + 2^-12 above 1: within float16's rounding of a row (half an ulp
    # relative, 2^-11) beyond ROW_SUM_TOL, so accepted in float16 ...
    row = _float16_row(ROW_SUM_TOL + 2.0**-12)
    assert row.sum(dtype=np.float64) - 1 > ROW_SUM_TOL + 2.0**-13
    assert map_problem("m", row[None], MK) is None
    # ... while float32, whose maps are not rounded on the way to the file, keeps ROW_SUM_TOL
    assert map_problem("m", row.astype(np.float32)[None], MK).startswith("rows do not sum to 1 (query block 0:")
    # twice float16's rounding beyond ROW_SUM_TOL is damage in float16 too
    far = _float16_row(ROW_SUM_TOL + 2 * 2.0**-11)
    assert map_problem("m", far[None], MK).startswith("rows do not sum to 1 (query block 0:")


def test_capture_config_map_dtype():
    assert CaptureConfig(out="x.h5").map_dtype == "auto" and CaptureConfig(out="x.h5").step_budget == 8 * 10**9
    # the defaults stay out of the settings, so files of earlier dfsviz resume as before
    assert "map_dtype" not in CaptureConfig(out="x.h5").to_json() and "step_budget" not in CaptureConfig(out="x.h5").to_json()
    assert CaptureConfig(out="x.h5", map_dtype="float16").to_json()["map_dtype"] == "float16"
    assert CaptureConfig(out="x.h5", map_dtype="uint8").map_dtype == "uint8"
    with pytest.raises(ValueError, match=r"`map_dtype` must be one of \['auto', 'float32', 'float16', 'uint8'\] "
                                         r"\(got 'float64'\)"):
        CaptureConfig(out="x.h5", map_dtype="float64")


@pytest.mark.parametrize("text, size", [("8GB", 8 * 10**9), ("500 MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                        ("2e9", 2 * 10**9), ("123", 123), ("64kb", 64_000), (4096, 4096)])
def test_step_budget_takes_bytes_or_a_size(text, size):
    config = CaptureConfig(out="x.h5", step_budget=text)
    assert config.step_budget == size
    assert config.to_json().get("step_budget", 8 * 10**9) == size


@pytest.mark.parametrize("value, shown", [("eight GB", "'eight GB'"), ("8 XB", "'8 XB'"), ("0", "'0'"), ("-1GB", "'-1GB'"),
                                          (0, "0"), (-5, "-5"), (True, "True"), (2.5, "2.5"), ("nan GB", "'nan GB'")])
def test_step_budget_refusals(value, shown):
    with pytest.raises(ValueError, match=r"^`step_budget` must be a size in bytes > 0, a whole number or a number with a "
                                         r"unit \(B, kB, MB, GB, TB, KiB, MiB, GiB, TiB\), e\.g\. 8GB \(got "
                                         + re.escape(shown) + r"\)$"):
        CaptureConfig(out="x.h5", step_budget=value)


def _wan_layout(map_dtype: str, **settings):
    """The capture layout of a tiny Wan (the session's saved model) resolved from ``settings``."""
    layout = StoreLayout(grid=LatentGrid(3, 8, 8), block=16, orders=("raster", "hilbert3d"),
                         methods=("meanpool", "dfs_tile", "antidiagonal"), layers=(0, 1),
                         layer_names=("blocks.0.attn1", "blocks.1.attn1"), heads=(0, 1), branches=("cond",),
                         steps=(0, 1), footprints=2, map_dtype=map_dtype, **settings)
    return layout


@pytest.mark.parametrize("budget_of, want", [("float32", "float32"), ("float16", "float16"), ("uint8", "uint8")])
def test_auto_takes_the_widest_dtype_whose_largest_step_fits(budget_of, want):
    # budgets that force each dtype: exactly the largest step in that dtype, one byte less than the wider one
    sizes = {dtype: max(_wan_layout(dtype, qkv_layers=(1,), qkv_steps=(1,)).bytes_per_step(s) for s in (0, 1))
             for dtype in MAP_DTYPES}
    assert sizes["float32"] > sizes["float16"] > sizes["uint8"]
    wider = {"float32": None, "float16": "float32", "uint8": "float16"}[budget_of]
    for budget in (sizes[budget_of], *(() if wider is None else (sizes[wider] - 1,))):
        chosen, why = choose_map_dtype(_wan_layout("float32", qkv_layers=(1,), qkv_steps=(1,)), budget)
        assert chosen.map_dtype == want, (budget, why)
        assert why.startswith(f"auto: {want}") and format_size(budget) in why


def test_auto_past_every_dtype_takes_uint8_and_says_so(caplog):
    chosen, why = choose_map_dtype(_wan_layout("float32"), 1000)
    assert chosen.map_dtype == "uint8"
    assert why.startswith("auto: uint8, and even uint8 exceeds the step budget of 1.00 kB")
    assert "capture fewer layers, heads, orders or methods" in why


def test_the_default_fits_a_wan_14b_720p_step_with_both_orders_in_8_gb():
    """Wan2.1-14B at 720p x 81 frames (21 x 90 x 160 latent, N = 75,600, 591 blocks): every layer and
    head, both default orders, the default methods and footprints, resolved from CaptureConfig's
    defaults through the capture's own layout code (the model is built on the meta device)."""
    import diffusers

    from dfsviz.capture.adapters import adapter_for
    from dfsviz.capture.resolve import resolve_layout

    wan_14b = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(**wan_14b)
    adapter = adapter_for(model)
    grid = adapter.token_grid(model.config, (21, 90, 160), 0)
    assert grid.num_tokens == 75_600
    config = CaptureConfig(out="x.h5")
    _, _, layout, why = resolve_layout(config, adapter, model, grid, (0,))
    assert len(layout.layers) == 40 and len(layout.heads) == 40 and layout.num_blocks == 591
    assert layout.orders == ("raster", "hilbert3d") and layout.footprints == 2
    assert layout.map_dtype == "uint8" and why.startswith("auto: uint8")
    assert layout.bytes_per_step(0) <= 8 * 10**9 == config.step_budget
    # the table of docs/format.md shows these bytes: each row recomputed from the layout
    rows = _format_table()
    for settings, layout_settings in _TABLE_ROWS.items():
        want = dataclasses.replace(layout, stored_scores=None, **layout_settings).bytes_per_step(0)
        assert rows[settings] == f"{want / 1e9:.2f} GB", settings


_TABLE_ROWS = {
    "float32": {"map_dtype": "float32"},
    "`--map-dtype float16`": {"map_dtype": "float16"},
    "uint8 (the default: `--map-dtype auto`)": {"map_dtype": "uint8"},
    "uint8, `--methods dfs_tile`": {"map_dtype": "uint8", "methods": ("dfs_tile",)},
    "float16, one order": {"map_dtype": "float16", "orders": ("hilbert3d",)},
}


def _format_table() -> dict[str, str]:
    """settings -> bytes per step, from the Wan2.1-14B table of docs/format.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    table = text[text.index("**A Wan2.1-14B 720p step**"):].split("\n\n")[1]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return {settings.strip(): size.strip() for settings, size in rows}
