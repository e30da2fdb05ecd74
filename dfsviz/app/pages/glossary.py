"""Glossary: every quantity and setting of the dashboard with its definition and formula.

One entry per term of :data:`dfsviz.app.glossary.TERMS`, in its order, each an element whose
id is the term's key, so ``/glossary#recall`` (:func:`term_href`) opens the page on the
recall entry: the help of every other page links here. A filter box narrows the list to the
terms whose name, definition or formula holds the typed text.
"""

from __future__ import annotations

import dash
from dash import Input, Output, dcc, html

from dfsviz.app.glossary import TERMS, help_text

NAME, PATH, PREFIX = "Glossary", "/glossary", "gl"
_HIGHLIGHT = "#fef3c7"


def term_href(term: str) -> str:
    """The address of ``term``'s entry on this page, e.g. "/glossary#recall".

    Raises KeyError (from :func:`dfsviz.app.glossary.help_text`) for a term the glossary lacks.
    """
    help_text(term)
    return f"{PATH}#{term}"


def _entry(key: str) -> html.Div:
    term = TERMS[key]
    body = [html.H4(term.name, style={"margin": "0 0 2px"}), html.Div(term.short)]
    if term.formula:
        body.append(html.Code(term.formula, className="dfs-command", style={"display": "inline-block", "margin": "4px 0"}))
    body.append(html.Div(f"More: docs/{term.doc_anchor} in the dfsviz repository.", className="dfs-note"))
    return html.Div(body, id=key, className="dfs-term", style={"padding": "8px 10px", "borderBottom": "1px solid #e5e7eb",
                                                               "scrollMarginTop": "12px"})


def layout(**query):
    index = [html.A(TERMS[key].name, href=f"#{key}") for key in TERMS]
    return html.Div([
        html.H2("Glossary"),
        html.P("Every quantity and setting the dashboard shows: what it means, and how it is computed. Symbols: "
               "N tokens, block queries U_u and keys V_v of n_v tokens, M_q = M_k blocks, A_ij the attention of "
               "query i on key j. The help beside each control links to its entry here.", className="dfs-note"),
        dcc.Input(id=f"{PREFIX}-filter", type="search", placeholder="filter: recall, γ, Jaccard …", debounce=False,
                  style={"width": "320px", "margin": "6px 0"}),
        html.Div(id=f"{PREFIX}-shown", className="dfs-note"),
        html.Div(index, id=f"{PREFIX}-index", style={"display": "flex", "flexWrap": "wrap", "gap": "4px 14px",
                                                     "fontSize": "13px", "margin": "6px 0 10px"}),
        html.Div([_entry(key) for key in TERMS], id=f"{PREFIX}-terms"),
        dcc.Store(id=f"{PREFIX}-target"),
    ])


def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=8)

    # The entry named by the address's #fragment is scrolled to and marked once the page is drawn
    # (Dash draws pages after the browser has looked for the fragment, so it must be done here);
    # the index never changes, so filtering the list does not scroll back.
    app.clientside_callback(
        """
        function(index) {
            const key = decodeURIComponent(window.location.hash.slice(1));
            const el = key ? document.getElementById(key) : null;
            if (el && el.classList.contains('dfs-term')) {
                el.style.background = '%s';
                el.scrollIntoView({block: 'start'});
                return key;
            }
            return '';
        }
        """ % _HIGHLIGHT,
        Output(f"{PREFIX}-target", "data"),
        Input(f"{PREFIX}-index", "children"),
    )

    @app.callback(Output(f"{PREFIX}-terms", "children"), Output(f"{PREFIX}-shown", "children"),
                  Input(f"{PREFIX}-filter", "value"), prevent_initial_call=True)
    def _filter(text):
        needle = (text or "").strip().lower()
        keys = [k for k, t in TERMS.items()
                if not needle or needle in f"{k} {t.name} {t.short} {t.formula}".lower()]
        shown = "" if not needle else f"{len(keys)} of {len(TERMS)} terms hold “{text.strip()}”."
        return [_entry(k) for k in keys], shown
