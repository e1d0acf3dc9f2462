import pytest

from crnet.data import synthetic


@pytest.fixture(scope="session")
def bench_root(tmp_path_factory):
    """A small built-in benchmark (every class in both splits), shared by the tests that train or evaluate."""
    return synthetic.generate(
        tmp_path_factory.mktemp("bench"), seed=0, train_per_class=4, val_per_class=3, image_size=48
    )
