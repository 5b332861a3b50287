"""Stable methods: ``from posttrain.methods.<name> import <Trainer>, <Config>``.

Each submodule is built on import from the installed plugin that registers ``<name>`` (see
:mod:`posttrain._namespaces`). Only stable methods live here; importing an experimental one raises
an error that names ``posttrain.experimental.<name>``.
"""

from posttrain._namespaces import install_finder, namespace_getattr

__path__: list = []  # submodules come only from the finder, never from files
install_finder()


def __getattr__(name: str):
    return namespace_getattr(__name__, name)
