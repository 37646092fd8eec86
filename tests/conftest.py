"""Fixtures every server test module shares: the tiny model and a llama-server on it with the
harness's defaults, one of each per module (a module that needs another defines its own)."""
import pytest

import server_harness as harness


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return harness.make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def server(model_path):
    srv = harness.ServerProcess(model_path)
    yield srv
    srv.stop()
