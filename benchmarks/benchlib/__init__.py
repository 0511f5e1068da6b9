"""Code that only the benchmarks (and their tests) use, kept out of the installed Speckle2SelfLib.

* :mod:`.carotid_data` -- the carotid data set (../shared) and its subject split;
* :mod:`.baselines` -- classical despeckling filters (median, Lee, Frost, SRAD, NLM, BM3D, OBNLM);
* :mod:`.lumen_evaluation` -- flood-fill IoU, ROC AUC and tolerance tuning against expert masks;
* :mod:`.quality` -- region metrics only the benchmarks report (ENL, CNR, singular-value decay);
* :mod:`.speckle_statistics` -- envelope SNR and autocorrelation grain of the simulator's output;
* :mod:`.grain_size` -- speckle grain (autocorrelation FWHM in pixels) of real images.
* :mod:`.igtl_reference` -- the live relay between the reference OpenIGTLink C++ programs
  (ImagerClient -> relay -> ReceiveServer), built from Debian's openigtlink-examples.

Scripts in benchmarks/ import it as ``benchlib`` (their folder is on ``sys.path``); the tests
put benchmarks/ on the path in Testing/conftest.py.
"""
