"""The relay: intercepted guest connections, decided per user and relayed to the right server.

`gate` says who may go where (sessions + policy behind a small Protocol),
`refusals` words a "no" in each protocol, `relay` moves bytes, `http` speaks
HTTP for the web services, `service` runs it all as the `proxy` role.
"""
