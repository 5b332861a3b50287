"""A teacher server for the whole test folder: the tiny trained teacher served on 127.0.0.1 (float32, as trained).

Its URL is exported as ``$POSTTRAIN_TEACHER_SERVER_URL``, which ``ServerDistillationConfig`` reads when
``teacher_model_server_url`` is not set: the conformance suite builds its configs from the spec alone.
"""

from __future__ import annotations

import os

import pytest

import posttrain


@pytest.fixture(scope="session")
def teacher_server(tiny_teacher_dir):
    """The tiny trained teacher, served (``posttrain.TeacherServer``) for the whole session."""
    from posttrain import TeacherServer

    with TeacherServer(tiny_teacher_dir) as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def _teacher_server_url(teacher_server):
    from posttrain_server_distill.config import URL_ENV

    old = os.environ.get(URL_ENV)
    os.environ[URL_ENV] = teacher_server.url
    yield teacher_server.url
    if old is None:
        os.environ.pop(URL_ENV, None)
    else:
        os.environ[URL_ENV] = old


@pytest.fixture
def opt_in(clean_gate):
    posttrain.activate("server_distill", allow_experimental=True)
    yield
