"""`nas4dyn spaces` — list the built-in spaces; `nas4dyn spaces show NAME|FILE` — print one."""
from __future__ import annotations

import argparse

from nas4dyn.errors import ConfigError
from search_spaces.space import SearchSpace, builtin_spaces, load_space


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spaces", help="list built-in search spaces, or show one",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="built-in space name or path to a space file (with `show`)")
    p.set_defaults(run=run)


def describe(space: SearchSpace) -> str:
    lines = [
        f"space {space.name}: {space.description}",
        f"  input: {space.input_channels} channels, resolutions {list(space.resolutions)}; {space.num_classes} classes",
        f"  stem: 3x3 conv -> {space.stem_channels} channels, stride {space.stem_stride}",
    ]
    for s, st in enumerate(space.stages):
        width_name = "expand ratios" if st.block == "mbconv" else "hidden widths"
        lines.append(
            f"  stage {s}: {st.block} x depth {list(st.depths)}, out {st.out_channels}, stride {st.stride}, "
            f"kernels {list(st.kernels)}, {width_name} {list(st.widths)}, act {st.act}, gates {list(st.gates)}"
        )
    ex = space.exits
    lines.append(
        f"  early exits: candidates {[list(p) for p in ex.positions]} ([stage, block]), head hidden {ex.hidden}, "
        f"criterion {ex.criterion}, thresholds {list(ex.thresholds)}"
    )
    if space.uses_gater:
        g = space.gater
        grouping = f", filters gated in groups of {g.group}" if g.group > 1 else ""
        lines.append(f"  global gater (GaterNet): convs {list(g.channels)}, hidden {g.hidden}, binarizer {g.binarizer}"
                     f"{grouping}")
    lines.append("  gate kinds: channel = per-filter gates from the global gater; skip = per-block residual skip")
    lines.append(f"  subnets: {space.num_subnets(dynamic=False):,} static, {space.num_subnets():,} with exits and gates")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        if not args.name:
            raise ConfigError("`spaces show` needs a space name or a space file path")
        print(describe(load_space(args.name)))
        return 0
    print(f"{'space':<12} {'static subnets':>22} {'dynamic subnets':>40}")
    for name in builtin_spaces():
        space = load_space(name)
        print(f"{name:<12} {space.num_subnets(dynamic=False):>22,} {space.num_subnets():>40,}")
    return 0
