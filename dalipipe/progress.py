"""Progress bars: one rule for when dalipipe's tqdm bars are hidden."""

from __future__ import annotations


def quiet_unless(show: bool) -> dict:
    """tqdm's keyword arguments for a bar shown only when `show`. Where shown, `disable` is left out rather
    than passed as False: an explicit argument overrides tqdm's environment defaults, so TQDM_DISABLE=1
    (a batch job's log, a check that collects output) would no longer silence the bar."""
    return {} if show else {"disable": True}
