"""The logical mesh: sizes, -1 filling and the device-count check."""

from __future__ import annotations

import pytest

from torchprime.errors import ConfigError
from torchprime.mesh import MeshAxesConfig, resolve_mesh


def test_mesh_shape_multiplies_ici_and_dcn():
    mesh = resolve_mesh(MeshAxesConfig(fsdp=4, tensor=2), MeshAxesConfig(data=2), 16)
    assert mesh.shape == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 2, "context": 1}
    assert mesh.num_devices == 16 and mesh.num_slices == 2
    assert mesh.size(("data", "fsdp")) == 8 and mesh.size(None) == 1
    assert mesh.describe() == "data=2 x fsdp=4 x tensor=2 (2 slices)"


def test_minus_one_takes_the_devices_left():
    mesh = resolve_mesh(MeshAxesConfig(fsdp=-1, tensor=2), MeshAxesConfig(), 8)
    assert mesh.shape["fsdp"] == 4


def test_product_must_equal_the_device_count():
    with pytest.raises(ConfigError, match=r"ici_mesh \{fsdp: 8\} .* = 8 devices, but there are 4"):
        resolve_mesh(MeshAxesConfig(fsdp=8), MeshAxesConfig(), 4)


def test_minus_one_that_cannot_fill_names_the_axis():
    with pytest.raises(ConfigError, match=r"ici_mesh.fsdp=-1 cannot fill 6 devices"):
        resolve_mesh(MeshAxesConfig(fsdp=-1, tensor=4), MeshAxesConfig(), 6)


def test_bad_sizes_name_the_key():
    with pytest.raises(ConfigError, match=r"ici_mesh.tensor=0"):
        resolve_mesh(MeshAxesConfig(tensor=0), MeshAxesConfig(), 1)
    with pytest.raises(ConfigError, match=r"dcn_mesh.data=-1"):
        resolve_mesh(MeshAxesConfig(), MeshAxesConfig(data=-1), 1)
    with pytest.raises(ConfigError, match=r"only one axis may be -1"):
        resolve_mesh(MeshAxesConfig(fsdp=-1, tensor=-1), MeshAxesConfig(), 4)


def test_without_a_device_count_the_mesh_is_only_described():
    mesh = resolve_mesh(MeshAxesConfig(fsdp=256), MeshAxesConfig(), None)
    assert mesh.num_devices == 256


def test_fold_mesh_keeps_every_axis_and_fits():
    from torchprime.mesh import Mesh, fold_mesh

    def mesh(**axes):
        return resolve_mesh(MeshAxesConfig(**axes), MeshAxesConfig(), None)

    assert fold_mesh(mesh(fsdp=256), 64).shape["fsdp"] == 64
    folded = fold_mesh(mesh(fsdp=64, tensor=4), 64)
    assert (folded.shape["fsdp"], folded.shape["tensor"], folded.num_devices) == (16, 4, 64)
    folded = fold_mesh(mesh(fsdp=16, tensor=4), 8)
    assert (folded.shape["fsdp"], folded.shape["tensor"]) == (2, 4)  # ties: fsdp shrinks first
    assert fold_mesh(mesh(fsdp=4), 64) == mesh(fsdp=4)  # small meshes run as they are
    slices = Mesh((1, 32, 1, 1, 1), (2, 1, 1, 1, 1))  # 2 slices of fsdp=32, data across slices
    folded = fold_mesh(slices, 8)
    assert folded.num_slices == 1 and folded.shape["data"] == 2 and folded.shape["fsdp"] == 4
    assert fold_mesh(mesh(fsdp=3, tensor=3), 4).num_devices == 3  # odd sizes: nearest fit


def test_processes_fill_the_mesh_row_major_with_slices_outermost():
    from torchprime.mesh import coordinates, data_parallel_index, device_grid

    mesh = resolve_mesh(MeshAxesConfig(fsdp=2, tensor=2), MeshAxesConfig(), None)
    assert device_grid(mesh) == [0, 1, 2, 3]
    assert coordinates(mesh, 1) == {"data": 0, "fsdp": 0, "expert": 0, "tensor": 1, "context": 0}
    assert [data_parallel_index(mesh, r) for r in range(4)] == [0, 0, 1, 1]
    # Two slices of fsdp=2: slice 1 holds fsdp 2 and 3 of the combined axis.
    hybrid = resolve_mesh(MeshAxesConfig(fsdp=2), MeshAxesConfig(fsdp=2), None)
    assert [coordinates(hybrid, r)["fsdp"] for r in range(4)] == [0, 1, 2, 3]
