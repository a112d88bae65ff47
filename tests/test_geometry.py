"""Euler angles against RELION's formula; symmetry groups; random rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from subtomo.errors import SubtomoError
from subtomo.geometry.euler import angular_distance_deg, euler_to_matrix, euler_to_matrix_torch, matrix_to_euler, random_rotations
from subtomo.geometry.symmetry import symmetry_matrices


def relion_euler_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix typed from its definition, element by element."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


def test_matrix_equals_relion_formula_and_product_form():
    rng = np.random.default_rng(3)
    for rot, tilt, psi in rng.uniform([-180, 0, -180], [180, 180, 180], size=(200, 3)):
        a = euler_to_matrix(rot, tilt, psi)
        assert np.allclose(a, relion_euler_matrix(rot, tilt, psi), atol=1e-12)
        rz = lambda t: np.array([[np.cos(t), np.sin(t), 0], [-np.sin(t), np.cos(t), 0], [0, 0, 1]])
        ry = lambda t: np.array([[np.cos(t), 0, -np.sin(t)], [0, 1, 0], [np.sin(t), 0, np.cos(t)]])
        assert np.allclose(a, rz(np.deg2rad(psi)) @ ry(np.deg2rad(tilt)) @ rz(np.deg2rad(rot)), atol=1e-12)


def test_scipy_zyz_is_the_transpose():
    ang = np.random.default_rng(4).uniform(-180, 180, size=(100, 3))
    a = euler_to_matrix(*ang.T)
    r = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix()
    assert np.allclose(np.swapaxes(a, -1, -2), r, atol=1e-12)


def test_inverse_round_trip_and_ranges():
    ang = np.random.default_rng(5).uniform([-180, 0, -180], [180, 180, 180], size=(500, 3))
    back = matrix_to_euler(euler_to_matrix(*ang.T))
    assert np.allclose(euler_to_matrix(*back.T), euler_to_matrix(*ang.T), atol=1e-10)
    assert (back[:, 1] >= 0).all() and (back[:, 1] <= 180).all()


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_inverse_at_gimbal_lock(tilt):
    a = euler_to_matrix(25.0, tilt, 40.0)
    rot, t, psi = matrix_to_euler(a)
    assert rot == 0.0 and t == pytest.approx(tilt)
    assert np.allclose(euler_to_matrix(rot, t, psi), a, atol=1e-12)


def test_torch_matches_numpy(device):
    ang = np.random.default_rng(6).uniform(-180, 180, size=(50, 3))
    got = euler_to_matrix_torch(torch.tensor(ang, device=device))
    assert got.device.type == device.type
    assert torch.allclose(got.cpu(), torch.tensor(euler_to_matrix(*ang.T)), atol=1e-12)


def test_projection_direction_is_third_row():
    a = euler_to_matrix(30.0, 50.0, 70.0)
    expected = [np.sin(np.deg2rad(50)) * np.cos(np.deg2rad(30)), np.sin(np.deg2rad(50)) * np.sin(np.deg2rad(30)),
                np.cos(np.deg2rad(50))]
    assert np.allclose(a.T @ [0, 0, 1], expected)


@pytest.mark.parametrize("name,order", [("C1", 1), ("C4", 4), ("C7", 7), ("D2", 4), ("D7", 14), ("T", 12),
                                        ("O", 24), ("I", 60)])
def test_symmetry_group_order_closure_and_orthogonality(name, order):
    g = symmetry_matrices(name)
    assert len(g) == order
    assert np.allclose(g[0], np.eye(3))
    for m in g:
        assert np.allclose(m @ m.T, np.eye(3), atol=1e-6) and np.linalg.det(m) == pytest.approx(1.0, abs=1e-6)
    prods = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    for p in prods:
        assert np.abs(g - p).reshape(order, -1).max(axis=1).min() < 1e-5, "group not closed"


def test_symmetry_axes_follow_relion():
    c7 = symmetry_matrices("C7")
    assert np.allclose(c7[:, 2, 2], 1.0)  # all about z
    d7 = symmetry_matrices("D7")
    flips = d7[np.isclose(d7[:, 2, 2], -1.0)]
    assert any(np.allclose(m @ [1, 0, 0], [1, 0, 0]) for m in flips)  # a 2-fold about x
    o = symmetry_matrices("O")
    angles = np.rad2deg(np.arccos(np.clip((np.trace(o, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    fourfold_z = [m for m, ang in zip(o, angles) if np.isclose(ang, 90) and np.allclose(m @ [0, 0, 1], [0, 0, 1])]
    assert len(fourfold_z) == 2
    i = symmetry_matrices("I")
    assert any(np.isclose(np.trace(m), -1) and np.allclose(m @ [0, 0, 1], [0, 0, 1]) for m in i)  # 2-fold on z


def test_unknown_symmetry_is_a_clear_error():
    with pytest.raises(SubtomoError, match="Use C<n>, D<n>, T, O or I"):
        symmetry_matrices("X3")


def test_random_rotations_are_uniform():
    r = random_rotations(20000, np.random.default_rng(0))
    assert np.allclose(np.einsum("nij,nkj->nik", r, r), np.eye(3), atol=1e-10)
    # z-axis images are uniform on the sphere: mean ~ 0, <z^2> = 1/3
    z = r[:, :, 2]
    assert np.abs(z.mean(0)).max() < 0.02
    assert (z[:, 2] ** 2).mean() == pytest.approx(1 / 3, abs=0.01)
    assert angular_distance_deg(r[:1], r[:1])[0] == pytest.approx(0.0, abs=1e-5)


def test_tilt_projection_geometry_and_beam_direction():
    from subtomo.geometry.tilt import beam_direction, project_to_tilt, specimen_coordinates_A

    r = specimen_coordinates_A([[60, 40, 30]], (100, 80, 40), 2.0)
    assert np.allclose(r, [[20.0, 0.0, 20.0]])
    x_img, y_img, h = project_to_tilt(r, [0.0, 90.0, 30.0])
    assert np.allclose(x_img[0], [20.0, 20.0, 20 * np.cos(np.pi / 6) + 20 * 0.5])
    assert np.allclose(h[0], [20.0, -20.0, -20 * 0.5 + 20 * np.cos(np.pi / 6)])
    n = beam_direction([30.0])[0]
    # the beam direction is orthogonal to the image x axis and h is the projection of r on it
    assert np.isclose(n @ [np.cos(np.pi / 6), 0, np.sin(np.pi / 6)], 0.0)
    assert np.isclose(r[0] @ n, h[0, 2])
