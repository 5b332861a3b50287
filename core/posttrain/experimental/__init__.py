"""Experimental methods: ``from posttrain.experimental.<name> import <Trainer>``.

Importing through this namespace is the opt-in for an experimental method (one warning per
process); ``POSTTRAIN_STABLE_ONLY=1`` still refuses it. Stable methods are not here: importing one
raises an error that names ``posttrain.methods.<name>``.
"""

from posttrain._namespaces import install_finder, namespace_getattr

__path__: list = []  # submodules come only from the finder, never from files
install_finder()


def __getattr__(name: str):
    return namespace_getattr(__name__, name)
