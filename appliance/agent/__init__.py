"""The personal agent: a household daemon that vouches for its members, and its client.

The agent (`personal-agent run`) holds the household's users (argon2id hashes,
attributes) and each user's own servers; appliances ask it over HTTPS, signing
every request with their Ed25519 key, and pin the agent's certificate.  See
`wire.py` for what both sides agree on, and docs/design.md "The personal agent".
"""
