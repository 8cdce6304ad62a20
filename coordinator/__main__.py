"""python -m coordinator: the public Generate stream, the decoding loop and session state in Redis."""

import asyncio
import sys

from coordinator.config import CoordinatorConfig
from coordinator.server import StartupError, main
from specdec.config import parse_config
from specdec.tracing import install as install_tracing
from specdec.serving import configure_logging

if __name__ == "__main__":
    config = parse_config(CoordinatorConfig, None, __doc__, "SPECDEC_COORDINATOR_", prog="python -m coordinator")
    configure_logging(config.log_level, config.log_format)
    install_tracing("specdec-coordinator", config.trace_exporter, config.otlp_endpoint)
    try:
        asyncio.run(main(config))
    except StartupError as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        sys.exit(2)
