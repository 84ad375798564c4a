"""Lines of DIA sources (`core.streaks`): trails and row artifacts are lines; random
fields and clumps of residuals are not."""

from __future__ import annotations

import numpy as np
import pytest

from core.streaks import on_lines


def _line(rng, n, start, step, scatter=0.2):
    t = np.arange(n) * step
    direction = np.array([np.cos(0.3), np.sin(0.3)])
    xy = np.asarray(start) + t[:, None] * direction
    across = np.array([-direction[1], direction[0]])
    xy += rng.normal(0, scatter, n)[:, None] * across
    return xy[:, 0], xy[:, 1]


@pytest.mark.parametrize("count", [1100, 3000])
def test_random_fields_as_dense_as_the_test_field_hold_no_line(count):
    """1100 per 4096^2: the dense test field's DIA sources."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x, y = rng.uniform(0, 4096, (2, count))
        assert not on_lines(x, y, 4.0).any()


def test_a_line_in_a_dense_field_is_found_whole_and_alone():
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 4096, (2, 1100))
    lx, ly = _line(rng, 9, (1000.0, 700.0), 35.0)  # steps under 40 FWHM, 0.2 px across
    found = on_lines(np.r_[x, lx], np.r_[y, ly], 4.0)
    assert found[-9:].all() and not found[:-9].any()


def test_short_or_broken_lines_are_not_lines():
    rng = np.random.default_rng(4)
    four = _line(rng, 4, (100.0, 100.0), 20.0)
    assert not on_lines(*four, 4.0).any()
    # steps of 200 px: more than 40 FWHM of 4 px
    sparse = _line(rng, 8, (100.0, 100.0), 200.0)
    assert not on_lines(*sparse, 4.0).any()
    # 4 px across: most beyond 0.15 FWHM
    wide = _line(rng, 8, (100.0, 100.0), 20.0, scatter=4.0)
    assert not on_lines(*wide, 4.0).any()


def test_a_clump_of_residuals_is_not_a_line():
    """Around a bright star the residuals clump; a few of them in a row by chance (or
    along a diffraction spike) among many are not a trail."""
    rng = np.random.default_rng(5)
    angle = rng.uniform(0, 2 * np.pi, 40)
    radius = rng.uniform(2, 20, 40)
    x, y = 500 + radius * np.cos(angle), 500 + radius * np.sin(angle)
    lx, ly = _line(rng, 6, (488.0, 496.0), 4.0, scatter=0.1)
    assert not on_lines(np.r_[x, lx], np.r_[y, ly], 2.0).any()


def test_a_row_of_close_sources_counts_every_one():
    """A bad row broken into sources 5 px apart (1.25 FWHM): clumps count once only
    within 1.5 FWHM of the last source counted, so twenty of them are a line."""
    rng = np.random.default_rng(6)
    x, y = rng.uniform(0, 4096, (2, 1100))
    lx, ly = 1000 + 5.0 * np.arange(20), 700 + rng.normal(0, 0.1, 20)
    found = on_lines(np.r_[x, lx], np.r_[y, ly], 4.0)
    assert found[-20:].all() and not found[:-20].any()


def test_a_failed_subtractions_crowd_is_not_searched():
    """20000 sources per 4096^2 (a failed subtraction; the search took 5-11 s there) are
    not searched: even a clear line among them is not flagged (`MAX_PAIRS`)."""
    rng = np.random.default_rng(7)
    x, y = rng.uniform(0, 4096, (2, 20000))
    lx, ly = 1000 + 35.0 * np.arange(20), 700 + rng.normal(0, 0.1, 20)
    assert not on_lines(np.r_[x, lx], np.r_[y, ly], 8.0).any()
    assert on_lines(np.r_[x[:1000], lx], np.r_[y[:1000], ly], 8.0)[-20:].all()
