"""Draw the asset graph of `laion_assets.definitions.defs` into docs/asset-graph.png.

    .venv/bin/python docs/draw_graph.py [output.png]

Read from the definitions, never by hand: one column per asset group in dependency order (a group of sources
only sits just before the first group it feeds, below it if that column is taken), each group's assets top to
bottom in dependency order. Observable sources have a dashed border. Rerun it when assets, their dependencies
or their groups change.
"""

import sys
from functools import cache
from pathlib import Path

import dagster as dg
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from laion_assets.definitions import defs  # noqa: E402

BOX_W, BOX_H, ROW, GAP, COL = 1.9, 0.56, 0.8, 0.4, 2.45  # inches: box, row pitch, gap between groups, column pitch


def partitions(spec: dg.AssetSpec) -> str:
    pd = spec.partitions_def
    if pd is None:
        return "not partitioned"
    if isinstance(pd, dg.MultiPartitionsDefinition):  # the dynamic dimension (the crawl) first
        dynamic = [d.name for d in pd.partitions_defs if isinstance(d.partitions_def, dg.DynamicPartitionsDefinition)]
        dims = dynamic + [d.name for d in pd.partitions_defs if d.name not in dynamic]
        return " × ".join(dims)
    return getattr(pd, "name", None) or type(pd).__name__


def spread(y: float, i: int, n: int) -> float:
    """The i-th of n attachment points on the side of a box centred at y."""
    return y if n == 1 else y - 0.32 * BOX_H + i * 0.64 * BOX_H / (n - 1)


def main(out: Path) -> None:
    specs = {s.key: s for s in sorted(defs.resolve_all_asset_specs(), key=lambda s: s.key.to_user_string())}
    parents = {k: sorted(d.asset_key for d in s.deps if d.asset_key in specs) for k, s in specs.items()}
    graph = defs.resolve_asset_graph()
    observable = {k for k in specs if graph.get(k).is_observable}
    group = {k: s.group_name for k, s in specs.items()}
    members = {g: sorted(k for k in specs if group[k] == g) for g in sorted(set(group.values()))}
    feeds = {g: {group[k] for k in specs for p in parents[k] if group[p] == g} - {g} for g in members}
    fed_by = {g: {group[p] for k in members[g] for p in parents[k]} - {g} for g in members}

    @cache
    def layer(g: str) -> int:  # the longest path of groups leading to it
        return max((layer(p) + 1 for p in fed_by[g]), default=0)

    def column(g: str) -> int:  # a group of sources only sits just before the first group it feeds
        return layer(g) if fed_by[g] else max(min((layer(c) for c in feeds[g]), default=1) - 1, 0)

    def ordered(g: str) -> list[dg.AssetKey]:  # topological, following chains: next the child of the latest placed
        done: list[dg.AssetKey] = []
        while len(done) < len(members[g]):
            ready = [k for k in members[g] if k not in done and all(p in done for p in parents[k] if group[p] == g)]
            done.append(min(ready, key=lambda k: (-max((done.index(p) for p in parents[k] if p in done), default=-1),
                                                  str(k))))
        return done

    # Positions in inches: x of a column, y growing downwards within it.
    pos: dict[dg.AssetKey, tuple[float, float]] = {}
    frames: list[tuple[str, float, float, float]] = []  # group, x, top, bottom
    bottoms: dict[int, float] = {}
    for g in sorted(members, key=lambda g: (column(g), not fed_by[g], g)):
        x = column(g) * COL
        top = bottoms[column(g)] + GAP if column(g) in bottoms else 0.0
        y = top + 0.45  # the group's title
        for key in ordered(g):
            pos[key] = (x, y + BOX_H / 2)
            y += ROW
        frames.append((g, x, top, y - ROW + BOX_H + 0.15))
        bottoms[column(g)] = frames[-1][3]

    width, height = max(x for x, _ in pos.values()) + BOX_W + 0.4, max(bottoms.values()) + 0.3
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-BOX_W / 2 - 0.2, width - BOX_W / 2 - 0.2)
    ax.set_ylim(height - 0.15, -0.15)
    ax.axis("off")
    colours = plt.get_cmap("Pastel1")
    for i, (g, x, top, bottom) in enumerate(frames):
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2 - 0.1, top), BOX_W + 0.2, bottom - top, zorder=0,
                                    boxstyle="round,pad=0,rounding_size=0.12", fc=colours(i), ec="none"))
        ax.text(x, top + 0.24, g, ha="center", va="center", fontsize=13, fontweight="bold")

    # Edges between columns leave a box's right side and enter the next box's left side, spread out along them.
    across = [(p, k) for k in specs for p in parents[k] if pos[p][0] != pos[k][0]]
    outs = {p: sorted((e for e in across if e[0] == p), key=lambda e: pos[e[1]][::-1]) for p in specs}
    ins = {k: sorted((e for e in across if e[1] == k), key=lambda e: pos[e[0]][::-1]) for k in specs}
    for p, k in [(p, child) for child in specs for p in parents[child]]:
        (x0, y0), (x1, y1) = pos[p], pos[k]
        if (p, k) in across:
            a = (x0 + BOX_W / 2, spread(y0, outs[p].index((p, k)), len(outs[p])))
            b = (x1 - BOX_W / 2, spread(y1, ins[k].index((p, k)), len(ins[k])))
            style = "arc3,rad=0"
        elif abs(y1 - y0) < 1.5 * ROW:  # the next box of the same group: straight down
            a, b, style = (x0, y0 + BOX_H / 2), (x1, y1 - BOX_H / 2), "arc3,rad=0"
        else:  # further down the same group: round the left-hand side
            a, b, style = (x0 - BOX_W / 2, y0), (x1 - BOX_W / 2, y1), "arc3,rad=0.45"
        ax.add_patch(FancyArrowPatch(a, b, connectionstyle=style, arrowstyle="-|>", mutation_scale=11, lw=0.9,
                                     color="#4a6d8c", alpha=0.6, zorder=2, shrinkA=0, shrinkB=1))

    label = {"ha": "center", "va": "center", "zorder": 3, "bbox": {"fc": "white", "ec": "none", "pad": 0.6}}
    for key, (x, y) in pos.items():  # edges over the box fills (one passing a box stays visible), under the labels
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, fc="white",
                                    boxstyle="round,pad=0,rounding_size=0.08", ec="#333333", lw=1.0,
                                    ls="--" if key in observable else "-", zorder=1))
        ax.text(x, y - 0.09, key.to_user_string(), fontsize=11, family="monospace", **label)
        note = "observable source" if key in observable else partitions(specs[key])
        ax.text(x, y + 0.15, note, fontsize=9, color="#555555", **label)

    fig.savefig(out, dpi=150)
    print(f"{out}: {len(pos)} assets in {len(frames)} groups")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("asset-graph.png"))
