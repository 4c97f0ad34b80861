"""The Kedro glue: everything that ties the Kedro-free library to ``kedro run``.

* :mod:`.hooks`: before a run, its checks (:mod:`.run_checks`), the project root as working folder, the log;
* :mod:`.run_checks`: every parameter section built before any work, and the checks that span sections;
* :mod:`.run_hooks`: the run's record (``services.run_manifest``) kept from Kedro's hooks;
* :mod:`.tracking`: MLflow tracking of what the catalog declares (:mod:`.tracked`: the declarations);
* :mod:`.runner`: ``DaskRunner``, the pipeline's nodes as tasks of a Dask cluster;
* :mod:`.datasets`: the project's Kedro datasets (tensors, spilled gradients, optional inputs).
"""
