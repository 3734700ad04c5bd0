# The tests compile hundreds of tiny programs once each and mostly run them for milliseconds,
# so LLVM's optimisation passes cost more than they save (XLA's own optimisations and the
# matmul library calls are unchanged, so are the semantics and tolerances). conftest.py sets it
# for the whole run; a test that runs long, like the notebook, drops it.
FAST_COMPILE_XLA_FLAG = "--xla_backend_optimization_level=0"
