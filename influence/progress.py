"""Progress bars in the older suite's style, on stderr (tqdm's default)."""

from __future__ import annotations


from tqdm import tqdm

ESTIMATE_FORMAT = "{desc} | {estimate} est. | {percentage:3.0f}% |{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class EstimateBar(tqdm):
    """A bar that also shows the estimated total time of the loop:

    ``IHVP calculation | 07:57 est. | 100% |▮▮▮| 20/20 [07:57<00:00, 23.85s/it]``
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("bar_format", ESTIMATE_FORMAT)
        kwargs.setdefault("ascii", " ▮")
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self):
        values = super().format_dict
        done, total, elapsed = values["n"], values["total"], values["elapsed"]
        if done and total:
            values["estimate"] = self.format_interval(elapsed * total / done)
        else:
            values["estimate"] = "--:--"
        return values


def progress_bar(**kwargs) -> tqdm:
    """A plain bar (``Parse train``, ``Batch influences``) with the suite's look."""
    kwargs.setdefault("ascii", " ▮")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
