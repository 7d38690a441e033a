"""The evaluation library the benchmarks of ``cl_arch.eval`` are built from (and import only from).

* :mod:`.learners`: the batched episode learner (rows of commit policies), dynamic evaluation;
  :mod:`.context`: the full-context reader.
* :mod:`.streams`: held-out packages, episode segmentation, line acceptance, stdlib windows;
  :mod:`.reading`: prequential reading of a stream by learner rows and solo readers;
  :mod:`.user_style`: simulated users' code styles.
* :mod:`.play`: the reward games' environments, the play loop, expected scores.
* :mod:`.models`: the shipped / cached stdlib model, the recall model, memories removed.
* :mod:`.metrics`: learning-curve figures (the bootstraps live in :mod:`cl_arch.stats`);
  :mod:`.compute`: FLOPs, state bytes and measured cost per row; :mod:`.dyntune`: dynamic
  evaluation's sweep and its cache.
* :mod:`.report`: the report schema, JSON and plots; :mod:`.options`: command-line pieces and the
  protocol a benchmark module follows to appear in ``cl-arch eval``.
"""
