"""The dashboard glossary: every registered order, scorer and selector and every plotted
quantity has an entry; every entry points to a section that exists in the repository's
docs; help_text formats an entry and refuses unknown terms; docs/theory.md links only to
what the repository holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dfsviz.app.glossary import TERMS, Term, help_text
from dfsviz.figures import FACTOR_LABELS
from dfsviz.sparse.orders import ORDERS
from dfsviz.sparse.scoring import SCORERS
from dfsviz.sparse.select import SELECTORS

DOCS = Path(__file__).resolve().parents[2] / "docs"

# Axis quantities of dfsviz.figures and the glossary term that explains each (the figures
# key per query block, r_u and J_u, is the per-block form of r and J).
FACTOR_TERMS = {"gap": "gap", "r_u": "r", "J_u": "J", "effective_gap": "effective_gap", "delta": "delta",
                "centre_spread": "centre_spread", "W_q": "W_q", "W_k": "W_k", "recall": "recall",
                "bound2": "bound2", "bound3": "bound3", "gamma": "gamma", "density": "density"}

# Terms the issue asks the glossary to define, by name.
REQUIRED = ("recall", "gamma", "density", "sparsity", "block", "block_mass", "scores", "bound1", "bound2", "bound3",
            "r", "J", "W_q", "W_k", "gap", "effective_gap", "jaccard", "footprint", "oracle_recall", "order",
            "target_recall", "fresh_recall", "reuse_factor", "predicted_recall", "max_density", "dense_above",
            "refresh_cost", "warmup", "refresh_interval", "latent_frame", "dfsattn_used", "dfsattn_plan")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in doc.read_text().splitlines() if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("registry", [ORDERS, SCORERS, SELECTORS], ids=["orders", "scorers", "selectors"])
def test_every_registered_name_has_a_term(registry):
    missing = [name for name in registry if name not in TERMS]
    assert not missing, f"no glossary entry for {missing}"


def test_every_plotted_quantity_and_required_term_has_an_entry():
    assert set(FACTOR_TERMS) == set(FACTOR_LABELS), "a new axis quantity of dfsviz.figures needs a glossary term"
    missing = [t for t in (*FACTOR_TERMS.values(), *REQUIRED) if t not in TERMS]
    assert not missing


@pytest.mark.parametrize("key", list(TERMS))
def test_term_is_complete_and_points_to_an_existing_section(key):
    term = TERMS[key]
    assert isinstance(term, Term)
    assert term.name.strip() and len(term.short.split()) >= 5, "a definition is at least a short sentence"
    assert term.short.rstrip().endswith("."), term.short
    file, _, anchor = term.doc_anchor.partition("#")
    doc = DOCS / file
    assert doc.is_file(), f"{key}: docs/{file} is not in the repository"
    assert anchor in anchors(doc), f"{key}: docs/{file} has no section #{anchor}"


def test_symbols_agree_with_the_dashboard_axis_titles():
    # the glossary names a quantity with the symbol the axes use (Δ, γ, ρ, W_q ...)
    for figure_key, term in FACTOR_TERMS.items():
        symbol = FACTOR_LABELS[figure_key].split()[-1].rstrip(")")
        if figure_key in ("r_u", "J_u", "effective_gap", "bound3", "gamma"):
            continue  # per-block forms and phrases: checked below
        assert symbol in TERMS[term].name, (figure_key, symbol, TERMS[term].name)
    assert "γ" in TERMS["gamma"].name and "Δ − 2r − J" in TERMS["effective_gap"].name
    assert "r_u" in TERMS["r"].formula and "J_u" in TERMS["J"].formula


def test_help_text_gives_name_definition_and_formula():
    text = help_text("density")
    assert text.startswith("density ρ: ")
    assert "token pairs" in text
    assert text.endswith("(ρ(S) = Σ_u Σ_{v∈S_u} |U_u| · n_v / N²)")
    assert help_text("layer").endswith("counted from 0.")  # a name, not a number: no formula


def test_help_text_refuses_unknown_terms_and_suggests_close_ones():
    with pytest.raises(KeyError, match=r"`term` 'recal' is not in the dashboard glossary; did you mean 'recall'"):
        help_text("recal")
    with pytest.raises(KeyError, match=r"`term` 'zzz' is not in the dashboard glossary Known terms: .*TERMS"):
        help_text("zzz")
    with pytest.raises(KeyError, match=r"`term` 3 is not in the dashboard glossary"):
        help_text(3)


def test_terms_are_read_only():
    with pytest.raises(TypeError):
        TERMS["recall"] = TERMS["density"]


def test_theory_page_links_only_inside_the_repository():
    text = (DOCS / "theory.md").read_text()
    assert "shared" not in text and "../" not in text
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("https://"):
            continue
        file, _, anchor = target.partition("#")
        doc = DOCS / file if file else DOCS / "theory.md"
        assert doc.is_file(), f"theory.md links to {target}, which is not in docs/"
        if anchor:
            assert anchor in anchors(doc), f"theory.md links to {target}: no such section"


def test_theory_page_defines_every_symbol_the_glossary_uses():
    text = (DOCS / "theory.md").read_text()
    for symbol in ("N", "d", "M_q", "M_k", "n_v", "|U_u|", "qbar_u", "kbar_v", "tau", "gamma", "rho", "Delta",
                   "r_uv", "J_uv", "W_q", "W_k", "beta_u", "R*(k)", "Jaccard", "footprint", "latent frame"):
        assert symbol in text, symbol
