"""What a run prints: anomret's own progress and results, without the libraries' hints and deprecations.

Each known line is filtered where it is emitted (its logger, or a warning matched by message *and*
module), never by silencing every warning: an unexpected warning still shows. ``verbose=true`` (or ``-v``
on the command line) leaves everything in place and turns anomret's debug logging on.
"""

from __future__ import annotations

import logging
import os
import warnings

# Lightning's rank-zero lines that carry no information about this run (advertising, the absence of
# accelerators nobody asked for). Matched at the start of the message.
_LIGHTNING_NOISE = (
    "💡 Tip:",
    "GPU available: False",
    "TPU available:",
    "HPU available:",
    "You are using a CUDA device",  # the TF32 hint: anomret sets the matmul precision itself (trainer.matmul_precision)
)
# (message regex, module regex) of third-party warnings that a user cannot act on.
_WARNINGS = (
    # lightning's own use of a torch API it has not caught up with yet
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\."),
    # frozen encoders stay in eval mode during the fit pass on purpose
    (r"Found \d+ module\(s\) in eval mode", r"lightning\."),
    # the memory pass feeds a bank builder and returns nothing on purpose
    (r"predict returned None", r"lightning\."),
    # test metrics are gathered and computed once for all processes: no reduction to ask for
    (r"It is recommended to use `self\.log\('test/", r"lightning\."),
    # W&B rejects the anonymous argument Lightning's WandbLogger still passes
    (r".*anonymous setting has no effect", r"wandb\."),
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_NOISE)


class _DropOpenClipInfo(logging.Filter):
    """open_clip logs how it parses a tokenizer name on the root logger, at INFO, on every build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


_FILTER = _DropNoise()
_OPEN_CLIP_FILTER = _DropOpenClipInfo()


def configure_output(verbose: bool = False) -> None:
    """Route Lightning's log lines through the run's own logging once, and drop the known noise."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        library = logging.getLogger(name)
        # Lightning adds its own stderr handler when it is imported before logging is set up, which
        # prints every line a second time beside the run's log.
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler:
                library.removeHandler(handler)
        library.propagate = True
    if verbose:
        logging.getLogger("anomret").setLevel(logging.DEBUG)
        return
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    root = logging.getLogger()
    if _OPEN_CLIP_FILTER not in root.filters:
        root.addFilter(_OPEN_CLIP_FILTER)
    for message, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
