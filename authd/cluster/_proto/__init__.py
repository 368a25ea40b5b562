"""Protobuf module for the etcd v3 API subset authd uses, generated from ``etcd.proto`` by ``make``."""
