"""The Slicer side without Qt: MRML volume, sequence, segmentation and table nodes (slicer-core).

* :mod:`.logic` -- :class:`~.logic.Speckle2SelfLogic`, the module's logic (despeckle, segment,
  models, adaptation) and the console call :func:`~.logic.despeckle_node`;
* :mod:`.despeckle` -- despeckling volume and sequence nodes, and its background job;
* :mod:`.lumen` -- seed point -> lumen segmentation node, measurement table and diameter plot,
  and its background job;
* :mod:`.live` -- live despeckling of a volume node that a stream keeps updating;
* :mod:`.adapt` -- reading nodes for adapting a model to them, and the console's ``adapt``;
* :mod:`.jobs` -- the background-job pattern (worker thread without MRML, results stored on the main thread);
* :mod:`.nodes` -- shared MRML helpers: node names, sequence browsers, reading and writing voxels.

Never imports Qt, ctk or ``slicer.app`` (Testing/test_extension_static.py checks it): it runs headless.
"""
