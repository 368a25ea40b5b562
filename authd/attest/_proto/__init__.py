"""Protobuf module of the node channel, generated from ``channel.proto`` here by ``make artifacts``."""
