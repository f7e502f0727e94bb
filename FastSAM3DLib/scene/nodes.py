"""MRML nodes as library inputs: matrices, parent transforms, scalar volumes (no Qt, no threads)."""
from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from ..errors import FastSAM3DError, InputImageError
from ..geometry import Volume


def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """The 4x4 float64 array of a VTK matrix."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A new VTK matrix holding the 4x4 ``array``."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from ``node``'s own coordinates to world RAS (its parent transforms, hardened).

    Raises :class:`FastSAM3DError` telling the user to harden the transform when it is not linear.
    """
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise FastSAM3DError(
            f"'{node.GetName()}' is moved by the non-linear transform '{transform_node.GetName()}'. FastSAM3D "
            "works on a linear geometry: harden the transform on it (Data module: right-click the node > "
            "'Harden transform') or remove the transform, then try again."
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return array_from_vtk_matrix(matrix)


def volume_from_node(volume_node, copy: bool = True) -> Volume:
    """The scalar volume node as a :class:`Volume`: (K, J, I) voxel array and IJK->world-RAS matrix.

    Linear parent transforms are folded into ``ijk_to_ras``; a non-linear one raises :class:`FastSAM3DError`.
    ``copy=True`` (default) copies the voxels so that a worker thread never reads VTK memory the scene may
    change; ``copy=False`` returns a view (as ``slicer.util.arrayFromVolume`` does).
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if volume_node is None else volume_node.GetClassName()
        raise InputImageError(f"Select a scalar volume as source volume (got {kind}).")
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None or image.GetNumberOfPoints() == 0:
        raise InputImageError(f"Volume '{volume_node.GetName()}' has no voxels. Load the image data again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputImageError(
            f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel "
            "(colour or vector data). Convert it to a scalar volume first (module 'Vector to Scalar Volume')."
        )
    array = numpy_support.vtk_to_numpy(scalars).reshape(image.GetDimensions()[::-1])
    return Volume(np.array(array, copy=True) if copy else array, volume_from_node_matrix(volume_node))


def volume_from_node_matrix(volume_node) -> np.ndarray:
    """IJK -> world RAS matrix of a volume node (parent transforms hardened; non-linear refused)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return node_to_world(volume_node) @ array_from_vtk_matrix(ijk_to_ras)


def nodes_by_class(scene, class_name):
    """The scene's nodes of the MRML class ``class_name`` (subclasses included), as a list."""
    collection = scene.GetNodesByClass(class_name)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    collection.UnRegister(None)  # the caller owns the collection (vtkMRMLScene.h), as slicer.util releases it
    return nodes
