"""python -m target_service: host the target model behind TargetService.Verify."""

import asyncio
import sys

from specdec.config import parse_config
from specdec.tracing import install as install_tracing
from specdec.serving import StartupError, configure_logging
from target_service.config import TargetConfig
from target_service.server import main

if __name__ == "__main__":
    config = parse_config(TargetConfig, None, __doc__, "SPECDEC_TARGET_", prog="python -m target_service")
    configure_logging(config.log_level, config.log_format)
    install_tracing("specdec-target", config.trace_exporter, config.otlp_endpoint)
    try:
        asyncio.run(main(config))
    except StartupError as exc:
        print(f"target_service: {exc}", file=sys.stderr)
        sys.exit(2)
