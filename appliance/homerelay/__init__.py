"""The home relay: the server on the internet that households behind NAT register with.

A household's agent keeps a link open to it; an appliance asks it for a household and it
joins the two streams, forwarding end-to-end TLS it cannot read (docs/home-relay.md).
The protocol parts are sans-IO (`registration`, `table`); the server wraps them.
"""
