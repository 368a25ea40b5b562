"""Attestation between nodes over the node channel: one TLS 1.3 session per pair of nodes.

:mod:`.channels` keeps the sessions up (who dials, admission, reconnects); :mod:`.channel` is one session,
asking for identities and proving local ones with :mod:`.proofs`, in frames of :mod:`.wire`;
:mod:`.outcomes` decides what each outcome means; :mod:`.results` holds "R at A until T" for the auth
manager; :mod:`.tls` builds the contexts and :mod:`.admission` guards the listener.
"""
