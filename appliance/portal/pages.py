"""The portal's HTML: one small Jinja layout, plain HTML and CSS, no JavaScript.

Readable on a phone (viewport meta, one column, large touch targets) and on a
desktop (a centred card).  Every value is autoescaped by Jinja.
"""

from __future__ import annotations

LAYOUT = """<!doctype html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ t('title') }}</title>
<style>
:root { color-scheme: light dark; --fg:#1b1f24; --bg:#f4f6f8; --card:#fff; --accent:#0b5cad;
        --ok:#1a7f37; --bad:#b42318; --muted:#57606a; --line:#d0d7de; }
@media (prefers-color-scheme: dark) {
  :root { --fg:#e6edf3; --bg:#0d1117; --card:#161b22; --accent:#4493f8; --ok:#3fb950;
          --bad:#f85149; --muted:#8d96a0; --line:#30363d; } }
* { box-sizing: border-box; }
body { margin:0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", "Hiragino Sans",
       "Noto Sans JP", sans-serif; color:var(--fg); background:var(--bg); }
main { max-width: 28rem; margin: 0 auto; padding: 1.25rem; }
.card { background:var(--card); border:1px solid var(--line); border-radius:12px;
        padding:1.25rem 1.25rem 1.5rem; }
h1 { font-size:1.35rem; margin:.2rem 0 .8rem; }
header { color:var(--muted); font-size:.9rem; margin:.5rem 0 1rem; letter-spacing:.02em; }
label { display:block; font-weight:600; margin-top:1rem; }
input[type=text], input[type=password] { width:100%; font-size:1rem; padding:.65rem .75rem;
        margin-top:.3rem; border:1px solid var(--line); border-radius:8px;
        background:var(--bg); color:var(--fg); }
.hint { color:var(--muted); font-size:.85rem; margin:.25rem 0 0; }
button { width:100%; margin-top:1.4rem; font-size:1.05rem; padding:.75rem; border:0;
         border-radius:8px; background:var(--accent); color:#fff; font-weight:600; cursor:pointer; }
button.secondary { background:transparent; color:var(--accent); border:1px solid var(--accent); }
.error { border-left:4px solid var(--bad); background:rgba(180,35,24,.08); padding:.6rem .8rem;
         margin:.5rem 0 1rem; border-radius:4px; }
.notice { border-left:4px solid var(--accent); background:rgba(11,92,173,.08); padding:.6rem .8rem;
          margin:.5rem 0 1rem; border-radius:4px; }
dl { display:grid; grid-template-columns:auto 1fr; gap:.35rem 1rem; margin:0; }
dt { color:var(--muted); } dd { margin:0; overflow-wrap:anywhere; }
ul.services { list-style:none; padding:0; margin:.4rem 0 0; }
ul.services li { padding:.45rem 0; border-top:1px solid var(--line); }
.ok { color:var(--ok); font-weight:600; } .bad { color:var(--bad); font-weight:600; }
.why { color:var(--muted); font-size:.85rem; display:block; }
a { color:var(--accent); }
</style>
</head>
<body><main>
<header>{{ t('title') }}</header>
<div class="card">
{% block body %}{% endblock %}
</div>
</main></body></html>
"""

LOGIN = (
    LAYOUT.split("{% block body %}")[0]
    + """
<h1>{{ t('login_heading') }}</h1>
{% if notice %}<p class="notice">{{ notice }}</p>{% endif %}
{% if error %}<p class="error" role="alert" id="error">{{ error }}</p>{% endif %}
<p class="hint">{{ t('login_intro') }}</p>
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="url" value="{{ url }}">
<label for="user">{{ t('user') }}</label>
<input type="text" id="user" name="user" value="{{ user }}" autocomplete="username"
       autocapitalize="none" spellcheck="false" required>
<label for="password">{{ t('password') }}</label>
<input type="password" id="password" name="password" autocomplete="current-password" required>
<label for="agent">{{ t('agent') }}</label>
<input type="text" id="agent" name="agent" value="{{ agent }}" autocapitalize="none"
       spellcheck="false" inputmode="url">
<p class="hint">{{ t('agent_hint') }}</p>
<button type="submit" id="login">{{ t('login') }}</button>
</form>
"""
    + LAYOUT.split("{% endblock %}")[1]
)

STATUS = (
    LAYOUT.split("{% block body %}")[0]
    + """
<h1>{{ t('status_heading') }}</h1>
{% if notice %}<p class="notice">{{ notice }}</p>{% endif %}
<dl>
<dt>{{ t('who') }}</dt><dd id="who">{{ s.user }}</dd>
<dt></dt><dd>{{ via }}</dd>
<dt>{{ t('address') }}</dt><dd>{{ s.ip }} · {{ s.mac }}</dd>
<dt>{{ t('time_left') }}</dt><dd id="left">{{ left }}</dd>
</dl>
<h1 style="font-size:1.05rem;margin-top:1.2rem">{{ t('services') }}</h1>
{% if services is none %}<p class="hint">{{ t('no_services') }}</p>{% else %}
<ul class="services">
{% for name, v in services %}<li><strong>{{ name }}</strong>:
{% if v.allowed %}<span class="ok">{{ t('allowed') }}</span>
{% else %}<span class="bad">{{ t('refused') }}</span>{% endif %}
<span class="why">{{ t('because') }}: {{ v.reason }}</span></li>
{% endfor %}</ul>{% endif %}
{% if url %}<p><a href="{{ url }}" id="continue">{{ t('continue_to') }} {{ url }}</a></p>{% endif %}
<form method="post" action="/logout">
<input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" class="secondary" id="logout">{{ t('logout') }}</button>
</form>
"""
    + LAYOUT.split("{% endblock %}")[1]
)

MESSAGE = (
    LAYOUT.split("{% block body %}")[0]
    + """
<h1>{{ heading }}</h1>
<p id="message">{{ message }}</p>
{% if link %}<p><a href="{{ link }}">{{ link_text }}</a></p>{% endif %}
"""
    + LAYOUT.split("{% endblock %}")[1]
)

TEMPLATES = (LOGIN, STATUS, MESSAGE)

# the answers OSes expect from their connectivity probes once the guest is online
PROBE_ANSWERS: dict[str, tuple[int, str, str]] = {
    "/generate_204": (204, "", "text/plain"),
    "/gen_204": (204, "", "text/plain"),
    "/hotspot-detect.html": (
        200,
        "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>",
        "text/html",
    ),
    "/library/test/success.html": (
        200,
        "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>",
        "text/html",
    ),
    "/connecttest.txt": (200, "Microsoft Connect Test", "text/plain"),
    "/ncsi.txt": (200, "Microsoft NCSI", "text/plain"),
}
