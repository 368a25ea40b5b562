"""Hubble's flow format: authd's policy verdicts as ``flow.Flow`` messages, Hubble's filters and printer.

- :mod:`.reasons`: the one table from authd's drop reasons and policy matches to Hubble's values;
- :mod:`.convert`: a datapath flow event as a ``flow.Flow`` (SPIFFE IDs in the endpoint labels);
- :mod:`.filters`: ``flow.FlowFilter`` white- and blacklists, refused when they ask for what authd lacks;
- :mod:`.printer`: ``hubble observe``'s output modes (compact, dict, json/jsonpb);
- ``_proto``: the protos, written for authd with Hubble's package names and field numbers.
"""
