"""`dfsviz.sparse` is the pure-PyTorch core: importing it must not pull in dash, diffusers or triton."""

import json
import subprocess
import sys


def test_sparse_imports_without_dash_diffusers_triton():
    code = (
        "import sys, json; import dfsviz.sparse as s; "
        "print(json.dumps({'names': len(s.__all__), "
        "'loaded': sorted(m for m in ('dash', 'diffusers', 'triton') if m in sys.modules)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["names"] > 30


def test_every_public_name_resolves():
    import dfsviz.sparse as s

    missing = [name for name in s.__all__ if not hasattr(s, name)]
    assert missing == []
