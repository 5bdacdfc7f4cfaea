"""Command-line config of every job: --preset, --config YAML and trailing `key.sub=value` overrides.

The library's tree (gap3d.config.Gap3DConfig) and the job's own resource sections resolve from the same
file and overrides; see gap3d/config.py for the order.
"""

import argparse
import logging

from gap3d.config import Gap3DConfig, load_job_config
from gap3d.presets import DEFAULT_PRESET, PRESETS


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --preset, --config and trailing key.sub=value overrides to a job's parser."""
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=f"size preset (default: the YAML's, else {DEFAULT_PRESET})",
    )
    parser.add_argument("--config", default=None, help="YAML file with config values")
    parser.add_argument(
        "overrides", nargs="*", default=[], help="config overrides such as train.lr=1e-4 or scaling.num_workers=4"
    )


def job_config_from_args(args: argparse.Namespace, sections: dict[str, tuple[type, dict]]) -> tuple[Gap3DConfig, dict]:
    """(Gap3DConfig, {section: dataclass}) named by parsed --preset/--config/overrides."""
    return load_job_config(args.preset, args.config, args.overrides, sections)


def configure_logging() -> None:
    """Progress lines of every job: time, logger, level, message, on stderr (stdout carries the job's JSON result)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
