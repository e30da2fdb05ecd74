"""Fixtures shared by the kernel tests."""

import importlib
from unittest import mock

import pytest
import torch


@pytest.fixture
def no_host_reads():
    """A context manager under which reading a tensor value into Python (``.item()``,
    ``bool(tensor)``, ... : a host sync on CUDA) raises AssertionError. The interpreter copies
    tensors to the host by other means, so this sees the launchers' reads, not every sync."""

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    return lambda: mock.patch.multiple(torch.Tensor, item=host_read, tolist=host_read, __bool__=host_read,
                                       __int__=host_read, __float__=host_read)


@pytest.fixture
def launched_kernels(monkeypatch):
    """The names of the attention kernels (``dfsviz.kernels._jit.attention``) launched during the
    test, in launch order: the descriptor and pointer kernels compute the same values, so which
    one ran shows only here (a spy on the launchers' one launch function)."""
    jit_attention = importlib.import_module("dfsviz.kernels._jit.attention")
    kernels = []
    launch = jit_attention._launch

    def spy(kernel, *args, **kwargs):
        kernels.append(kernel.__name__)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(jit_attention, "_launch", spy)
    return kernels
