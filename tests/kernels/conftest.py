"""Fixtures shared by the kernel tests."""

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
