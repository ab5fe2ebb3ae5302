"""The range of a random seed, one limit for the command line and for schedule files."""
from __future__ import annotations

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes [-2**63, 2**64); seeds + batch offsets stay well inside
