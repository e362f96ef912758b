#!/usr/bin/env python3
"""Draws BENCHMARKS.md's production-shape picture from chat reports.

    loadtest/shape-chart.py OUT.svg LABEL=DIR/chat.json [LABEL=...]

One stacked bar per report: CPU per chat action (µs) of the gateways,
Postgres and Redis in the run phase, with send -> ack p99 and writing
transactions per acknowledged send printed beside it. Standard library
only, so it runs wherever the harness does.
"""

import json
import sys
from xml.sax.saxutils import escape

PARTS = [("gateways_cpu", "gateways", "#4e79a7"),
         ("postgres_cpu", "Postgres", "#f28e2b"),
         ("redis_cpu", "Redis", "#59a14f")]


def bars(args):
    out = []
    for arg in args:
        label, path = arg.split("=", 1)
        report = json.load(open(path))
        run = report.get("costs", {}).get("run", {})
        parts = [run.get(k, {}).get("us_per_action", 0.0) for k, _, _ in PARTS]
        writes = run.get("postgres_transactions", {}).get("writing_per_send")
        out.append((label, parts, report["send"]["p99_ms"], writes))
    return out


def render(rows):
    width, left, bar_h, gap, top = 860, 190, 26, 14, 56
    height = top + len(rows) * (bar_h + gap) + 50
    scale = (width - left - 250) / max(sum(p) for _, p, _, _ in rows)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="13">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="22" font-size="16">Chat mix, 3,000 connections: CPU per action '
           '(µs) by component, send→ack p99, writing transactions per send</text>']
    x = left
    for _, name, colour in PARTS:
        svg.append(f'<rect x="{x}" y="32" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + 16}" y="43">{name}</text>')
        x += 110
    for i, (label, parts, p99, writes) in enumerate(rows):
        y = top + i * (bar_h + gap)
        svg.append(f'<text x="{left - 8}" y="{y + 18}" text-anchor="end">{escape(label)}</text>')
        x = left
        for value, (_, _, colour) in zip(parts, PARTS):
            w = value * scale
            if w > 0:
                svg.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
            x += w
        note = f'{sum(parts):.0f} µs · p99 {p99:.1f} ms'
        if writes is not None:
            note += f' · {writes:.2f} writes/send'
        svg.append(f'<text x="{x + 6:.1f}" y="{y + 18}">{note}</text>')
    svg.append('</svg>')
    return "\n".join(svg) + "\n"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    with open(sys.argv[1], "w") as f:
        f.write(render(bars(sys.argv[2:])))


if __name__ == "__main__":
    main()
