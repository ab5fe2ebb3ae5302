"""Running a command under torchrun: each rank samples its share of the batches, rank 0 reports."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def launched(args: argparse.Namespace) -> Iterator[torch.device]:
    """Join torchrun's process group when launched by it (lazymar.distributed) and set ``args.device`` to this
    rank's device (``cuda`` -> ``cuda:LOCAL_RANK``)."""
    from .. import distributed
    with distributed.launched(args.device) as device:
        args.device = device
        yield device
