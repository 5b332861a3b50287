"""posttrain's conformance suite against this plugin (the same as `pytest -p posttrain.conformance --posttrain-method prime`)."""

from posttrain.conformance.suite import *  # noqa: F401,F403  (the tests, their fixtures and the parametrization)

POSTTRAIN_METHODS = ["prime"]
