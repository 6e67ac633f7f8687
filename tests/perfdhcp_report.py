"""perfdhcp's report, read: the DHCP benchmark's and the tests' one parser of it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Run:
    offered: float  # 0 = unlimited
    achieved: float
    drops: float  # fraction of all sent packets that went unanswered
    do_delay: float  # ms
    ra_delay: float  # ms
    # shares of one core over the run (the benchmark fills them in): near 1.0 for
    # perfdhcp, the load generator is the limit and the step cannot tell servers apart
    generator_cpu: float = float("nan")
    server_cpu: float = float("nan")


def parse(out: str, offered: float) -> Run:
    rate = re.search(r"Rate: ([\d.]+) 4-way", out)
    blocks = out.split("***Statistics for: ")[1:]
    sent = recv = 0
    delays = []
    for b in blocks[:2]:
        sent += int(re.search(r"sent packets: (\d+)", b).group(1))  # type: ignore[union-attr]
        recv += int(re.search(r"received packets: (\d+)", b).group(1))  # type: ignore[union-attr]
        d = re.search(r"avg delay: ([\d.]+) ms", b)
        delays.append(float(d.group(1)) if d else float("nan"))
    while len(delays) < 2:
        delays.append(float("nan"))
    return Run(
        offered,
        float(rate.group(1)) if rate else 0.0,
        (sent - recv) / sent if sent else 1.0,
        delays[0],
        delays[1],
    )
