"""The errors a user can cause. Every one of them derives from :class:`CascadeError`.

The command line catches ``CascadeError`` and prints its message as one paragraph (exit status 1);
anything else that escapes is a bug and shows its traceback. Messages are sentences that name the
file or value, what is wrong with it and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class CascadeError(Exception):
    """A user's mistake or an unusable input; the message says what and how to fix it."""


class UsageError(CascadeError, ValueError):
    """A value given by the user (an argument, an option, a config entry) is invalid.

    Also a ``ValueError``, so Python callers that catch that keep working."""


class MissingInputError(CascadeError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what the command needs)."""


class WeightsError(CascadeError):
    """A checkpoint cannot be found, read or matched to its model; the message says how to fix it."""


class NonFiniteError(CascadeError, RuntimeError):
    """A model produced NaN or inf; nothing is written."""


def check_finite(t: "torch.Tensor", what: str) -> "torch.Tensor":
    """Return ``t``, or raise :class:`NonFiniteError` naming ``what`` when it holds NaN or inf."""
    import torch

    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NonFiniteError(f"{what} produced {bad} NaN/inf values (of {t.numel()}); nothing was written. With "
                             "fp16 weights this is an overflow — use bf16 or fp32.")
    return t
