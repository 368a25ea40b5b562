"""Protobuf modules for Hubble's flow and Observer APIs, generated from the ``.proto`` files here."""
