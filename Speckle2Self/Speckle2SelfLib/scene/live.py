"""Live despeckling of a volume node (e.g. ``Image_Reference`` of OpenIGTLinkIF), the latest frame winning.

The input is snapshot on the main thread, despeckled in the worker thread of a
:class:`~Speckle2SelfLib.engine.latest_frame.StreamDespeckler` and the newest result written into an output
volume node, again on the main thread: the module's "Live" check box calls
:meth:`~LiveVolumeDespeckler.capture` and :meth:`~LiveVolumeDespeckler.apply` from a QTimer.
MRML is never touched off the main thread; no Qt here.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..engine.latest_frame import DRAIN_SECONDS, StreamDespeckler, StreamStats
from ..fileio.imageio import luminance_like
from ..vtkimage import image_from_array
from .despeckle import output_name
from .nodes import add_node, copy_display, volume_to_array, write_voxels


class LiveVolumeDespeckler:
    """Despeckle a live volume node into an output volume node, the latest frame winning.

    Call :meth:`capture` (snapshot the input, on the main thread) when the input changed, and
    :meth:`apply` (write the newest result, on the main thread) regularly, e.g. both from one
    QTimer; :meth:`update` does both. With ``threaded`` the despeckling runs in a worker thread,
    otherwise inside :meth:`capture`. RGB input is despeckled on its luminance (grey output).
    The output node (``output_node``, or one made on the first :meth:`apply` and named
    "<input> despeckled") gets the voxels, the IJK-to-RAS matrix of the captured frame and the
    input's parent transform; its display settings are copied once.
    """

    def __init__(self, despeckler, input_node, output_node=None, *, threaded: bool = True,
                 name: Optional[str] = None):
        import slicer

        if input_node is None or not isinstance(input_node, slicer.vtkMRMLVolumeNode) or \
                isinstance(input_node, slicer.vtkMRMLLabelMapVolumeNode):
            raise ValueError("live despeckling needs a grey or RGB volume node as input")
        if output_node is not None and output_node is input_node:
            raise ValueError("the output volume must not be the input volume")
        if output_node is not None and output_node.IsA("vtkMRMLVectorVolumeNode"):
            raise ValueError(f"'{output_node.GetName()}' is an RGB volume; live output is grey: choose "
                             "another output volume or none (one is created)")
        self.input_node = input_node
        self.output_node = output_node
        self.name = name
        self.threaded = threaded
        self.stream = StreamDespeckler(despeckler, max_streams=1)
        self._last_key = None
        self._applied = 0
        self.updates = 0
        if threaded:
            self.stream.start(warm=True)

    def capture(self) -> bool:
        """Snapshot the input's voxels and geometry if they changed since the last capture and
        hand them to the despeckler. False when there was nothing new (or no image yet)."""
        node = self.input_node
        image = node.GetImageData() if node is not None else None
        if image is None or image.GetNumberOfPoints() == 0 or image.GetPointData().GetScalars() is None:
            return False
        matrix = _ijk_to_ras(node)
        key = (image.GetMTime(), matrix.tobytes())
        if key == self._last_key:
            return False
        voxels = volume_to_array(node)
        if voxels.ndim == 4:
            voxels = luminance_like(voxels)
        self._last_key = key
        self.stream.submit(voxels, meta=matrix)
        if not self.threaded:
            self.stream.process_pending()
        return True

    def apply(self) -> bool:
        """Write the newest despeckled frame into the output node; False when there is none new.
        Raises the despeckler's error when the newest frame failed."""
        error = self.stream.last_error
        if error is not None:
            self.stream.last_error = None
            raise error
        result = self.stream.latest()
        if result is None or result.index <= self._applied:
            return False
        self._write(result.output, result.meta)
        self._applied = result.index
        self.updates += 1
        return True

    def update(self) -> bool:
        """:meth:`capture` then :meth:`apply` (one timer tick)."""
        self.capture()
        return self.apply()

    def stop(self, timeout: float = DRAIN_SECONDS) -> None:
        self.stream.stop(timeout)

    @property
    def stats(self) -> StreamStats:
        return self.stream.stats

    def _write(self, voxels: np.ndarray, matrix: np.ndarray) -> None:
        import vtk

        node = self.output_node
        if node is not None and node.GetScene() is None and self.input_node.GetScene() is not None:
            node = None              # the output was deleted from the scene: make a new one
        image = node.GetImageData() if node is not None else None
        if image is not None:        # in place when it fits: no new image data, views keep their settings
            image_from_array(voxels, image)
        else:
            if node is None:
                node = add_node(self.input_node.GetScene(), "vtkMRMLScalarVolumeNode",
                                self.name or output_name(self.input_node))
            write_voxels(node, voxels)
            copy_display(self.input_node, node)
            self.output_node = node
        vtk_matrix = vtk.vtkMatrix4x4()
        for row in range(4):
            for col in range(4):
                vtk_matrix.SetElement(row, col, float(matrix[row, col]))
        node.SetIJKToRASMatrix(vtk_matrix)
        parent = self.input_node.GetTransformNodeID()
        if node.GetScene() is not None and node.GetTransformNodeID() != parent:
            node.SetAndObserveTransformNodeID(parent)


def _ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
