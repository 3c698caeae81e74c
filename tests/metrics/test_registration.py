from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

from medmamba.engines.registration.register import voxels_to_displacement
from medmamba.io.geometry import Geometry
from medmamba.metrics.registration import deformation_metrics, jacobian_determinant, warped_label_metrics

SHAPE = (12, 10, 8)


def grid(shape=SHAPE):
    return np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))


def smooth_field(shape=SHAPE, amplitude=0.8, seed=0):
    """A smooth random displacement in voxels: a few low-frequency sinusoids per component."""
    rng = np.random.default_rng(seed)
    x = grid(shape)
    field = np.zeros((3, *shape))
    for a in range(3):
        for _ in range(3):
            k = rng.uniform(0.1, 0.4, 3)
            field[a] += amplitude / 3 * np.sin(np.tensordot(k, x, axes=1) + rng.uniform(0, 6))
    return field


def test_jacobian_of_an_affine_map_is_its_determinant_everywhere():
    A = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.3, 1.2]])
    ddf = np.einsum("ij,j...->i...", A - np.eye(3), grid())  # φ(x) = A x
    det = jacobian_determinant(ddf)
    np.testing.assert_allclose(det, np.linalg.det(A), rtol=1e-12)  # one-sided faces are exact for linear maps too
    m = deformation_metrics(ddf)
    assert m.folding_fraction == 0.0
    assert m.std_log_jacobian == pytest.approx(0.0, abs=1e-12)


def test_jacobian_matches_simpleitk_filter_in_physical_space():
    """MambaMorph's evaluation calls ITK's filter on the mm field; ours works on voxels: same determinant.

    ITK differentiates along the index axes without applying the direction cosines, so the two agree for axis-aligned
    grids (any spacing) only; ours does not depend on the direction at all (J_mm = R S J_vox S⁻¹ Rᵀ).
    """
    ddf = smooth_field()
    geometry = Geometry((1.5, 0.8, 2.5), (10.0, -4.0, 3.0), np.eye(3).ravel())  # anisotropic, axis-aligned
    mm = voxels_to_displacement(ddf.astype(np.float32), geometry).astype(np.float64)
    image = sitk.GetImageFromArray(mm.transpose(2, 1, 0, 3), isVector=True)
    geometry.apply_to_sitk(image)
    reference = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image)).transpose(2, 1, 0)
    ours = jacobian_determinant(ddf)
    inner = (slice(1, -1),) * 3  # ITK's faces use another boundary rule
    np.testing.assert_allclose(ours[inner], reference[inner], rtol=1e-4, atol=1e-5)


def test_folding_fraction_counts_the_voxels_where_the_map_folds():
    ddf = np.zeros((3, *SHAPE))
    ddf[0, 4:8] = -2.0 * grid()[0, 4:8]  # dφ0/dx0 = -1 inside the slab (central differences see its edges too)
    det = jacobian_determinant(ddf)
    m = deformation_metrics(ddf)
    assert m.folding_fraction == pytest.approx(np.mean(det <= 0))
    assert 4 / 12 <= m.folding_fraction <= 6 / 12
    assert m.jacobian_min < 0
    log_det = np.log(np.clip(det, 1e-9, 1e9))
    assert m.std_log_jacobian == pytest.approx(np.std(log_det))


def test_deformation_metrics_mask_and_displacement_length_in_mm():
    ddf = np.zeros((3, *SHAPE))
    ddf[1] = 2.0  # two voxels along axis 1
    m = deformation_metrics(ddf, spacing=(1.0, 1.5, 3.0))
    assert m.displacement_mean_mm == pytest.approx(3.0)
    mask = np.zeros(SHAPE, bool)
    mask[2:5] = True
    assert deformation_metrics(ddf, mask=mask).folding_fraction == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        deformation_metrics(ddf, mask=mask[:-1])


@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 6, 6, 6), (3, 1, 6, 6)], ids=["no-channel", "2-comp", "side-1"])
def test_jacobian_rejects_malformed_fields(shape):
    with pytest.raises(ValueError, match="displacement field"):
        jacobian_determinant(np.zeros(shape))


def test_warped_label_metrics_score_overlap_per_label():
    fixed = np.zeros((16, 16, 16), np.uint8)
    fixed[4:12, 4:12, 4:12] = 1
    fixed[6:10, 6:10, 6:10] = 2
    shifted = np.roll(fixed, 2, axis=0)
    same = warped_label_metrics(fixed, fixed, [1, 2], spacing=(1, 1, 1))
    assert same[1]["dice"] == pytest.approx(1.0)
    assert same[2]["hd95"] == pytest.approx(0.0)
    moved = warped_label_metrics(fixed, shifted, [1, 2], spacing=(2, 1, 1))
    assert moved[2]["dice"] == pytest.approx(2 * 2 * 16 / (2 * 64))  # two of four slabs overlap
    assert moved[2]["hd95"] == pytest.approx(4.0)  # 2 voxels × 2 mm
