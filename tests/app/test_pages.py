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


def csv_download(app, figure, name="mk-left"):
    """POST the CSV download of figure card ``name`` with ``figure`` as the browser's copy of it."""
    key = next(k for k in app.callback_map if '"csv-dl"' in k)
    ident = {"name": name, "type": "csv"}
    payload = {
        "output": key, "outputs": {"id": {"name": name, "type": "csv-dl"}, "property": "data"},
        "inputs": [{"id": ident, "property": "n_clicks", "value": 1}],
        "state": [{"id": {"name": name, "type": "fig"}, "property": "figure", "value": figure}],
        "changedPropIds": [json.dumps(ident, separators=(",", ":")) + ".n_clicks"],
    }
    return app.server.test_client().post("/_dash-update-component", json=payload)


@pytest.mark.parametrize("figure", [
    "a string",
    {"data": "not a list"},
    {"data": [{"type": "heatmap", "z": {"dtype": "f8", "bdata": "***not base64***"}}]},
    {"data": [{"type": "heatmap", "z": {"dtype": "no such dtype", "bdata": ""}}]},
    {"data": [{"type": "heatmap", "z": {"dtype": "f8", "bdata": "AAAAAAAAAAA=", "shape": "3, 3"}}]},
    {"data": [{"type": "heatmap", "z": [[1.0]], "meta": {"flags": {"name": "kept", "bits": "AA=="}}}]},
])
def test_a_csv_download_of_a_figure_the_page_never_drew_is_refused(app, figure, caplog):
    """A crafted figure gets no CSV and no server error (204: nothing to update), and the log says why."""
    response = csv_download(app, figure, name="mk-left\nforged log line")
    assert response.status_code == 204, response.data[:300]
    assert "CSV download of mk-left_forged_log_line refused: not a figure this app draws" in caplog.text


def test_a_csv_download_of_a_drawn_figure_holds_its_numbers(app):
    figure = {"data": [{"type": "scatter", "name": "line", "x": [0.1, 0.2], "y": [1.0, 2.0]}],
              "layout": {"title": {"text": "Recall"}}}
    response = csv_download(app, figure)
    assert response.status_code == 200
    data = response.get_json()["response"]["{\"name\":\"mk-left\",\"type\":\"csv-dl\"}"]["data"]
    assert data["filename"] == "dfsviz_mk-left.csv"
    assert data["content"].splitlines() == ["figure,Recall", "trace,x,y,z", "line,0.1,1.0,", "line,0.2,2.0,"]


@pytest.mark.parametrize("qb", [10**9, -1, "7", 2.5])
def test_a_query_block_the_page_never_sends_is_ignored_with_a_note(app, qb):
    """The clicked block comes back from the browser: one outside the capture's blocks (or not a
    whole number) is ignored, the first candidate block is shown and the note says so."""
    out = masks_callback(app, {**MASKS, "mk-qorder": "raster", "mk-qb": qb})
    note = json.dumps(out["mk-fp-note"]["children"])
    assert f"Query block '{qb}' is not one of this capture's" in note and "blocks; ignored." in note, note
    assert "Showing raster query block" in note
    assert out["mk-fp-banner"]["children"] == []
