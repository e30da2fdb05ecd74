"""Page callbacks answered over HTTP as the browser asks them (Flask's test client, no
browser): a file that fails validation is refused by every callback, and no message the
app sends names a path of the server."""

from __future__ import annotations

import json

import pytest

from dfsviz.app import create_app

MASKS = {"mk-file": "runs/good.h5", "mk-step": 3, "mk-layer": 1, "mk-head": 0, "mk-method": "meanpool",
         "mk-budget": 0.2, "mk-orders": ["raster", "hilbert3d"], "mk-drawn": None, "mk-scale": "shared",
         "mk-qorder": None, "mk-qb": None}


@pytest.fixture(scope="module")
def app(capture_root):
    app = create_app(capture_root)
    yield app
    app.server.config["DFSVIZ_CATALOG"].close()


def masks_callback(app, values: dict) -> dict:
    """POST the Masks page's maps callback (left, right, banner) with ``values``; the response's outputs."""
    key = next(k for k in app.callback_map if "mk-banner.children" in k and "mk-left" in k)
    spec = app.callback_map[key]
    outputs = [{"id": json.loads(o.component_id_str()) if o.component_id_str().startswith("{") else o.component_id,
                "property": o.component_property} for o in spec["output"]]
    payload = {
        "output": key, "outputs": outputs,
        "inputs": [{**i, "value": values[i["id"]]} for i in spec["inputs"]],
        "state": [{**i, "value": values[i["id"]]} for i in spec["state"]],
        "changedPropIds": ["mk-file.value"],
    }
    response = app.server.test_client().post("/_dash-update-component", json=payload)
    assert response.status_code == 200, response.data[:500]
    return response.get_json()["response"]


def banner_text(outputs: dict) -> str:
    return json.dumps(outputs["mk-banner"]["children"])


def test_a_sound_file_is_drawn(app):
    out = masks_callback(app, MASKS)
    left = out[json.dumps({"name": "mk-left", "type": "fig"}, separators=(",", ":"))]["figure"]
    assert len(left["data"]) == 2 and out["mk-banner"]["children"] == []


def test_a_callback_asked_for_an_invalid_file_refuses_it(app, capture_root):
    """Even a request the page would never send (the picker disables the file): step 3 of
    damaged.h5 is sound, yet the file failed validation, so nothing of it is drawn."""
    out = masks_callback(app, {**MASKS, "mk-file": "runs/damaged.h5"})
    text = banner_text(out)
    assert "runs/damaged.h5: invalid capture, not drawn: step_0002/m" in text
    left = out[json.dumps({"name": "mk-left", "type": "fig"}, separators=(",", ":"))]["figure"]
    assert left["data"] == []
    assert str(capture_root.parent) not in json.dumps(out)


def test_errors_name_no_server_path(app, capture_root, monkeypatch):
    from dfsviz.app.pages import masks

    out = masks_callback(app, {**MASKS, "mk-file": "runs/broken.h5"})
    assert "runs/broken.h5" in banner_text(out) and str(capture_root.parent) not in json.dumps(out)

    def fails(*args, **kwargs):
        raise RuntimeError(f"HDF5 error in {capture_root / 'good.h5'}")

    monkeypatch.setattr(masks, "mask_view", fails)
    text = banner_text(masks_callback(app, MASKS))
    assert "internal error (RuntimeError); the server log has the details" in text
    assert str(capture_root.parent) not in text
