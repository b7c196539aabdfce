"""The stages of CCD on one block, one module per stage of the method (method.md 4-8).

* :mod:`.base_teachers`   block 0: every teacher member trained on Tr_0 with its own loss (4);
* :mod:`.generation`      stage 1, student generation: a student distilled from the ensemble E_k (7);
* :mod:`.student_update`  stage 2, student update: the proxies' step, CL_k from D_{k-1} with replay (5.1, 5.2);
* :mod:`.teacher_update`  stage 3, teacher update: every member with LWC-KD and student-side replay (5.3, 5.4);
* :mod:`.evaluation`      r_(k,j) of every model after block k (8);
* :mod:`.avoid`           the avoid lists of the BPR negatives that stages 1 and 2 share (5.1, 7).

A stage is ``stage(ctx, state, ...) -> StageOutput`` (:mod:`ccdrec.pipeline.context`); each also has a
plain function over models (``generate_student``, ``update_student``, ``update_teacher``, ...) that
tests and benchmarks call directly. Every stage takes an explicit seed, so a stage re-run after an
interruption gives the same result. The order of the stages is :mod:`ccdrec.pipeline.ccd`'s.
"""
