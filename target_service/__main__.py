"""python -m target_service: host the target model behind TargetService.Verify."""

import asyncio
import sys

from specdec.config import parse_config
from specdec.serving import StartupError, configure_logging
from target_service.config import TargetConfig
from target_service.server import main

if __name__ == "__main__":
    config = parse_config(TargetConfig, None, __doc__, "SPECDEC_TARGET_", prog="python -m target_service")
    configure_logging(config.log_level)
    try:
        asyncio.run(main(config))
    except StartupError as exc:
        print(f"target_service: {exc}", file=sys.stderr)
        sys.exit(2)
