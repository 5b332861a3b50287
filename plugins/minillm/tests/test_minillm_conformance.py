"""posttrain's conformance suite against this plugin (the same as `pytest -p posttrain.conformance --posttrain-method minillm`).

MiniLLM needs a teacher: the suite's tiny runs give a config with ``teacher_model_name_or_path`` the tiny model itself.
"""

from posttrain.conformance.suite import *  # noqa: F401,F403  (the tests, their fixtures and the parametrization)

POSTTRAIN_METHODS = ["minillm"]
