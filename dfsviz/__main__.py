"""``python -m dfsviz``: the ``dfsviz`` command (so ``torchrun -m dfsviz capture ...`` works too)."""

from dfsviz.cli import main

main(prog_name="dfsviz")
