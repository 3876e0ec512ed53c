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


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-on-cpu", action="store_true",
        help="run the gpu-marked tests that take the `gpu_device` fixture on CPU tensors, Triton kernels in "
             "the interpreter (needs TRITON_INTERPRET=1): the CPU rehearsal of scripts/gpu_acceptance.sh")


@pytest.fixture
def gpu_device(request) -> str:
    """"cuda", or "cpu" under --gpu-on-cpu: the device of a gpu-marked test that
    can also rehearse on CPU (so the acceptance run's test code cannot rot)."""
    if not request.config.getoption("--gpu-on-cpu"):
        return "cuda"
    from vopd_megatron.loss.backend import interpreter_on

    if not interpreter_on():
        pytest.fail("--gpu-on-cpu needs TRITON_INTERPRET=1 in the environment of pytest")
    return "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    rehearse = config.getoption("--gpu-on-cpu")
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (rehearse and "gpu_device" in getattr(item, "fixturenames", ())):
            item.add_marker(skip)
