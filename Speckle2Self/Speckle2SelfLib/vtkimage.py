"""numpy <-> vtkImageData: the one conversion that the segmentation filters and the MRML adapters share.

Arrays are in VTK's memory order, (K, J, I) = (slices, rows, columns), with an optional last
axis of components (RGB). Images carry unit spacing and zero origin: a volume node's
IJK-to-RAS matrix places them. ``vtk`` is imported lazily (the command line runs without it).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def image_from_array(array: np.ndarray, image=None):
    """(K, J, I) or (K, J, I, C) voxels -> vtkImageData holding a copy of them.

    ``image``: the vtkImageData (or subclass, e.g. ``slicer.vtkOrientedImageData``) to fill;
    a new ``vtk.vtkImageData`` when None. An ``image`` that already has this size, number of
    components and voxel type is overwritten in place (no new scalar array: a live view keeps
    showing the same image data object).
    """
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected (K, J, I) or (K, J, I, C) voxels, got shape {array.shape}")
    k, j, i = array.shape[:3]
    components = array.shape[3] if array.ndim == 4 else 1
    image = vtk.vtkImageData() if image is None else image
    scalars = image.GetPointData().GetScalars()
    if (scalars is not None and image.GetDimensions() == (i, j, k) and scalars.GetNumberOfComponents() == components
            and scalars.GetDataType() == numpy_support.get_vtk_array_type(array.dtype)):
        numpy_support.vtk_to_numpy(scalars).reshape(array.shape)[...] = array
        scalars.Modified()
        image.Modified()
        return image
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(array.reshape(-1, components), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def array_from_image(image) -> Optional[np.ndarray]:
    """vtkImageData -> (K, J, I, C) copy of its voxels; None when it holds no scalars."""
    from vtk.util import numpy_support

    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return None
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i, scalars.GetNumberOfComponents()).copy()
