"""`ithaca plan`: predict per-rank memory, traffic and step time for every layout a config allows."""

from __future__ import annotations

import argparse
import json
import warnings

from ithaca.launcher.config.schema import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="predict per-rank memory, traffic and step time of every layout the config "
                                       "allows on N devices, and show the best that fit")
    plan.add_argument("--config", required=True, help="a YAML path, or a shipped config name (e.g. llama-1b-32k)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one config value (repeatable)")
    plan.add_argument("--gpus", type=int, help="devices in all (default: the config's dp*tp*pp*sp)")
    plan.add_argument("--gpus-per-node", type=int, help="devices per node (default: min(gpus, 8))")
    plan.add_argument("--device", default="h100", metavar="NAME|FILE",
                      help="h100 (default), h200, a100, b200, cpu, or a YAML file of device figures")
    plan.add_argument("--top", type=int, default=5, help="layouts to show that fit, and that do not (default 5)")
    plan.add_argument("--only-config", action="store_true", help="predict the config's own layout alone")
    plan.add_argument("--json", action="store_true", help="print the rows as a JSON list")


def run(args: argparse.Namespace) -> int:
    # pipeline layouts count their stages with parallel/pipeline.py, which imports megatron-core
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.plan.devices import load_device
    from ithaca.launcher.plan.layouts import accepted_layouts
    from ithaca.launcher.plan.report import best_first, make_plan, render

    cfg = load_config(args.config, args.overrides)
    device = load_device(args.device)
    gpus = args.gpus if args.gpus is not None else cfg.parallel.world_size
    if gpus < 1:
        raise ConfigError("--gpus", gpus, "use 1 or more")
    per_node = args.gpus_per_node if args.gpus_per_node is not None else min(gpus, 8)
    if per_node < 1:
        raise ConfigError("--gpus-per-node", per_node, "use 1 or more")
    if args.top < 1:
        raise ConfigError("--top", args.top, "use 1 or more")
    if args.only_config:
        cfg.check_world(gpus)
        plans = [make_plan(cfg, device, gpus, per_node)]
        shown = plans
    else:
        layouts = accepted_layouts(cfg, gpus)
        if not layouts:
            raise ConfigError("--gpus", gpus, f"no layout of {gpus} ranks passes the config check for this model "
                                              "(heads, kv heads, layers, sequence length and global batch must split "
                                              "over its degrees); try another count")
        plans = [make_plan(c, device, gpus, per_node) for c in layouts]
        ranked = best_first(plans)
        shown = [p for p in ranked if p.fits][:args.top] + [p for p in ranked if not p.fits][:args.top]
    if args.json:
        print(json.dumps([p.as_json() for p in shown], indent=1))
    else:
        print(f"device {device.name}: {device.memory_gib:g} GiB, {device.bf16_tflops:g} TFLOP/s at "
              f"{device.efficiency:g} efficiency; {gpus} devices, {per_node} per node")
        print(render(plans, args.top))
    return 0
