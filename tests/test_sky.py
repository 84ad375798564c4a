"""WCSs in frames other than ICRS (galactic, FK4) and with latitude first: ra/dec are
ICRS wherever they come out or go in, and two WCSs in different frames register."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from astropy.wcs.utils import fit_wcs_from_points

from core.forced import forced_photometry, sky_positions
from core.simulate import preset, simulate_pair
from core.sky import pixel_to_pixel, pixel_to_radec, radec_to_pixel
from core.subtract import run_subtraction


def _icrs_wcs(n: int = 512) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [n / 2 + 0.5, n / 2 + 0.5]
    scale = 0.2 / 3600
    wcs.wcs.cd = [
        [-scale * np.cos(0.3), scale * np.sin(0.3)],
        [scale * np.sin(0.3), scale * np.cos(0.3)],
    ]
    return wcs


def _rewritten(wcs: WCS, frame: str, shape=(512, 512)) -> WCS:
    """The same pixels' sky as a TAN WCS written in ``frame``."""
    yy, xx = np.mgrid[0 : shape[0] : 32, 0 : shape[1] : 32].astype(float)
    sky = wcs.pixel_to_world(xx.ravel(), yy.ravel()).transform_to(frame)
    return fit_wcs_from_points((xx.ravel(), yy.ravel()), sky, projection="TAN")


def _latitude_first(wcs: WCS) -> WCS:
    """The same WCS with its axes swapped in the header (CTYPE1 = DEC--TAN) and the pixel
    axes kept: world values come out as (dec, ra)."""
    swapped = WCS(naxis=2)
    swapped.wcs.ctype = [wcs.wcs.ctype[1], wcs.wcs.ctype[0]]
    swapped.wcs.crval = [wcs.wcs.crval[1], wcs.wcs.crval[0]]
    swapped.wcs.crpix = wcs.wcs.crpix
    swapped.wcs.cd = wcs.wcs.cd[::-1]
    return swapped


@pytest.mark.parametrize("kind", ["galactic", "fk4", "latitude first"])
def test_ra_dec_are_icrs_whatever_frame_and_axis_order_the_wcs_is_written_in(kind):
    icrs = _icrs_wcs()
    other = _latitude_first(icrs) if kind == "latitude first" else _rewritten(icrs, kind)
    x, y = np.array([0.0, 100.3, 255.5, 511.0]), np.array([0.0, 400.7, 255.5, 3.0])
    ra, dec = pixel_to_radec(icrs, x, y)
    ra2, dec2 = pixel_to_radec(other, x, y)
    separation = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(ra2, dec2, unit="deg"))
    assert separation.arcsec.max() < 1e-3  # 0.005 px; galactic (l, b) differed by 88 deg
    px, py = radec_to_pixel(other, ra, dec)
    np.testing.assert_allclose(px, x, atol=1e-3)
    np.testing.assert_allclose(py, y, atol=1e-3)
    u, v = pixel_to_pixel(icrs, other, x, y)
    np.testing.assert_allclose(u, x, atol=1e-3)
    np.testing.assert_allclose(v, y, atol=1e-3)


def test_a_galactic_template_beside_an_icrs_science_registers_and_catalogs_are_icrs():
    """A review's pair: the template's WCS written in galactic coordinates was refused as
    misregistered ("no transform matches enough stars"); with both galactic, the DIA
    catalog's ra/dec were (l, b) and forced photometry at the true ra/dec measured at
    x = 9.6e6."""
    pair = simulate_pair(preset("sharper_template", size=512, seed=21))
    science, template = pair.science, pair.template
    assert science.wcs is not None and template.wcs is not None
    galactic_template = replace(template, wcs=_rewritten(template.wcs, "galactic", template.shape))
    reference = run_subtraction(science, template)
    mixed = run_subtraction(science, galactic_template)
    registered = mixed.metrics["registration"]
    assert registered["wcs_max_displacement_px"] < 0.01, registered
    np.testing.assert_allclose(
        mixed.output.image, reference.output.image, atol=1e-3 * np.std(reference.output.image)
    )

    galactic_science = replace(science, wcs=_rewritten(science.wcs, "galactic", science.shape))
    both = run_subtraction(galactic_science, galactic_template).dia_sources
    assert len(both) == len(reference.dia_sources) > 0
    np.testing.assert_allclose(both["ra"], reference.dia_sources["ra"], atol=1e-7)
    np.testing.assert_allclose(both["dec"], reference.dia_sources["dec"], atol=1e-7)
    ra, dec = sky_positions(galactic_science, np.asarray(both["x"]), np.asarray(both["y"]))
    np.testing.assert_allclose(ra, both["ra"], atol=1e-9)
    forced = forced_photometry(
        replace(reference.output, wcs=galactic_science.wcs), ra=np.asarray(ra), dec=np.asarray(dec)
    )
    np.testing.assert_allclose(forced["x"], both["x"], atol=1e-3)
    np.testing.assert_allclose(forced["y"], both["y"], atol=1e-3)
