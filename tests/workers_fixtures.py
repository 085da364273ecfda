"""Fixtures the workers' test modules share (each names this module in `pytest_plugins`):
one tiny model and its greedy reference.

torch is imported inside the fixtures, so the modules that do not use them (the operator's,
the planner's) still run where only the operator's packages are installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kleave.workers.model import MoEDecoder


@pytest.fixture(scope="module")
def model() -> MoEDecoder:
    """The `tiny` preset's weights from seed 0, as every worker test builds them."""
    from kleave.workers.config import MODEL_PRESETS
    from kleave.workers.model import MoEDecoder

    return MoEDecoder(MODEL_PRESETS["tiny"], seed=0)


@pytest.fixture(scope="module")
def reference(model: MoEDecoder) -> list[list[int]]:
    """generate_greedy of every serving-test prompt, 24 tokens, EOS not stopping."""
    from kleave.workers.model import generate_greedy
    from test_workers_serve import PROMPTS

    return [generate_greedy(model, prompt, 24) for prompt in PROMPTS]
