import os

# Triton kernels run under the CPU interpreter in the test suite, also on GPU machines: the
# interpreter mode can only be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Engines decode eagerly here unless a test asks for compile="on": compiling takes seconds per
# engine (tests/infer/test_compiled_decode.py holds the compiled step to the eager one).
os.environ.setdefault("LEANMOE_COMPILE", "0")

import random

import numpy as np
import pytest
import torch

from leanmoe import ModelConfig
from tests.util import micro_config

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def micro_cfg() -> ModelConfig:
    return micro_config()
