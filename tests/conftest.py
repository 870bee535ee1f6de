"""pytest fixtures; the model and adapter builders live in fixtures.py."""

import os

import pytest
import torch

# nothing may reach a hub from the tests: a Hub ID resolves from the Hugging Face cache only
# (lorakit.hf reads HF_HUB_OFFLINE at each call; tests that build a cache set HF_HOME themselves)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_thread():
    """One CPU thread: tiny models run fastest so, and CPU results are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok():
    """SmolLM2's real tokenizer (the embedded model's)."""
    from lorakit.hf import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The served tiny chat model of `fixtures.serve_env`, one server per test module."""
    from fixtures import serve_env

    env = serve_env(tmp_path_factory.mktemp("serve"))
    yield env
    env["server"].stop()
