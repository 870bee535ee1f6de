"""pytest fixtures; the model and adapter builders live in fixtures.py."""

import pytest
import torch


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
