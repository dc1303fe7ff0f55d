"""Algorithms on any SciPy ``LinearOperator``, written once against a torch block product."""
