"""Dashboard pages (Dash Pages). Each module defines NAME, PATH, PREFIX (the prefix of its
component ids), ``layout(**query)`` and ``register(app)``, which registers the page and
its callbacks on one app (callbacks are bound per app, never global)."""

from dfsviz.app.pages import calibrate, drift, glossary, live, masks, overview, recall, theory, video

#: Page modules in navigation order.
PAGE_MODULES = (overview, masks, video, recall, theory, drift, calibrate, live, glossary)

__all__ = ["PAGE_MODULES"]
