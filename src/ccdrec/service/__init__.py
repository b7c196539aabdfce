"""The HTTP service of a run (``ccdrec serve RUN``): the served student over HTTP, with hot swap.

* :mod:`ccdrec.service.version`: a *model version*, one fully loaded and verified model of the run
  (the served student, or the teacher ensemble for comparison) and the ID that names it in every answer;
* :mod:`ccdrec.service.swap`: the slot holding the current version and the watcher that loads a newer
  student beside it when the run completes one, and swaps it in; :func:`~ccdrec.service.swap.publish`,
  the writer's side of the protocol (tests and benchmarks);
* :mod:`ccdrec.service.app`: the FastAPI application (endpoints, error answers, body size limit);
* :mod:`ccdrec.service.page`: the HTML page at ``/`` (run summary, per-block plot, a form);
* :mod:`ccdrec.service.server`: binding the socket and running uvicorn.

FastAPI, uvicorn and orjson are the optional extra ``serve`` (``pip install ccdrec[serve]``); they are
imported only inside the functions that build and run the application, so importing this package costs
nothing and needs none of them.
"""
