"""The Speckle2Self module's Qt side: one file per panel of the module's .ui, over the Lib's logic.

* :mod:`.despeckle` -- Apply (Cancel while it runs), model choice and the despeckling options;
* :mod:`.live` -- the Live check box: despeckle every new frame of the input;
* :mod:`.lumen` -- Segment lumen (Cancel while it runs), its table and chart;
* :mod:`.adapt` -- Adapt model: fine-tuning in the background, progress, loss plot, preview;
* :mod:`.models` -- the Model list shared by the panels (bundled, user models, model files);
* :mod:`.jobpoller` -- the one QTimer poller over the job protocol (``poll()``, ``cancel()``);
* :mod:`.installer` -- offering to install PyTorch on first use;
* :mod:`.selftest` -- the module's self-test (Slicer's "Reload and Test", CTest).

The panels hold no logic of their own: they read the parameter node, call
:class:`Speckle2SelfLib.scene.logic.Speckle2SelfLogic` and show what it returns.
"""
