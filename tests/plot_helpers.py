"""Helpers of the plot tests: a Figure/axes pair made without pyplot, and an autouse fixture that fails a test which
changes matplotlib's global state. Import both into a test module: `from plot_helpers import new_ax,
no_global_matplotlib_state`."""
import sys

import matplotlib
import pytest
from matplotlib.figure import Figure


@pytest.fixture(autouse=True)
def no_global_matplotlib_state():
    """No test may change rcParams or open pyplot figures."""
    before = dict(matplotlib.rcParams)
    plt = sys.modules.get("matplotlib.pyplot")
    n_open = len(plt.get_fignums()) if plt else 0
    yield
    assert dict(matplotlib.rcParams) == before
    plt = sys.modules.get("matplotlib.pyplot")
    assert (len(plt.get_fignums()) if plt else 0) == n_open


def new_ax():
    """(fig, ax): a Figure outside pyplot with one subplot."""
    fig = Figure()
    return fig, fig.add_subplot()
