"""Served results: placeholder until the server integration lands."""


def patch() -> None:
    return None
