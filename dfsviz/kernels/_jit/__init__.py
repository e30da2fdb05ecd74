"""The Triton side of dfsviz.kernels: ``@triton.jit`` kernels, their autotune spaces and
launchers. Only the dispatchers import these modules, and only once ``triton_available()``
says Triton imports, so ``dfsviz.kernels`` itself imports (and falls back to the PyTorch
references) without Triton. Launchers trust their inputs: the public functions validate."""
