"""Shared test settings."""

import torch

# Tiny test models run thousands of small ops; on a machine shared with other work a second thread makes
# each op wait for a busy core (a whole suite ran 15x slower with two threads than with one).
torch.set_num_threads(1)
