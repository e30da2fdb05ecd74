"""Every quantity and setting the dashboard shows: a plain-language definition and its formula.

One entry per term, in reading order (setting, orders, the block maps, budget, density and
recall, scoring, the bounds and their factors, drift, footprints, the schedule, calibration,
the token model). The page help, the hover text and the Glossary page read them from here,
so a definition is written once. Symbols and formulas are those of ``docs/theory.md``;
``Term.doc_anchor`` names the section of the repository's ``docs/`` that explains more.

    from dfsviz.app.glossary import TERMS, help_text
    help_text("recall")   # "recall R: the share of each query's attention that the mask keeps ..."
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from types import MappingProxyType

from dfsviz.sparse.orders import ORDERS
from dfsviz.sparse.scoring import SCORERS
from dfsviz.sparse.select import SELECTORS

__all__ = ["TERMS", "Term", "help_text"]


@dataclass(frozen=True)
class Term:
    """One glossary entry.

    Fields:
        name: what the dashboard calls it, with its symbol ("recall R").
        short: one or two plain sentences saying what it is and how to read it.
        formula: how it is computed, in the symbols of docs/theory.md ("" when it is a name,
            not a number).
        doc_anchor: the section that explains more, as "<page>#<heading anchor>", the page
            named relative to the docs folder.
    """

    name: str
    short: str
    formula: str
    doc_anchor: str


_SETTING = "theory.md#setting"
_QUANTITIES = "theory.md#quantities"
_COUNTING = "theory.md#how-dfsviz-counts-padding-short-blocks-text-tokens"
_ORDERS = "theory.md#token-orders"
_SCORES = "theory.md#block-scores-and-selection"
_BOUND1 = "theory.md#bound-1-row-wise"
_BOUND2 = "theory.md#bound-2-block-level-what-a-capture-stores-and-the-dashboard-plots"
_BOUND3 = "theory.md#bound-3-closed-form-the-three-factors"
_DRIFT = "theory.md#mask-drift-a-mask-reused-at-later-steps"
_FOOTPRINTS = "theory.md#footprints-and-the-video"
_METHOD = "theory.md#the-dfsattn-method"
_TOKEN_MODEL = "theory.md#the-token-model"
_USED = "dashboard.md#what-dfsattn-did"
_CALIBRATION = "calibration.md#what-is-computed"
_DECISIONS = "calibration.md#decisions"

# Plain-language descriptions of the registered orders, scorers and selectors; _registry_terms
# refuses a registry entry without one, so the glossary never lags behind a registry.
_ORDER_TERMS = {
    "raster": ("raster order", "Frame by frame, row by row, column by column: the order the model itself uses. A "
               "block is a thin strip of one or two patch rows of one frame.", "position = (f · Hs + y) · Ws + x"),
    "hilbert3d": ("3D Hilbert order", "A continuous space-filling curve through (frame, row, column): consecutive "
                  "tokens are grid neighbours, so a block is a compact brick spanning a few frames. DFSAttn's order.",
                  ""),
    "hilbert2d": ("2D Hilbert order", "A Hilbert curve through the rows and columns of each frame, frames one after "
                  "the other: a block is a compact patch of one frame.", ""),
    "morton3d": ("Morton (Z) order", "Z-order of (frame, row, column): the bits of the three coordinates "
                 "interleaved. Compact like Hilbert, but the curve jumps between quadrants.",
                 "key = interleave bits of (f, y, x)"),
    "tiled": ("4×4×4 bricks (tiled)", "Bricks of 4 frames × 4 rows × 4 columns, bricks in raster order, raster "
              "order inside each brick (the paper's 'bricks' ablation).", ""),
}
_SCORER_TERMS = {
    "meanpool": ("mean pooling (meanpool)", "Scores a block pair by the logit of the mean query and the mean key of "
                 "the two blocks: cheap, and blind to how the tokens inside a block differ.",
                 "score_uv = L_uv = qbar_u · kbar_v · scale"),
    "dfs_tile": ("tile scoring (dfs_tile)", "DFSAttn's hierarchical scoring: queries and keys are averaged over "
                 "tiles of b tokens (b = 16), a softmax runs over all key tiles, and the tile probabilities are "
                 "summed per block pair. Finer than whole-block pooling.",
                 "score_uv = Σ over the (block/b)² tile pairs of softmax(qbar_tile · kbar_tile · scale)"),
    "antidiagonal": ("antidiagonal scoring", "XAttention's scoring: the logits along strided antidiagonals of each "
                     "S × S square (stride S = 8) go through a softmax and are summed per block pair.",
                     "score_uv = Σ of softmax(antidiagonal sums · scale / S) over the block pair"),
    "oracle": ("oracle scoring", "The exact block mass m_uv from dense attention: what a perfect scorer would say. "
               "Its top-k mask reaches the oracle recall.", "score_uv = m_uv"),
}
_SELECTOR_TERMS = {
    "topk": ("top-k selection", "Each query block keeps the k key blocks with the highest scores.",
             "k = max(1, int(γ · Mk))"),
    "cumulative": ("cumulative selection (τ)", "Each query block keeps its best-scored key blocks until they hold "
                   "a share τ of its score mass: a different number of blocks per query block.",
                   "smallest S_u with Σ_{v∈S_u} p_uv ≥ τ, p = scores normalised per row"),
}


def _registry_terms(registry, described: dict[str, tuple[str, str, str]], kind: str, anchor: str) -> dict[str, Term]:
    missing = [name for name in registry if name not in described]
    if missing:
        raise RuntimeError(f"glossary has no entry for the registered {kind} {missing}; add it to dfsviz/app/glossary.py")
    return {name: Term(*described[name], anchor) for name in registry}


_TERMS: dict[str, Term] = {
    # ------------------------------------------------------------------ the setting
    "capture": Term("capture", "A file `dfsviz capture` wrote while a model generated one clip: the attention maps "
                    "of the chosen steps, layers, heads and token orders. Every page shows one capture.", "",
                    _SETTING),
    "compare": Term("compare with", "A second capture drawn beside the first with the same controls (two models, "
                    "two prompts, uniform vs calibrated), on every page that shows a capture: curves and points of "
                    "both runs in one figure, the run in the legend; maps, plans and clips of the second run in a "
                    "row under the first's. A selection the second capture lacks is said in one line and the first "
                    "run still shows.", "", "dashboard.md#compare-two-runs"),
    "step": Term("denoising step", "The 0-based diffusion step of the run at which the maps were captured; "
                 "attention gets more concentrated as denoising proceeds.", "", _METHOD),
    "layer": Term("layer", "A self-attention layer (transformer block) of the model, counted from 0.", "", _SETTING),
    "head": Term("head", "One attention head of a layer: every map, mask and recall is per head.", "", _SETTING),
    "branch": Term("CFG branch", "With classifier-free guidance the model runs twice per step: 'cond' with the "
                   "prompt and 'uncond' without it. Each branch has its own attention maps.", "", _METHOD),
    "latent_grid": Term("latent grid F × Hs × Ws", "The video as the transformer sees it: F latent frames of Hs × Ws "
                        "patches, one token each. One latent frame stands for one or more video frames.",
                        "N = F · Hs · Ws video tokens (+ text tokens)", _SETTING),
    "logit": Term("logit l_ij", "How strongly query i matches key j before the softmax.",
                  "l_ij = q_i · k_j · scale, scale = 1/√d unless the model sets its own", _SETTING),
    "attention": Term("attention A_ij", "The share of query i's attention that goes to key j; each query's "
                      "attention sums to 1.", "A_ij = exp(l_ij) / Σ_j' exp(l_ij')", _SETTING),
    "block": Term("block", "A run of consecutive tokens of the ordered sequence (128 by default). Queries and keys "
                  "are cut into the same blocks; block-sparse attention keeps or skips whole (query block, key "
                  "block) pairs. The last block may be short.",
                  "Mq = Mk = ceil(N / block); n_v = block, the last N − (Mk − 1) · block", _SETTING),
    "query_block": Term("query block u", "A block of query rows U_u: one row of a block map (the vertical axis).",
                        "U_u = ordered positions u · block … min(N, (u + 1) · block) − 1", _SETTING),
    "key_block": Term("key block v", "A block of keys V_v: one column of a block map (the horizontal axis).",
                      "V_v = ordered positions v · block … min(N, (v + 1) · block) − 1", _SETTING),
    "qkv": Term("stored Q/K/V", "The queries, keys and values of the layers captured with --save-qkv. With them "
                "the Live page runs attention anew and footprints are computed exactly for any query block.", "",
                _FOOTPRINTS),
    "text_tokens": Term("text tokens", "Prompt tokens that share the self-attention sequence (HunyuanVideo, "
                        "CogVideoX). They keep their place in every order and count like any other token.",
                        "", _COUNTING),
    # ------------------------------------------------------------------ token orders
    "order": Term("token order", "The permutation of the video tokens applied before blocks are cut. An order that "
                  "keeps neighbouring (frame, row, column) tokens together makes blocks whose tokens look alike, so "
                  "block scores separate better.", "ordered[p] = original[perm[p]]", _ORDERS),
    **_registry_terms(ORDERS, _ORDER_TERMS, "orders", _ORDERS),
    # ------------------------------------------------------------------ the block maps
    "block_mass": Term("block mass m_uv", "How much attention an average query of block u gives to key block v. "
                       "Each row of the map sums to 1; bright cells are the blocks worth keeping.",
                       "m_uv = (1/|U_u|) Σ_{i∈U_u} Σ_{j∈V_v} A_ij", _QUANTITIES),
    "mask": Term("mask S", "For each query block u the set S_u of key blocks it keeps; attention is computed only "
                 "on kept blocks. Outlined on the block maps.", "S_u ⊆ {0 … Mk − 1}", _QUANTITIES),
    "gamma": Term("budget γ (kept fraction)", "The fraction of key blocks each query block keeps. DFSAttn's code "
                  "calls it 'sparsity', although it is what is kept.",
                  "γ_u = |S_u| / Mk; top-k keeps k = max(1, int(γ · Mk))", _QUANTITIES),
    "density": Term("density ρ", "The fraction of all query-key token pairs that block-sparse attention computes: "
                    "the attention work relative to dense attention. A kept short last block counts its real tokens "
                    "only.", "ρ(S) = Σ_u Σ_{v∈S_u} |U_u| · n_v / N²", _COUNTING),
    "sparsity": Term("sparsity 1 − ρ", "The fraction of token pairs skipped: what result tables call sparsity.",
                     "1 − ρ(S)", _QUANTITIES),
    "recall": Term("recall R", "The share of attention the mask keeps, averaged over all N queries: 1 means "
                   "nothing is lost, 0.9 that a tenth of the attention falls on skipped blocks.",
                   "R(S) = Σ_u (|U_u| / N) Σ_{v∈S_u} m_uv", _QUANTITIES),
    "query_block_recall": Term("recall of a query block R_u", "The share of query block u's attention its kept key "
                               "blocks hold.", "R_u(S) = Σ_{v∈S_u} m_uv", _QUANTITIES),
    "oracle_recall": Term("oracle recall R*(k)", "The best recall any mask keeping k key blocks per query block can "
                          "reach: each query block keeps its k largest block masses. The dashed curves; a scorer's "
                          "curve below it shows what its estimates lose.",
                          "R*(k) = Σ_u (|U_u| / N) · (sum of the k largest m_uv of row u)", _QUANTITIES),
    # ------------------------------------------------------------------ scoring and selection
    "scores": Term("block scores", "A cheap estimate of each block pair's attention, computed without dense "
                   "attention; the selector keeps the highest-scored key blocks.", "", _SCORES),
    "method": Term("scoring method", "Which block scorer ranks the key blocks (meanpool, dfs_tile, antidiagonal, "
                   "or the exact oracle).", "", _SCORES),
    **_registry_terms(SCORERS, _SCORER_TERMS, "scoring methods", _SCORES),
    **_registry_terms(SELECTORS, _SELECTOR_TERMS, "selectors", _SCORES),
    "tau": Term("target mass τ", "The share of a row's score mass that cumulative selection keeps.",
                "0 < τ ≤ 1", _SCORES),
    "target_recall": Term("target recall", "A recall to reach: the Recall page reports the budget γ and the density "
                          "each method needs for it; Calibrate gives every head the smallest budget that reaches it.",
                          "smallest k with R(k) ≥ target", _DECISIONS),
    # ------------------------------------------------------------------ the bounds and their factors
    "pooled_logit": Term("pooled logit L_uv", "The average logit between the queries of block u and the keys of "
                         "block v: exactly what mean pooling scores.",
                         "L_uv = mean_{i∈U_u, j∈V_v} l_ij = qbar_u · kbar_v · scale", _QUANTITIES),
    "row_block_logit": Term("row-block logit Lbar_iv", "The average logit of one query i over the keys of block v.",
                            "Lbar_iv = mean_{j∈V_v} l_ij = q_i · kbar_v · scale", _QUANTITIES),
    "key_side_diversity": Term("key-side diversity J_iv", "How unevenly one query's logits spread over the keys of a "
                               "block (a Jensen gap): 0 when they are all equal, about σ²/2 for a Gaussian spread "
                               "σ.", "J_iv = log((1/n_v) Σ_{j∈V_v} exp(l_ij − Lbar_iv)) ≥ 0", _QUANTITIES),
    "r": Term("query-side diversity r", "How far the queries of a block disagree with their mean about a key block. "
              "Small r: the block's queries attend alike. Per query block the dashboard shows r_u, the largest over "
              "key blocks.", "r_uv = max_{i∈U_u} |Lbar_iv − L_uv|; r_u = max_v r_uv", _QUANTITIES),
    "J": Term("block diversity J", "How uneven the keys of a block look to the queries of another: the largest "
              "key-side diversity over the query rows. Per query block the dashboard shows J_u, the largest over "
              "dropped key blocks.", "J_uv = max_{i∈U_u} J_iv; J_u = max_{w∉S_u} J_uw", _QUANTITIES),
    "gap": Term("inter-block similarity gap Δ", "How far the weakest kept key block stands above the strongest "
                "dropped one, in pooled logits. A large gap means the mask separates relevant from irrelevant "
                "blocks clearly.", "Δ_u(S) = min_{v∈S_u} L_uv − max_{w∉S_u} L_uw", _QUANTITIES),
    "effective_gap": Term("effective gap Δ − 2r − J", "The gap left once the diversity inside blocks is paid for: "
                          "the single number Bound 3 depends on besides the budget. At 0 the bound equals γ.",
                          "Δ_u − 2 r_u − J_u", _BOUND3),
    "bound1": Term("Bound 1 (row-wise)", "A lower bound on each query row's recall from the row's own logits; "
                   "needs the stored Q/K.",
                   "R_i ≥ Σ_{v∈S_u} n_v e^{Lbar_iv} / (Σ_{v∈S_u} n_v e^{Lbar_iv} + Σ_{w∉S_u} n_w e^{Lbar_iw + J_iw})",
                   _BOUND1),
    "bound2": Term("Bound 2 β (block level)", "A lower bound on a query block's recall from the four stored block "
                   "maps. It must never exceed the measured recall: a point above the line y = x is a bug.",
                   "β_u = Σ_{v∈S_u} n_v e^{L_uv − r_uv} / (Σ_{v∈S_u} n_v e^{L_uv − r_uv} + "
                   "Σ_{w∉S_u} n_w e^{L_uw + r_uw + J_uw}) ≤ R_u", _BOUND2),
    "bound3": Term("Bound 3 (closed form)", "The lower bound in the three factors: recall rises with the budget γ "
                   "and the gap Δ and falls with the diversity 2r + J.",
                   "R_u ≥ 1 / (1 + ((1 − γ) / γ) · exp(−(Δ_u − 2 r_u − J_u)))", _BOUND3),
    "W_q": Term("intra-block variance ratio W_q", "The share of the queries' variance that stays inside blocks. "
                "Lower means blocks of queries that look alike; compact orders lower it.",
                "W_q = Σ_u Σ_{i∈U_u} ‖q_i − qbar_u‖² / Σ_i ‖q_i − qbar‖²", _QUANTITIES),
    "W_k": Term("intra-block variance ratio W_k", "The share of the keys' variance that stays inside blocks. Lower "
                "means blocks of keys that look alike; compact orders lower it.",
                "W_k = Σ_v Σ_{j∈V_v} ‖k_j − kbar_v‖² / Σ_j ‖k_j − kbar‖²", _QUANTITIES),
    # ------------------------------------------------------------------ drift
    "reused_recall": Term("recall of a reused mask", "The recall at step t of the mask chosen at step s: what a "
                          "cached mask still covers as attention moves. The diagonal (s = t) is the fresh recall.",
                          "R(S^(s); m^(t)) = Σ_u (|U_u| / N) Σ_{v∈S^(s)_u} m^(t)_uv", _DRIFT),
    "jaccard": Term("Jaccard (mask drift)", "How much the mask chosen at step s overlaps the one step t would "
                    "choose: 1 for the same blocks, 0 for none in common.",
                    "Σ_u (|U_u| / N) · |S^(s)_u ∩ S^(t)_u| / |S^(s)_u ∪ S^(t)_u|", _DRIFT),
    # ------------------------------------------------------------------ footprints and the video
    "footprint": Term("attention footprint", "Where the queries of one block look: their mean attention over every "
                      "token of the video, drawn on the frames (brighter: more attention). The outlined tokens are "
                      "the query block itself.", "a_j = (1/|U_u|) Σ_{i∈U_u} A_ij, in original token order",
                      _FOOTPRINTS),
    "kept_key_blocks": Term("kept key blocks", "The tokens of the key blocks the selected query block keeps under "
                            "the chosen method and budget, outlined on the frames: where its sparse attention looks.",
                            "tokens of V_v for v ∈ S_u", _FOOTPRINTS),
    "latent_frame": Term("latent frame", "A frame of the latent grid. It stands for one or more video frames (one "
                         "for the embedded model, 4 for Wan's VAE), so a video frame shows the maps of the latent "
                         "frame it belongs to.", "", _FOOTPRINTS),
    # ------------------------------------------------------------------ the schedule
    "schedule": Term("DFSAttn schedule", "Dense attention for the first steps, then a mask computed at each refresh "
                     "step and reused until the next, with a budget that shrinks at each refresh.",
                     "γ = clip(γ0 − r · decrement, 0, 1) in the r-th refresh interval", _METHOD),
    "warmup": Term("dense warm-up steps", "Steps at the start that run dense attention, before the first mask.",
                   "steps 0 … W − 1 dense", _METHOD),
    "refresh_interval": Term("refresh interval", "Steps between two mask computations; in between, each layer "
                             "reuses its cached mask.", "refresh at steps W, W + I, W + 2I, …", _METHOD),
    "gamma0": Term("γ0", "The budget of the first sparse interval.", "γ = γ0 at steps W … W + I − 1", _METHOD),
    "gamma_decrement": Term("γ decrement", "How much the budget falls at each refresh; it never reaches 0.",
                            "γ_r = γ0 − r · decrement", _METHOD),
    "dfsattn_used": Term("masks DFSAttn used", "The masks DFSAttn attended while the run was recorded with "
                         "apply_dfsattn active, stored per step, layer and head: what it actually kept, not a "
                         "replay. Their recall is measured on the step's own block mass; where DFSAttn ran dense "
                         "(warm-up steps, dense layers) the mask keeps every block (recall 1, density 1). The "
                         "Overview gives the mean over layers and heads and the lowest and highest.",
                         "R(S_used; m^(t)) and ρ(S_used) per (layer, head), S_used = dfsattn_mask at step t",
                         _USED),
    "dfsattn_plan": Term("plan of a step (dense, refresh, cached)", "What DFSAttn's schedule did at a step: 'dense' "
                         "attends every block, 'refresh' scores the blocks and keeps a new mask, 'cached' reuses "
                         "the mask of the last refresh. A cached step's mask is the refresh's: Jaccard 1.",
                         "refresh at steps W, W + I, …; cached in between; dense before W", _METHOD),
    # ------------------------------------------------------------------ calibration
    "max_density": Term("max density (work budget)", "Attention work of the whole run as a fraction of dense "
                        "attention at every step: warm-up steps count 1, sparse steps their mean density, each "
                        "refresh adds the refresh cost.", "work = (W + (T − W) · mean ρ + refreshes · cost · share of scored layers) / T",
                        _DECISIONS),
    "fresh_recall": Term("fresh curve F(k)", "Recall of a mask chosen at the step it is used, at k kept blocks, "
                         "averaged over the captured clips and sparse steps.", "F(k) = mean_t R(S^(t)_k; m^(t))",
                         _CALIBRATION),
    "reuse_factor": Term("reuse factor φ_d(k)", "The share of a fresh mask's recall a mask keeps d steps after it "
                         "was chosen: 1 at d = 0, lower as attention drifts.",
                         "φ_d(k) = mean over t − s = d of R(s→t) / R(t→t)", _CALIBRATION),
    "predicted_recall": Term("predicted recall P(k)", "A head's recall at k kept blocks at its oldest cached mask, "
                             "predicted from the captures.", "P(k) = F(k) · min_{d < I} φ_d(k)", _CALIBRATION),
    "dense_above": Term("dense above γ", "Heads that would need a larger kept fraction run dense: above about 85 % "
                        "the block-sparse kernel gains nothing on dense attention.", "", _DECISIONS),
    "refresh_cost": Term("refresh cost", "The work of one mask refresh, in dense attention calls of the layer.",
                         "", _DECISIONS),
    # ------------------------------------------------------------------ the token model
    "token_model": Term("token model", "Synthetic queries and keys whose factors are set rather than measured: "
                        "tokens belong to moving regions, each with its own centre, plus position and noise.",
                        "k_j = c^k_class(j) + a · φ(pos_j) + e_j,  e_j ~ N(0, δ² I)", _TOKEN_MODEL),
    "delta": Term("token-model noise δ", "The spread of tokens around their class centre: it sets the diversity "
                  "r and J.", "e_j ~ N(0, δ² I)", _TOKEN_MODEL),
    "centre_spread": Term("token-model centre spread s", "How far apart the class centres are: it sets the gap Δ.",
                          "c ~ N(0, s² I)", _TOKEN_MODEL),
}

#: Every term the dashboard shows, in reading order: key -> :class:`Term` (read-only).
TERMS = MappingProxyType(_TERMS)


def help_text(term: str) -> str:
    """The hover line of ``term``: "name: short (formula)", e.g. for ``help_text("density")``.

    Raises KeyError naming the term, the closest known terms and where the list is
    (``TERMS``) when ``term`` is not in the glossary.
    """
    entry = TERMS.get(term) if isinstance(term, str) else None
    if entry is None:
        close = difflib.get_close_matches(str(term), list(TERMS), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"`term` {term!r} is not in the dashboard glossary{hint} Known terms: dfsviz.app.glossary.TERMS")
    formula = f" ({entry.formula})" if entry.formula else ""
    return f"{entry.name}: {entry.short}{formula}"
