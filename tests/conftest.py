import signal

import pytest

from crnet.data import synthetic

# The suite checks what Ctrl-C does. A shell without job control starts a command run in the background
# (`cmd &`) with SIGINT ignored, and Python keeps it ignored: no KeyboardInterrupt, here or in the processes
# the tests start. Ctrl-C as a terminal delivers it, then; the processes started inherit it as the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def bench_root(tmp_path_factory):
    """A small built-in benchmark (every class in both splits), shared by the tests that train or evaluate."""
    return synthetic.generate(
        tmp_path_factory.mktemp("bench"), seed=0, train_per_class=4, val_per_class=3, image_size=48
    )


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """An untrained CRNet small enough to export in seconds (33 px input, 5x5 features, 16 channels)."""
    import torch

    from crnet.checkpoint import save_atomic
    from crnet.model.crnet import build_model
    from tests.ddp_worker import MICRO

    torch.manual_seed(0)
    model = build_model(MICRO)
    return save_atomic(
        {"model_config": MICRO.to_dict(), "model": model.state_dict()},
        tmp_path_factory.mktemp("micro") / "micro.pt",
    )


@pytest.fixture(scope="session")
def micro_bundle(micro_checkpoint, tmp_path_factory):
    """The micro model exported with FP32 and FP16 graphs (read-only: tests that damage one copy it)."""
    pytest.importorskip("onnxruntime", reason="export tests need the [export] extra")
    from crnet.bundle import BatchRange
    from crnet.export.build import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "micro"
    return export_bundle(micro_checkpoint, out, fp16=True, batch=BatchRange(1, 2, 8)).bundle


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system (tmpfs), or None where the test may not mount one (see tests/places.py)."""
    from tests.places import mount_tmpfs, unmount

    mount = tmp_path / "small"
    mount.mkdir()
    if not mount_tmpfs(mount, size="1m"):
        yield None
        return
    try:
        yield mount
    finally:
        unmount(mount)
