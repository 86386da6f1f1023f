"""TensorRT engines: the recipe a GPU build carries (``recipe.py``, ``build_engine.py``), the
``sparsecompile engine`` command that runs it on the target (``run.py``), and the parser of
TensorRT's sparse-math decisions in its build log (``sparsity_log.py``)."""
