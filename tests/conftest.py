"""Shared fixtures: gloo process pools started once per test session."""
import pytest
import torch

from vopd_megatron.testing import GlooPool


@pytest.fixture(scope="session")
def gloo_pools():
    pools = {}

    def get(world_size: int) -> GlooPool:
        if world_size not in pools:
            pools[world_size] = GlooPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
