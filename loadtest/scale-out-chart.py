#!/usr/bin/env python3
"""Draws BENCHMARKS.md's scale-out picture from fan-out reports.

    loadtest/scale-out-chart.py OUT.svg LABEL:NODES=DIR/fanout.json [...]

Three panels against the number of gateway nodes, one line per label
(builds): the gateways' CPU summed over the nodes, Redis command time
per message, and Redis bytes out per message. Standard library only.
"""

import json
import sys
from xml.sax.saxutils import escape

COLOURS = ["#e15759", "#4e79a7", "#59a14f", "#f28e2b"]
PANELS = [("gateway CPU, all nodes (% of a core)", lambda r: 100 * r["summary"]["gateway_cpu_cores"]),
          ("Redis command time per message (µs)", lambda r: r["redis"]["usec_per_message"]),
          ("Redis bytes out per message", lambda r: r["redis"]["bytes_out_per_message"])]


def series(args):
    lines = {}
    for arg in args:
        key, path = arg.split("=", 1)
        label, nodes = key.rsplit(":", 1)
        lines.setdefault(label, []).append((int(nodes), json.load(open(path))))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items()}


def render(lines):
    pw, ph, left, top, gap = 300, 220, 50, 60, 40
    width = left + len(PANELS) * (pw + gap) + 10
    height = top + ph + 60
    nodes = sorted({n for pts in lines.values() for n, _ in pts})
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="20" font-size="15">Scale-out: the same 640 msg/s (64 rooms × 10, '
           'every room on one node) as the cluster grows</text>']
    x = 10
    for i, label in enumerate(lines):
        colour = COLOURS[i % len(COLOURS)]
        svg.append(f'<rect x="{x}" y="30" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + 16}" y="41">{escape(label)}</text>')
        x += 16 + 8 * len(label) + 20
    for p, (title, value) in enumerate(PANELS):
        ox = left + p * (pw + gap)
        top_v = max(value(r) for pts in lines.values() for _, r in pts) * 1.1
        svg.append(f'<text x="{ox}" y="{top - 6}">{escape(title)}</text>')
        svg.append(f'<line x1="{ox}" y1="{top + ph}" x2="{ox + pw}" y2="{top + ph}" stroke="#999"/>')
        svg.append(f'<line x1="{ox}" y1="{top}" x2="{ox}" y2="{top + ph}" stroke="#999"/>')
        for k in range(5):
            v = top_v * k / 4
            y = top + ph - ph * k / 4
            svg.append(f'<text x="{ox - 4}" y="{y + 4:.0f}" text-anchor="end" font-size="10">{v:.0f}</text>')
        xs = {n: ox + pw * (j + 0.5) / len(nodes) for j, n in enumerate(nodes)}
        for n, xx in xs.items():
            svg.append(f'<text x="{xx:.0f}" y="{top + ph + 16}" text-anchor="middle">{n}</text>')
        svg.append(f'<text x="{ox + pw / 2}" y="{top + ph + 32}" text-anchor="middle">nodes</text>')
        for i, (label, pts) in enumerate(lines.items()):
            colour = COLOURS[i % len(COLOURS)]
            coords = [(xs[n], top + ph - ph * value(r) / top_v) for n, r in pts]
            path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
            svg.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for (cx, cy), (_, r) in zip(coords, pts):
                svg.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>'
                           f'<text x="{cx + 5:.1f}" y="{cy - 5:.1f}" font-size="10">{value(r):.0f}</text>')
    svg.append('</svg>')
    return "\n".join(svg)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    with open(sys.argv[1], "w") as f:
        f.write(render(series(sys.argv[2:])))


if __name__ == "__main__":
    main()
