"""The dhcp role: a packet socket and a UDP socket on the guest interface around the pure server.

Requests are read from the link (AF_PACKET, a BPF filter keeps IPv4 UDP to port
67): the Ethernet source is what the server checks chaddr against and what the
flood guard counts by, since everything inside a request is the sender's word.
Replies leave through an ordinary UDP socket bound to port 67, which also keeps
the kernel from answering requests with ICMP port unreachable; a filter that
drops everything keeps that socket from queueing a second copy of each request.

Per burst of datagrams: decode, answer from the in-memory index, commit every
persisted lease change of the burst in one SQLite transaction, and only then send
the replies (group commit: an ACK never leaves before its lease is on disk, in the
WAL, which survives kill -9 with synchronous=NORMAL).

Reply addressing follows RFC 2131 section 4.1.  A client without an address that
did not ask for broadcast gets a unicast to yiaddr/chaddr: the kernel cannot ARP
for an address the client does not have yet, so that reply leaves as a whole
Ethernet frame on the packet socket (frame.build), to chaddr, and needs no
neighbour entry (no SIOCSARP, so no CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from prometheus_client.core import Metric

from appliance.core import metrics
from appliance.core.config import Config
from appliance.ha.holder import CHECK_EVERY, AlwaysActive, Holder
from appliance.state import appliances, leases, schema, store, takeover
from appliance.state.connection import STORE_ERRORS, Connection
from dhcp import codec, frame
from dhcp.codec import TYPE_NAMES, DecodeError
from dhcp.pool import PERSISTED, Binding, Change, LeaseIndex, client_key, ip_to_int
from dhcp.server import BROADCAST_IP, SERVER_PORT, Settings, Source, destination, handle

log = logging.getLogger("appliance.dhcp")

BATCH = 256  # datagrams handled per group commit at most
SWEEP_EVERY = 5.0  # seconds between expiry sweeps (the contract asks for <= 10 s)
TAKEOVER_RETRY = 1.0  # seconds between a pair box's tries to take over the store
STATS_EVERY = 2.0
EXHAUSTED_WARN_EVERY = 60.0
FLOOD_RATE = 10.0  # packets per second one client may send, on average
FLOOD_BURST = 30.0
COMMIT_WINDOW = 0.002  # seconds a burst with lease changes waits for more before committing
# A backlog deeper than ~0.2 s of work only answers clients that gave up already:
# after a flood the server must be current again at once.
RCVBUF = 1 << 20
ATF_COM = 0x02
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33  # needs CAP_NET_ADMIN; else SO_RCVBUF, capped by rmem_max


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach a classic BPF program (struct sock_filter[]); the kernel copies it."""
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_link(ifname: str) -> socket.socket:
    """The packet socket requests are read from (needs CAP_NET_RAW).

    Made with protocol 0, so it queues nothing until the filter is on and it is
    bound to IPv4 on the guest interface."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    attach_filter(sock, frame.FILTER)
    for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
            break
    sock.bind((ifname, frame.ETH_P_IP))
    sock.setblocking(False)
    return sock


def link_mac(link: socket.socket) -> bytes:
    """The hardware address of the interface a packet socket is bound to (its sll_addr;
    zeros for a stand-in socket in tests)."""
    name = link.getsockname()
    if isinstance(name, tuple) and len(name) > 4:
        return bytes(name[4])[:6].ljust(6, b"\0")
    return bytes(6)


def open_socket(ifname: str, port: int = SERVER_PORT) -> socket.socket:
    """The UDP socket replies leave from; it reads nothing (see open_link)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attach_filter(sock, frame.DROP_ALL)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


def to_row(kind: str, b: Binding) -> leases.Row:
    return (kind, b.ip, b.mac, b.client_id, b.hostname, b.expires)


def to_lease(b: Binding) -> leases.Lease:
    return leases.Lease(b.ip, b.mac, b.expires, b.state, b.client_id, b.hostname)


def to_binding(lease: leases.Lease) -> Binding:
    return Binding(
        lease.ip,
        lease.mac,
        client_key(lease.client_id, lease.mac),
        lease.state,
        lease.expires,
        lease.client_id,
        lease.hostname,
    )


def load_index(conn: Connection, settings: Settings) -> LeaseIndex:
    """The index from the store: this box's guest subnet only.  Appliances of several
    segments may share one store; another subnet's leases are never swept, offered or
    counted here (each box of a pair serves the same subnet)."""
    index = settings.new_index()
    index.load(to_binding(lease) for lease in leases.history(conn) if settings.in_subnet(lease.ip))
    return index


class FloodGuard:
    """A token bucket per sender (Ethernet source): one noisy guest cannot starve others."""

    def __init__(self, rate: float = FLOOD_RATE, burst: float = FLOOD_BURST):
        self.rate, self.burst = rate, burst
        self.buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, key: bytes, now: float) -> bool:
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets[key] = (tokens - 1.0, now)
        return True

    def forget(self, now: float) -> None:
        full = self.burst / self.rate
        self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < full}


class SubnetTaken(Exception):
    """Another appliance on the shared store serves an overlapping guest subnet."""


class Service:
    def __init__(
        self,
        config: Config,
        sock: socket.socket | None = None,
        link: socket.socket | None = None,
        holder: Holder | AlwaysActive | None = None,
    ):
        self.config = config
        self.ifname = config.interfaces.guest
        self.settings = Settings.from_config(config)
        self.conn = store.open_store(config.state)
        schema.upgrade(self.conn)
        # the boxes on this store: none but this box's pair may serve this guest subnet
        ifs = config.interfaces
        self.name = str(ifs.uplink_address.ip if ifs.uplink_address else ifs.management_address)
        peers = [str(p) for p in config.ha.peers]
        taken = appliances.overlapping(self.conn, self.name, ifs.guest_subnet, peers, time.time())
        if taken:
            raise SubnetTaken(
                f"appliance {taken[0].name} serves {taken[0].guest_subnet} from the same store: "
                f"appliances of two segments need two guest subnets (a pair names its other "
                f"box in [ha] peers); {ifs.guest_subnet} is not served here"
            )
        appliances.register(self.conn, self.name, ifs.guest_subnet, time.time())
        self.index = load_index(self.conn, self.settings)
        self.sock = sock or open_socket(self.ifname)
        self.link = link or open_link(self.ifname)
        # the link's own hardware address (AF_PACKET's sll_addr) and the server's address:
        # the sources of a reply sent as a frame
        self.mac = link_mac(self.link)
        self.server_ip = str(config.interfaces.guest_ip)
        iface = config.interfaces.guest_address
        # what the kernel would deliver to a socket bound to 0.0.0.0:67 on this link
        self.for_us = frozenset((str(iface.ip), BROADCAST_IP, str(iface.network.broadcast_address)))
        # in an active/standby pair only the box holding the guest address answers
        if holder is None:
            on = config.ha.enabled
            holder = Holder.of(self.ifname, config.interfaces.guest_ip) if on else AlwaysActive()
        self.holder = holder
        # loaded from the store since this box last became active: a box of a pair takes
        # the store over before its first answer, even one that is active from the start
        self.index_fresh = not config.ha.enabled
        self.epoch = 0  # the pair's epoch this box claimed when it became active
        self.me = str(config.interfaces.uplink_address or self.server_ip)
        self._peers_ended = not config.ha.enabled  # the other box's store sessions
        self._next_takeover = 0.0  # monotonic: no try to take the store over before it
        self._readable = select.poll()
        self._readable.register(self.link.fileno(), select.POLLIN)
        self.guard = FloodGuard()
        self.counts: Counter[str] = Counter()
        self.requests: Counter[int | None] = Counter()  # by message type (option 53)
        self.drops: Counter[str] = Counter()
        self.stats_path = config.state.directory / "dhcp-stats.json"
        self.stopping = False
        self._warned_exhausted = 0.0
        self._exhausted_since_warn = 0
        self._stats_dirty = True

    # -- active or standby --------------------------------------------------------
    def serving(self, asked: bool = False) -> bool:
        """Whether to answer now: this box holds the guest address, and since it took
        the address over it has claimed the pair's epoch and reloaded its index from the
        shared store (the other box wrote every lease until then).  `asked`: requests
        are waiting."""
        active = self.holder.refresh(asked)
        if self.holder.changed():
            self.index_fresh = self._peers_ended = False
            log.info(
                "%s: %s %s",
                "active" if active else "standby",
                "this box holds" if active else "the other box holds",
                self.server_ip,
            )
        if not active:
            return False
        # (sessions of the other box that could not be ended are tried again, as serving
        # goes on: its lock would make every write wait and fail)
        due = not self.index_fresh or not self._peers_ended
        if due and time.monotonic() >= self._next_takeover:
            self._next_takeover = time.monotonic() + TAKEOVER_RETRY
            self._take_over()
        return self.index_fresh

    def _take_over(self) -> None:
        began = time.monotonic()
        if not self._peers_ended:
            try:
                # a dead active box may still hold the store's write lock: let it go first
                ended = takeover.end_peer_sessions(self.conn, self.config.ha.peers)
                self._peers_ended = True
                if ended:
                    log.info(
                        "ended %d store session(s) of the other box in %.0f ms",
                        ended,
                        (time.monotonic() - began) * 1000,
                    )
            except STORE_ERRORS as exc:  # not fatal: tried again in TAKEOVER_RETRY
                log.warning("could not end the other box's store sessions: %s", exc)
        if self.index_fresh:
            return
        try:
            if self.config.ha.enabled:
                self.epoch = leases.claim_epoch(self.conn, self.me)
            self.index = load_index(self.conn, self.settings)
        except STORE_ERRORS as exc:
            log.error("the lease store could not be taken over (%s): not serving yet", exc)
            return
        self.index_fresh = True
        if self._peers_ended:
            self._next_takeover = 0.0
        log.info(
            "serving %d lease(s) from the store (epoch %d), %.0f ms after the takeover began",
            len(self.index.by_ip),
            self.epoch,
            (time.monotonic() - began) * 1000,
        )

    def _stale(self, why: str) -> None:
        """The index is behind the store: reload it before answering again (and, in a
        pair, claim the epoch again, at most every TAKEOVER_RETRY seconds)."""
        log.warning("%s: the index is reloaded from the store before the next answer", why)
        self.index_fresh = False
        if self.config.ha.enabled:
            self._next_takeover = time.monotonic() + TAKEOVER_RETRY

    def discard(self) -> int:
        """Standby: read what the link holds (up to BATCH) and answer none of it."""
        n = 0
        while n < BATCH:
            try:
                self.link.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            n += 1
        self.drops["standby"] += n
        self._stats_dirty = self._stats_dirty or n > 0
        return n

    # -- the hot path -------------------------------------------------------------
    def pump(self) -> int:
        """Handle what the socket holds (up to BATCH), commit once, then send the ACKs.

        A reply that promises nothing the store must hold (OFFER, NAK, an ACK to
        INFORM) leaves at once: an offer is no lease, and a REQUEST for it is
        checked again against the index."""
        if not self.serving(asked=True):
            return self.discard()
        link, index, settings = self.link, self.index, self.settings
        relays, for_us, guard = settings.relays, self.for_us, self.guard
        now = time.time()
        pending: list[leases.Row] = []
        replies: list[tuple[codec.Message, codec.Message]] = []
        n = 0
        window_end = 0.0
        while n < BATCH:
            try:
                data = link.recv(4096)
            except (BlockingIOError, InterruptedError):
                # group commit: a burst with lease writes waits a moment for more requests,
                # so one commit (the costly part) covers several ACKs
                if not pending:
                    break
                if not window_end:
                    window_end = time.monotonic() + COMMIT_WINDOW
                left = window_end - time.monotonic()
                if left <= 0 or not self._readable.poll(left * 1000):
                    break
                continue
            except OSError as exc:  # ENETDOWN once when the link went down (and up)
                log.warning("reading %s: %s", self.ifname, exc)
                self.drops["link_error"] += 1
                break
            n += 1
            try:
                mac, src_ip, dst_ip, payload = frame.parse(data)
                if dst_ip not in for_us:
                    self._dropped("not_for_us", now)
                    continue
                # a trusted relay speaks for many clients: count those by chaddr
                key = payload[28:34] if src_ip in relays else mac
                if not guard.allow(key, now):
                    self._dropped("flood", now)
                    continue
                msg = codec.decode(payload)
            except DecodeError as exc:
                self._dropped(exc.reason, now)
                continue
            self.requests[msg.message_type] += 1
            try:
                out = handle(msg, Source(mac, src_ip), index, now, settings)
            except Exception:  # a bug must cost one packet, never the service
                log.exception("internal error answering %s from %s", msg.message_type, msg.mac)
                self._dropped("internal_error", now)
                continue
            durable = False
            for ch in out.changes:
                index.apply(ch)
                if ch.kind in PERSISTED:
                    pending.append(to_row(ch.kind, ch.binding))
                    durable = True
            if out.drop is not None:
                self._dropped(out.drop, now)
            if out.reply is not None:
                if durable:
                    replies.append((msg, out.reply))
                else:
                    self._send(msg, out.reply)
                if out.nak is not None:
                    self.counts["nak:" + out.nak] += 1
        if n == 0:
            return 0
        self.counts["received"] += n
        self._stats_dirty = True
        if pending:
            try:
                refused = self._commit(pending, now)
            except leases.Superseded as exc:
                # the other box became active after this one: write and answer nothing
                self.drops["superseded"] += len(replies)
                self._stale(f"{exc}; {len(replies)} replies withheld")
                return n
            except STORE_ERRORS as exc:
                log.error("lease store write failed (%s): %d replies withheld", exc, len(replies))
                self.drops["store_error"] += len(replies)
                self._stale("a failed write")
                return n
            if refused:
                # the other box of the pair bound these (both active at once): their
                # rows were not written, so their replies must not leave
                withheld = [(q, r) for q, r in replies if r.yiaddr in refused]
                self.drops["held_elsewhere"] += len(withheld)
                replies = [(q, r) for q, r in replies if r.yiaddr not in refused]
                self._stale(f"held by another client in the store: {', '.join(sorted(refused))}")
        for req, reply in replies:
            self._send(req, reply)
        return n

    def _commit(self, rows: list[leases.Row], now: float) -> set[str]:
        """Write `rows` durably; the addresses whose rows the pair's fence left out."""
        if self.config.ha.enabled:
            return leases.write_fenced(self.conn, rows, now, self.epoch)
        leases.write_rows(self.conn, rows, now)
        return set()

    def _send(self, req: codec.Message, reply: codec.Message) -> None:
        ip, port, neighbour = destination(req, reply)
        payload = codec.encode(reply, req.max_size)
        try:
            if neighbour:  # to chaddr on the link: the client has no address to ARP for yet
                self.link.send(
                    frame.build(
                        self.mac, req.chaddr[:6], self.server_ip, ip, SERVER_PORT, port, payload
                    )
                )
            else:
                self.sock.sendto(payload, (ip, port))
        except OSError as exc:
            self.drops["send_error"] += 1
            log.debug("send to %s:%d failed: %s", ip, port, exc)
            return
        self.counts[TYPE_NAMES.get(reply.message_type or 0, "reply")] += 1
        if neighbour:
            self.counts["unicast_to_chaddr"] += 1
        elif ip == BROADCAST_IP:
            self.counts["broadcast"] += 1

    def _dropped(self, reason: str, now: float) -> None:
        self.drops[reason] += 1
        if reason == "pool_exhausted":
            self._exhausted_since_warn += 1
            if now - self._warned_exhausted >= EXHAUSTED_WARN_EVERY:
                log.warning(
                    "address pool %s-%s exhausted: %d DISCOVER(s) not answered since last warning",
                    self.settings.pool_start,
                    self.settings.pool_end,
                    self._exhausted_since_warn,
                )
                self._warned_exhausted = now
                self._exhausted_since_warn = 0

    # -- housekeeping -------------------------------------------------------------
    def sweep(self, now: float | None = None) -> int:
        """Write 'expired' for bound leases past their end; forget stale offers."""
        now = time.time() if now is None else now
        lapsed = self.index.lapsed(now)
        if lapsed:
            changes = [
                Change(
                    "expired",
                    Binding(b.ip, b.mac, b.client, "expired", b.expires, b.client_id, b.hostname),
                )
                for b in lapsed
            ]
            try:
                refused = self._commit([to_row(c.kind, c.binding) for c in changes], now)
            except leases.Superseded as exc:
                self._stale(f"{exc}; expiry sweep not written")
                return 0
            for c in changes:
                if c.binding.ip not in refused:
                    self.index.apply(c)
            if refused:  # renewed by the other box of the pair meanwhile
                self._stale(f"renewed elsewhere: {', '.join(sorted(refused))}")
            log.info("%d lease(s) expired", len(lapsed) - len(refused))
        appliances.register(self.conn, self.name, self.config.interfaces.guest_subnet, now)
        self.index.forget_offers(now)
        self.guard.forget(now)
        return len(lapsed)

    def write_stats(self) -> None:
        if not self._stats_dirty:
            return
        doc = {
            "pid": os.getpid(),
            "time": time.time(),
            "interface": self.ifname,
            "counts": dict(self.counts),
            "drops": dict(self.drops),
            "leases_bound": sum(1 for b in self.index.by_ip.values() if b.state == "bound"),
        }
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        tmp.replace(self.stats_path)
        self._stats_dirty = False

    def metric_families(self) -> Iterator[Metric]:
        """The server's counters as Prometheus families; called from the metrics thread,
        so every shared dict is copied first (one C call each, under the GIL)."""
        counts, drops, requests = dict(self.counts), dict(self.drops), dict(self.requests)
        bindings, offers = list(self.index.by_ip.values()), len(self.index.offers)
        packets: dict[tuple[str, ...], float] = {}
        for kind, n in requests.items():
            packets[("received", TYPE_NAMES.get(kind or 0, "other"))] = n
        for name in (*TYPE_NAMES.values(), "reply"):
            if name in counts:
                packets[("sent", name)] = counts[name]
        yield metrics.counter(
            "dhcp_packets", "DHCP messages by direction and type.", ("direction", "type"), packets
        )
        yield metrics.counter(
            "dhcp_drops",
            "DHCP messages dropped (or replies withheld), by reason.",
            ("reason",),
            {(reason,): n for reason, n in drops.items()},
        )
        yield metrics.counter(
            "dhcp_naks",
            "NAKs sent, by reason.",
            ("reason",),
            {(k.removeprefix("nak:"),): n for k, n in counts.items() if k.startswith("nak:")},
        )
        states: Counter[tuple[str, ...]] = Counter({("offered",): offers})
        now = time.time()
        for b in bindings:
            states[(b.state if b.state != "bound" or b.expires > now else "expired",)] += 1
        yield metrics.gauge("dhcp_leases", "Leases in the index, by state.", ("state",), states)
        yield metrics.one_gauge(
            "dhcp_pool_addresses", "Addresses in the pool.", len(_pool(self.settings))
        )
        yield metrics.one_gauge(
            "dhcp_pool_used",
            "Pool addresses bound or offered now.",
            states[("bound",)] + states[("offered",)],
        )

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: the dhcp role has no tables to reload")
                return
            self.stopping = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        poller = select.poll()
        poller.register(self.link.fileno(), select.POLLIN)
        poller.register(wake_r.fileno(), select.POLLIN)
        next_sweep = time.monotonic()
        next_stats = time.monotonic()
        # a pair's box looks at its guest address even when no guest asks anything
        ha_every = CHECK_EVERY if isinstance(self.holder, Holder) else SWEEP_EVERY
        log.info(
            "dhcp serving on %s as %s, pool %s-%s, %d lease(s) bound",
            self.ifname,
            self.settings.server_ip,
            self.settings.pool_start,
            self.settings.pool_end,
            sum(1 for b in self.index.by_ip.values() if b.state == "bound"),
        )
        try:
            while not self.stopping:
                mono = time.monotonic()
                # a takeover is noticed (and the index reloaded) before a guest asks;
                # only the active box sweeps: a standby's index is as old as its start
                serving = self.serving()
                if mono >= next_sweep:
                    if serving:
                        try:
                            self.sweep()
                        except STORE_ERRORS as exc:  # a lock timeout, a cut store: again
                            log.error("expiry sweep not written (%s): tried again", exc)
                            self._stale("a failed sweep")
                    next_sweep = mono + SWEEP_EVERY
                if mono >= next_stats:
                    self.write_stats()
                    next_stats = mono + STATS_EVERY
                wait = max(0.0, min(next_sweep, next_stats) - time.monotonic())
                wait = min(wait, ha_every)
                for fd, _ in poller.poll(wait * 1000):
                    if fd == wake_r.fileno():
                        with contextlib.suppress(BlockingIOError):
                            wake_r.recv(64)
                    else:
                        while self.pump() == BATCH:
                            pass
        finally:
            signal.set_wakeup_fd(old_wakeup)
            self._stats_dirty = True
            self.write_stats()
            self.sock.close()
            self.link.close()
            self.conn.close()
            wake_r.close()
            wake_w.close()
        log.info("dhcp stopped: %s; drops %s", dict(self.counts), dict(self.drops))
        return 0


def main(config: Config) -> int:
    """Serve DHCP on the guest interface until SIGTERM."""
    if not config.dhcp.enabled:
        log.info("dhcp is disabled in %s", config.path)
        return 0
    Path(config.state.directory).mkdir(parents=True, exist_ok=True)
    try:
        service = Service(config)
    except SubnetTaken as exc:  # fail closed: no answer rather than one address twice
        log.error("dhcp not started: %s", exc)
        return 2
    metrics.serve(config, "dhcp", service.metric_families)
    return service.run()


def _pool(settings: Settings) -> range:
    return range(ip_to_int(settings.pool_start), ip_to_int(settings.pool_end) + 1)
