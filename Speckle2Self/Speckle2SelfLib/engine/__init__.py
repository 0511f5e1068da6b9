"""The despeckling engine: the network, its self-supervised training and running it (numpy in, numpy out).

* :mod:`.network` -- multi-encoder / shared-decoder network; :mod:`.perturbation` -- multi-scale
  views; :mod:`.losses` -- the self-supervised loss; :mod:`.training` -- training and checkpoints;
* :mod:`.models` -- TorchScript model files with their metadata, the bundled models;
  :mod:`.user_models` -- the user models folder of "Adapt model";
* :mod:`.inference` -- :class:`~.inference.Despeckler`: batched, progress, cancel;
  :mod:`.tiling` -- bounded-memory inference of large frames; :mod:`.backends` -- OpenVINO /
  ONNX Runtime / bf16 CPU paths; :mod:`.grain` -- the working scale that matches a model's speckle grain;
  :mod:`.latest_frame` -- live despeckling, the latest frame of each stream winning (no networking);
* :mod:`.resources` -- memory estimates before training; :mod:`.adapt` -- fine-tuning on a scene's images.

torch is imported lazily wherever a module can load without it (the Slicer module does).
"""
