"""Run services: what every run needs beside the science, free of Kedro and of the experiments.

* :mod:`.run_manifest`: the run's record on disk (status, parameters, outputs) and its lock;
* :mod:`.parallel`: work a node hands out (one task per training under the Dask runner);
* :mod:`.cluster`: the Dask cluster of ``dask.yml``, checked and started;
* :mod:`.logs`: the run's log file and what the terminal leaves out.
"""
