"""The admin pages: access-rights grid, server-info editing, sessions, audit log.

Served by waitress on the management address only (`appliance run admin`).
"""
