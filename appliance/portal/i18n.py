"""The portal's words in English and Japanese, picked by the browser's Accept-Language.

Two languages in one small table keep the pages readable without a
translation framework; a missing Japanese entry falls back to English.
"""

from __future__ import annotations

LANGUAGES = ("en", "ja")

MESSAGES: dict[str, dict[str, str]] = {
    "title": {"en": "Guest network", "ja": "ゲストネットワーク"},
    "login_heading": {"en": "Log in to use the network", "ja": "ネットワークを使うにはログイン"},
    "login_intro": {
        "en": "Use an account of this site, or your home account through your personal agent.",
        "ja": "このサイトのアカウント、または個人エージェント経由で自宅のアカウントを使えます。",
    },
    "user": {"en": "User ID", "ja": "ユーザーID"},
    "password": {"en": "Password", "ja": "パスワード"},
    "agent": {"en": "Home agent", "ja": "ホームエージェント"},
    "agent_hint": {
        "en": "Leave empty for a site account; otherwise e.g. home.example or 203.0.113.1,"
        " or behind a relay household.relay.example#sha256:… (your agent's fingerprint)",
        "ja": "サイトのアカウントなら空欄。自宅なら例: home.example や 203.0.113.1、"
        "リレー経由なら household.relay.example#sha256:…（エージェントのフィンガープリント）",
    },
    "login": {"en": "Log in", "ja": "ログイン"},
    "logout": {"en": "Log out", "ja": "ログアウト"},
    "status_heading": {"en": "You are connected", "ja": "接続しています"},
    "who": {"en": "Logged in as", "ja": "ログイン中のユーザー"},
    "via_site": {"en": "site account", "ja": "サイトのアカウント"},
    "via_agent": {"en": "personal agent {host}", "ja": "個人エージェント {host}"},
    "address": {"en": "Your device", "ja": "お使いの端末"},
    "time_left": {"en": "Time left", "ja": "残り時間"},
    "services": {"en": "Services", "ja": "サービス"},
    "allowed": {"en": "allowed", "ja": "利用可"},
    "refused": {"en": "not allowed", "ja": "利用不可"},
    "because": {"en": "why", "ja": "理由"},
    "no_services": {
        "en": "The list of services is not available right now.",
        "ja": "現在サービスの一覧を表示できません。",
    },
    "continue_to": {"en": "Continue to", "ja": "次へ進む:"},
    "online_heading": {"en": "You are online", "ja": "オンラインです"},
    "online_text": {
        "en": "This request reached the guest portal rather than its destination.",
        "ja": "このリクエストは宛先ではなくゲストポータルに届きました。",
    },
    "logged_out": {"en": "You are logged out.", "ja": "ログアウトしました。"},
    "login_needed": {
        "en": "This network needs a login first.",
        "ja": "このネットワークは先にログインが必要です。",
    },
    # errors
    "err_credentials": {
        "en": "Wrong user ID or password.",
        "ja": "ユーザーIDまたはパスワードが違います。",
    },
    "err_missing": {
        "en": "Please enter a user ID and a password.",
        "ja": "ユーザーIDとパスワードを入力してください。",
    },
    "err_rate": {
        "en": "Too many failed logins. Try again in {seconds} s.",
        "ja": "ログインの失敗が多すぎます。{seconds} 秒後にもう一度お試しください。",
    },
    "err_csrf": {
        "en": "The form expired. Please try again.",
        "ja": "フォームの有効期限が切れました。もう一度お試しください。",
    },
    "err_device": {
        "en": "Your device could not be identified on this network (no address from our DHCP).",
        "ja": "この端末を識別できません（DHCP で割り当てたアドレスではありません）。",
    },
    "err_policy": {
        "en": "Your account may not use this network: {reason}",
        "ja": "このアカウントではこのネットワークを使えません: {reason}",
    },
    "err_firewall": {
        "en": "Login worked, but the network could not be opened for you. Please ask staff.",
        "ja": "ログインできましたが、ネットワークを開けませんでした。係員にお尋ねください。",
    },
    "err_characters": {
        "en": "The user ID or the home agent contains characters that are not allowed.",
        "ja": "ユーザーIDまたはホームエージェントに使えない文字が含まれています。",
    },
    "err_busy": {
        "en": "Too many logins are waiting for a home agent right now. Try again in a moment.",
        "ja": "ホームエージェントの応答を待つログインが多すぎます。少し待ってからお試しください。",
    },
    "agent_unknown_user": {
        "en": "Your home agent does not know this user ID.",
        "ja": "ホームエージェントがこのユーザーIDを知りません。",
    },
    "agent_bad_password": {
        "en": "Your home agent refused the password.",
        "ja": "ホームエージェントがパスワードを拒否しました。",
    },
    "agent_locked": {
        "en": "Your home account is locked for now. Try again later.",
        "ja": "自宅のアカウントは現在ロックされています。後でお試しください。",
    },
    "agent_not_reached": {
        "en": "No home agent answered at this address. Check the address (and the fingerprint,"
        " if you gave one) and try again.",
        "ja": "このアドレスで応答するホームエージェントがありません。アドレス（指定した場合は"
        "フィンガープリントも）を確認して、もう一度お試しください。",
    },
    "agent_appliance_not_allowed": {
        "en": "Your household has not allowed this appliance yet. At home, run: {command}"
        " (then log in again).",
        "ja": "このアプライアンスはまだご家庭で許可されていません。自宅で次を実行してから、"
        "もう一度ログインしてください: {command}",
    },
    "agent_refused_servers": {
        "en": "Your home agent named servers this site does not allow.",
        "ja": "ホームエージェントが、このサイトで許可されないサーバーを指定しました。",
    },
    "agent_offline": {
        "en": "Your home agent is not connected to its relay right now. Try again later.",
        "ja": "ホームエージェントは現在リレーに接続していません。後でお試しください。",
    },
    "agent_other": {
        "en": "Your home agent could not log you in.",
        "ja": "ホームエージェントでログインできませんでした。",
    },
}


def pick(accept_language: str | None) -> str:
    """The best of our languages for an Accept-Language header (RFC 9110 q-values)."""
    best, best_q = "en", -1.0
    for i, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        primary = tag.split("-")[0]
        if primary in LANGUAGES and q > 0 and q - i * 1e-6 > best_q:
            best, best_q = primary, q - i * 1e-6
    return best


def text(lang: str, key: str, **kw: object) -> str:
    entry = MESSAGES[key]
    return entry.get(lang, entry["en"]).format(**kw)


def duration(lang: str, seconds: int) -> str:
    h, rem = divmod(max(0, seconds), 3600)
    m = rem // 60
    if lang == "ja":
        return f"{h} 時間 {m} 分" if h else f"{m} 分"
    return f"{h} h {m} min" if h else f"{m} min"
