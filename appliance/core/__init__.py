"""Plumbing every part uses: configuration, TOML, files, logs, passwords, and the
cross-cutting rules of guest reachability (`reach`) and neighbours (`neighbours`)."""
