"""Command line (plain python for one process, torchrun or srun for many):

sfpo-megatron train CONFIG.yaml [key.sub=value ...]
sfpo-megatron export-hf CONFIG.yaml OUT_DIR [--dtype fp32|bf16|fp16] [--quantize fp8]
                        [key.sub=value ...]
sfpo-megatron plot RUN_DIR [RUN_DIR ...] [--out DIR] [--x iteration|rollouts]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from sfpo_megatron.common.errors import ConfigError
from sfpo_megatron.common.log import configure as configure_logging
from sfpo_megatron.config import load_config

log = logging.getLogger("sfpo-megatron")
"""Errors that end a command: ``ERROR sfpo-megatron: ...`` on stderr, from every rank."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfpo-megatron", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="run training iterations")
    export_cmd = commands.add_parser(
        "export-hf", help="load the configured model through Megatron and save it as HF"
    )
    for command in (train_cmd, export_cmd):
        command.add_argument("config", help="YAML run config")
        if command is export_cmd:
            command.add_argument("out", help="output directory (replaced once complete)")
            command.add_argument(
                "--dtype",
                choices=["fp32", "bf16", "fp16"],
                help="dtype written (default: the source checkpoint's; model.dtype is not used)",
            )
            command.add_argument(
                "--quantize",
                choices=["fp8"],
                help="fp8: Model Optimizer's FP8 recipe and HF export (pip install '.[fp8]'; "
                "SGLang serves it with --quantization modelopt_fp8)",
            )
        command.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    from sfpo_megatron.tools import plan_cli

    plan_cli.add_arguments(
        commands.add_parser("plan", help="per-GPU memory of a model under a layout, or a search")
    )
    plot_cmd = commands.add_parser("plot", help="draw PNG curves from runs' metrics.jsonl")
    plot_cmd.add_argument("runs", nargs="+", metavar="RUN_DIR", help="logging.output_dir of a run")
    plot_cmd.add_argument("--out", help="where the PNGs go (default: FIRST_RUN_DIR/plots)")
    plot_cmd.add_argument(
        "--x",
        choices=("iteration", "rollouts"),
        default="iteration",
        help="x axis: RL iterations, or training samples generated so far",
    )
    args = parser.parse_args(argv)
    # plan and plot print their result (a table, the files written): the command's product,
    # not a log. train and export-hf speak through logging, configured here once.
    if args.command == "plot":
        return _plot(args.runs, args.out, args.x)
    if args.command == "plan":
        return plan_cli.run(args)
    configure_logging()
    _quiet_known_warnings()
    try:
        if args.command == "export-hf" and any(
            item.partition("=")[0].strip() == "model.dtype" for item in args.overrides
        ):
            raise ConfigError("export-hf takes its dtype from --dtype, not model.dtype")
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
    from sfpo_megatron.common.errors import CheckpointError, DataError
    from sfpo_megatron.data.rewards import RewardFailure
    from sfpo_megatron.models.arch import UnsupportedModelError
    from sfpo_megatron.tools.export import export_hf
    from sfpo_megatron.training.loop import train
    from sfpo_megatron.training.stop_request import EXIT_STATUS, StopRequested

    try:
        if args.command == "train":
            train(cfg)
        else:
            export_hf(cfg, args.out, args.dtype, args.quantize)
    except StopRequested:
        return EXIT_STATUS
    except RewardFailure as error:  # found while running: not a config error
        log.error("%s", error)
        return 1
    except (
        ConfigError,
        CheckpointError,
        DataError,
        UnsupportedModelError,
        FileNotFoundError,
    ) as error:
        log.error("%s", error)
        return 2
    return 0


def _plot(run_dirs: list[str], out: str | None, x: str) -> int:
    from sfpo_megatron.tools.plot import PlotError, plot_runs

    try:
        plot_runs(run_dirs, out, x)
    except PlotError as error:
        print(f"sfpo-megatron: {error}", file=sys.stderr)
        return 2
    return 0


def _quiet_known_warnings() -> None:
    """Megatron-Core and torch.distributed warn on every start about things a user cannot act
    on (its own deprecated calls, optional fused kernels it falls back from)."""
    for message in (
        r".*is deprecated",
        r".*(Transformer Engine|Apex).* not installed",
        r"full scope is deprecated",
        r"The \.grad attribute of a Tensor that is not a leaf",
    ):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("megatron.core.rerun_state_machine").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
