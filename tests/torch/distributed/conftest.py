"""Fixtures of the distributed tests that run in this process."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_rank_mesh():
    """A one-rank gloo group in this process and its CPU device mesh (torchtune's
    test_dtensor_cross_entropy runs on a one-rank mesh too); destroyed afterwards."""
    import datetime

    import torch.distributed as dist
    from dist_harness import free_port
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
