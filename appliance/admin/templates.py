# ruff: noqa: E501  (HTML lines)
"""The admin pages' templates and style sheet (kept in code: one package, no data files).

Jinja autoescapes every `.html` template here; nothing is marked safe.
"""

from __future__ import annotations

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d3557; color: #fff; padding: .6rem 1.2rem; display: flex; gap: 1.2rem;
  align-items: center; }
header a { color: #fff; text-decoration: none; } header a.here { text-decoration: underline; }
header form { margin-left: auto; }
main { padding: 1rem 1.2rem; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ccd; padding: .25rem .4rem; text-align: left; vertical-align: top; }
th { background: #e8ecf3; }
td.allow { background: #dff3e4; } td.deny { background: #f8dede; }
input[type=text] { width: 100%; box-sizing: border-box; }
input.narrow { width: 4.5em; }
input.pattern { width: 24em; }
textarea { width: 100%; height: 28em; font-family: monospace; }
.error { background: #f8dede; border: 1px solid #c33; padding: .5rem; white-space: pre-wrap; }
.conflict { background: #fff3cd; border: 1px solid #c90; padding: .5rem; }
.ok { background: #dff3e4; border: 1px solid #393; padding: .5rem; }
pre.diff { background: #fff; border: 1px solid #ccd; padding: .4rem; font-size: .85em; }
button { padding: .3rem .8rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
nav.periods a { margin-right: .8rem; } nav.periods a.here { font-weight: bold; }
svg.plot { background: #fff; border: 1px solid #ccd; }
svg.plot rect { fill: #1d3557; } svg.plot line { stroke: #ccd; }
"""

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}{% endblock %} - appliance admin</title>
<link rel="stylesheet" href="{{ url_for('css') }}"></head>
<body><header><strong>Guest gateway admin</strong>
{% if admin %}
<a href="{{ url_for('access') }}">Access rights</a>
<a href="{{ url_for('servers_page') }}">Server info</a>
<a href="{{ url_for('agents_page') }}">Trusted agents</a>
<a href="{{ url_for('sessions_page') }}">Sessions</a>
<a href="{{ url_for('usage_page_view') }}">Usage</a>
<a href="{{ url_for('audit_page') }}">Audit log</a>
<form method="post" action="{{ url_for('logout') }}"><input type="hidden" name="csrf" value="{{ csrf_token() }}">
{{ admin }} <button type="submit" id="logout">Log out</button></form>
{% endif %}
</header><main>
{% if error %}<div class="error" id="error">{{ error }}</div>{% endif %}
{% if conflict %}<div class="conflict" id="conflict">Conflict: {{ conflict }}.
Your edit was not saved; the form still holds it. Open the page again to see the
current table, then redo your change.</div>{% endif %}
{% if saved %}<div class="ok" id="saved">Saved, validated, and sent to the running roles.</div>{% endif %}
{% block body %}{% endblock %}
</main></body></html>
"""

LOGIN = """{% extends "base.html" %}{% block title %}Log in{% endblock %}{% block body %}
<h1>Admin log in</h1>
<form method="post" action="{{ url_for('login') }}">
<input type="hidden" name="csrf" value="{{ csrf_token() }}">
<p><label>Admin name <input name="name" id="name" autocomplete="username"></label></p>
<p><label>Password <input type="password" name="password" id="password"
 autocomplete="current-password"></label></p>
<p><button type="submit" id="login">Log in</button></p>
</form>{% endblock %}
"""

ACCESS = """{% extends "base.html" %}{% block title %}Access rights{% endblock %}{% block body %}
<h1>Access rights</h1>
<p>Rows are attribute patterns (<code>key=value; key=a|b; key=glob*</code>, empty for
everyone), columns are services. <strong>First match wins, per service</strong>: for a
service, the first row (by position) that matches the user and says allow or deny decides;
no such row: denied. A user matching no row at all may not use the network.</p>
<form method="post" action="{{ url_for('access_save') }}" id="grid">
<input type="hidden" name="csrf" value="{{ csrf_token() }}">
<input type="hidden" name="version" value="{{ version }}">
<table><tr><th>pos</th><th>name</th><th>attribute pattern</th>
{% for s in services %}<th>{{ s }}</th>{% endfor %}
<th>max conn.</th><th>session s</th><th>quota B/day</th><th>remove</th></tr>
{% for row in rows %}{% set i = loop.index0 %}
<tr><td><input class="narrow" name="order-{{ i }}" value="{{ loop.index }}"></td>
<td><input type="text" name="name-{{ i }}" value="{{ row.name }}"></td>
<td><input type="text" class="pattern" name="pattern-{{ i }}" value="{{ row.pattern }}"></td>
{% for s in services %}{% set v = row.cells.get(s, '') %}
<td class="{{ v }}"><select name="cell-{{ i }}-{{ s }}" id="cell-{{ row.name }}-{{ s }}">
<option value=""{% if v == '' %} selected{% endif %}>-</option>
<option value="allow"{% if v == 'allow' %} selected{% endif %}>allow</option>
<option value="deny"{% if v == 'deny' %} selected{% endif %}>deny</option></select></td>
{% endfor %}
<td><input class="narrow" name="max-{{ i }}" value="{{ row.max_connections }}"></td>
<td><input class="narrow" name="session-{{ i }}" value="{{ row.session_max }}"></td>
<td><input class="narrow" name="quota-{{ i }}" value="{{ row.quota_bytes_per_day }}"></td>
<td><input type="checkbox" name="remove-{{ i }}" value="1"></td></tr>
{% endfor %}
<tr><td><input class="narrow" name="order-new" value="{{ rows|length + 1 }}"></td>
<td><input type="text" name="name-new" id="name-new" placeholder="new rule"></td>
<td><input type="text" class="pattern" name="pattern-new" id="pattern-new" placeholder="department=Sales 2"></td>
{% for s in services %}<td><select name="cell-new-{{ s }}" id="cell-new-{{ s }}">
<option value="">-</option><option value="allow">allow</option><option value="deny">deny</option>
</select></td>{% endfor %}
<td><input class="narrow" name="max-new"></td><td><input class="narrow" name="session-new"></td>
<td><input class="narrow" name="quota-new"></td>
<td></td></tr>
</table>
<p><button type="submit" id="save">Validate and save</button></p>
</form>{% endblock %}
"""

SERVERS = """{% extends "base.html" %}{% block title %}Server info{% endblock %}{% block body %}
<h1>Server info</h1>
<p>The site's server-info table (<code>servers.toml</code>). It is validated before it is
saved: ports in range, known protocols, no server on the guest side, and every service the
access rights name must stay.</p>
{% if services %}<table id="services"><tr><th>service</th><th>protocol</th><th>listens on</th>
<th>intercepts</th><th>servers, in order</th><th>personal server allowed</th><th>guest names</th></tr>
{% for s in services %}<tr><td>{{ s.name }}</td><td>{{ s.protocol }}</td><td>{{ s.listen_port }}</td>
<td>{{ s.intercept_ports|join(', ') }}</td><td>{{ s.upstreams|join(', ') or '(personal only)' }}{% if s.tls %} (TLS){% endif %}</td>
<td>{{ 'yes' if s.personal_allowed else 'no' }}</td><td>{{ s.guest_names|join(', ') }}</td></tr>
{% endfor %}</table>{% endif %}
<form method="post" action="{{ url_for('servers_save') }}">
<input type="hidden" name="csrf" value="{{ csrf_token() }}">
<input type="hidden" name="version" value="{{ version }}">
<textarea name="text" id="text" spellcheck="false">{{ text }}</textarea>
<p><button type="submit" id="save">Validate and save</button></p>
</form>{% endblock %}
"""

AGENTS = """{% extends "base.html" %}{% block title %}Trusted agents{% endblock %}{% block body %}
<h1>Trusted agents</h1>
<p>Visitors may log in through any personal agent, but only the agents in this table
(<code>agents.toml</code>) may assert attributes, and only the keys listed for each. A
login through any other agent carries just <code>source = "agent"</code> and
<code>agent = "&lt;host&gt;"</code>, which a rule must name to grant anything. Agent logins
are <code>user@agent</code>. The table is validated before it is saved and applies at the
next login. Saving ends the open sessions that hold an attribute their agent may no longer
assert, or whose agent lost a fingerprint or domain; they log in again.</p>
{% if agents %}<table id="agents"><tr><th>agent (users are user@agent)</th><th>fingerprints</th>
<th>domains (CA-verified)</th><th>may assert</th></tr>
{% for a in agents %}<tr><td>{{ a.name }}</td><td>{{ a.fingerprints|sort|join(', ') or '-' }}</td>
<td>{{ a.domains|sort|join(', ') or '-' }}</td><td>{{ a.attributes|sort|join(', ') or '(nothing)' }}</td></tr>
{% endfor %}</table>{% elif not error %}<p id="none">No agent is trusted: every agent login carries only
<code>source</code> and <code>agent</code>.</p>{% endif %}
<form method="post" action="{{ url_for('agents_save') }}">
<input type="hidden" name="csrf" value="{{ csrf_token() }}">
<input type="hidden" name="version" value="{{ version }}">
<textarea name="text" id="text" spellcheck="false">{{ text }}</textarea>
<p><button type="submit" id="save">Validate and save</button></p>
</form>{% endblock %}
"""

SESSIONS = """{% extends "base.html" %}{% block title %}Sessions{% endblock %}{% block body %}
<h1>Active sessions</h1>
{% if not items %}<p>No active sessions.</p>
{% else %}<table><tr><th>user</th><th>source</th><th>appliance</th><th>address</th><th>MAC</th>
<th>since</th><th>idle expiry</th><th></th></tr>
{% for s in items %}<tr><td>{{ s.user }}</td><td>{{ s.source }}</td><td>{{ where[s.id] }}</td><td>{{ s.ip }}</td>
<td>{{ s.mac }}</td><td>{{ ((now - s.created) // 60)|int }} min</td>
<td>{{ ((s.idle_expiry - now) // 60)|int }} min</td>
<td><form method="post" action="{{ url_for('session_end') }}">
<input type="hidden" name="csrf" value="{{ csrf_token() }}">
<input type="hidden" name="id" value="{{ s.id }}"><button type="submit">End</button></form></td></tr>
{% endfor %}</table>{% endif %}{% endblock %}
"""

AUDIT = """{% extends "base.html" %}{% block title %}Audit log{% endblock %}{% block body %}
<h1>Audit log</h1>
{% if not entries %}<p>No changes yet.</p>{% endif %}
<table id="audit">{% for e in entries %}<tr><td>{{ e.when }}</td><td>{{ e.admin }}</td>
<td>{{ e.action }}</td><td>{{ e.target }}{% if e.diff %}<pre class="diff">{{ e.diff }}</pre>{% endif %}
</td></tr>{% endfor %}</table>{% endblock %}
"""

USAGE = """{% extends "base.html" %}{% block title %}Usage{% endblock %}{% block body %}
<h1>Usage per user and service</h1>
<nav class="periods">{% for key, label in periods.items() %}
<a href="{{ url_for('usage_page_view', period=key) }}" id="period-{{ key }}"{% if key == period %} class="here"{% endif %}>{{ label }}</a>
{% endfor %}<a href="{{ url_for('usage_csv', period=period) }}" id="csv">Download CSV</a></nav>
<p>{{ first }} to {{ last }} (UTC days). Bytes up: guest to server; down: server to guest.
The plot shows bytes per day, both ways, from {{ plot_first }}. The relay adds its counts
every few seconds. SMTP messages: mails the server accepted (smtp and submission); after
STARTTLS the relay cannot read a session, so a mail sent over TLS is not counted.</p>
{% if not users %}<p id="none">No usage in this period.</p>
{% else %}<table id="usage"><tr><th>user</th><th>service</th><th>connections</th><th>bytes up</th>
<th>bytes down</th><th>SMTP messages</th><th>bytes per day</th></tr>
{% for u in users %}{% for s in u.services %}
<tr class="usage-row" data-user="{{ u.user }}" data-service="{{ s.service }}">
{% if loop.first %}<td rowspan="{{ u.services|length }}" class="user">{{ u.user }}</td>{% endif %}
<td class="service">{{ s.service }}</td><td class="num connections">{{ s.connections }}</td>
<td class="num bytes-up" title="{{ s.bytes_up }} bytes" data-bytes="{{ s.bytes_up }}">{{ s.bytes_up|human_bytes }}</td>
<td class="num bytes-down" title="{{ s.bytes_down }} bytes" data-bytes="{{ s.bytes_down }}">{{ s.bytes_down|human_bytes }}</td>
<td class="num messages">{{ s.messages if s.service in ('smtp', 'submission') or s.messages else '' }}</td>
{% if loop.first %}<td rowspan="{{ u.services|length }}">
<svg class="plot" data-user="{{ u.user }}" width="{{ plot_w }}" height="{{ plot_h }}"
 viewBox="0 0 {{ plot_w }} {{ plot_h }}" role="img" aria-label="bytes per day of {{ u.user }}, peak {{ u.peak|human_bytes }}">
<line x1="0" y1="{{ plot_h - 0.5 }}" x2="{{ plot_w }}" y2="{{ plot_h - 0.5 }}"></line>
{% for b in u.bars %}<rect x="{{ b.x }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ b.h }}"><title>{{ b.title }}</title></rect>{% endfor %}
</svg><br>total {{ u.total|human_bytes }}</td>{% endif %}</tr>
{% endfor %}{% endfor %}</table>{% endif %}{% endblock %}
"""

ERROR = """{% extends "base.html" %}{% block title %}Error{% endblock %}{% block body %}{% endblock %}
"""

TEMPLATES = {
    "base.html": BASE,
    "login.html": LOGIN,
    "access.html": ACCESS,
    "servers.html": SERVERS,
    "agents.html": AGENTS,
    "sessions.html": SESSIONS,
    "audit.html": AUDIT,
    "usage.html": USAGE,
    "error.html": ERROR,
}
