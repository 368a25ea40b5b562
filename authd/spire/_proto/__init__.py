"""Protobuf modules for the SPIRE APIs, generated from the ``.proto`` files here by ``make artifacts``."""
