"""posttrain's conformance suite against this plugin, run exactly as an outside lab runs it.

Equivalent: `pytest -p posttrain.conformance --posttrain-method example_method`.
"""

from posttrain.conformance.suite import *  # noqa: F401,F403  (the tests, their fixtures and the parametrization)

POSTTRAIN_METHODS = ["example_method"]
